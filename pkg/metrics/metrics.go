// SPDX-License-Identifier: Apache-2.0

// Package metrics is nbd-csi's Prometheus instrumentation: CSI calls
// (count by method and gRPC code, latency by method), NBD connection events
// of the node's supervised devices, and gauges the services compute when
// scraped (volumes attached and degraded on a node, exports by phase in the
// controller's inventory). `nbd-csi serve --health-address` serves it at
// /metrics; docs/operations.md lists every series.
package metrics

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// Namespace prefixes every series.
const Namespace = "nbdcsi"

// Registry holds one process's series.
type Registry struct {
	reg      *prometheus.Registry
	calls    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	events   *prometheus.CounterVec
	// wipeRemaining is the bytes a wipe in progress has left, per volume;
	// wipeBytes counts finished wipes' bytes zeroed and skipped.
	wipeRemaining *prometheus.GaugeVec
	wipeBytes     *prometheus.CounterVec
}

// New returns a registry with the CSI call and connection event series and
// the Go runtime and process collectors.
func New() *Registry {
	r := &Registry{
		reg: prometheus.NewRegistry(),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "csi_calls_total",
			Help: "CSI calls served, by method and gRPC status code."}, []string{"method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: "csi_call_duration_seconds",
			Help:    "Time to serve a CSI call, by method.",
			Buckets: []float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}}, []string{"method"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "node_connection_events_total",
			Help: "Events of the node's NBD connection supervision (link-dead, reconnected, redial-failed, gave-up, ...)."}, []string{"event"}),
		wipeRemaining: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: "controller_wipe_remaining_bytes",
			Help: "Bytes a wipe in progress still has to cover, by volume (the series goes when the wipe finishes)."}, []string{"volume"}),
		wipeBytes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "controller_wipe_bytes_total",
			Help: "Bytes of finished wipes: zeroed by requests, or skipped because base:allocation said they read as zeroes."}, []string{"kind"}),
	}
	r.reg.MustRegister(r.calls, r.duration, r.events, r.wipeRemaining, r.wipeBytes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// Interceptor counts and times every unary CSI call.
func (r *Registry) Interceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
		start := time.Now()
		resp, err := handler(ctx, req)
		r.duration.WithLabelValues(method).Observe(time.Since(start).Seconds())
		r.calls.WithLabelValues(method, status.Code(err).String()).Inc()
		return resp, err
	}
}

// ConnectionEvent counts one supervision event of kind (e.g. "link-dead").
func (r *Registry) ConnectionEvent(kind string) { r.events.WithLabelValues(kind).Inc() }

// ConnectionEventKinds starts the counter of each kind at zero. Prometheus
// sees no increase in a series that first appears with the value 1, so
// without this an alert on increase() would miss the first event of a kind
// since the plugin started (the first gave-up, say).
func (r *Registry) ConnectionEventKinds(kinds ...string) {
	for _, k := range kinds {
		r.events.WithLabelValues(k)
	}
}

// WipeProgress records that a volume's export reads as zeroes below wiped
// of size bytes.
func (r *Registry) WipeProgress(volumeID string, wiped, size uint64) {
	r.wipeRemaining.WithLabelValues(volumeID).Set(float64(size - min(wiped, size)))
}

// WipeDone records a finished wipe and drops its progress series.
func (r *Registry) WipeDone(volumeID string, zeroed, skipped uint64) {
	r.wipeRemaining.DeleteLabelValues(volumeID)
	r.wipeBytes.WithLabelValues("zeroed").Add(float64(zeroed))
	r.wipeBytes.WithLabelValues("skipped").Add(float64(skipped))
}

// Gauges registers a gauge family whose values fn computes at scrape time,
// one series per key of the map fn returns (the label's value). fn gets a
// context that ends after 5 s; an error leaves the family out of that
// scrape (and the scrape reports it).
func (r *Registry) Gauges(name, help, label string, fn func(context.Context) (map[string]float64, error)) {
	r.reg.MustRegister(&gaugeFunc{desc: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", name), help, []string{label}, nil), fn: fn})
}

// Sample is one series of a Family: its label values, in the family's
// label order, and its value.
type Sample struct {
	Labels []string
	Value  float64
}

// Family registers a gauge (counter false) or counter family with several
// labels whose series fn computes at scrape time, e.g. one per volume
// attached on the node: the series of a volume that is gone are not
// reported again, so cardinality is bounded by what exists. fn gets a
// context that ends after 5 s; an error leaves the family out of that
// scrape.
func (r *Registry) Family(name, help string, counter bool, labels []string, fn func(context.Context) ([]Sample, error)) {
	vt := prometheus.GaugeValue
	if counter {
		vt = prometheus.CounterValue
	}
	r.reg.MustRegister(&familyFunc{desc: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", name), help, labels, nil), vt: vt, fn: fn})
}

type familyFunc struct {
	desc *prometheus.Desc
	vt   prometheus.ValueType
	fn   func(context.Context) ([]Sample, error)
}

func (f *familyFunc) Describe(ch chan<- *prometheus.Desc) { ch <- f.desc }

func (f *familyFunc) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	samples, err := f.fn(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(f.desc, err)
		return
	}
	for _, s := range samples {
		m, err := prometheus.NewConstMetric(f.desc, f.vt, s.Value, s.Labels...)
		if err != nil {
			m = prometheus.NewInvalidMetric(f.desc, err)
		}
		ch <- m
	}
}

// Handler serves the registry in the Prometheus text format.
func (r *Registry) Handler() http.Handler {
	return promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

type gaugeFunc struct {
	desc *prometheus.Desc
	fn   func(context.Context) (map[string]float64, error)
}

func (g *gaugeFunc) Describe(ch chan<- *prometheus.Desc) { ch <- g.desc }

func (g *gaugeFunc) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	values, err := g.fn(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(g.desc, err)
		return
	}
	for k, v := range values {
		ch <- prometheus.MustNewConstMetric(g.desc, prometheus.GaugeValue, v, k)
	}
}
