// SPDX-License-Identifier: Apache-2.0

package metrics

import (
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func scrape(t *testing.T, r *Registry) string {
	t.Helper()
	srv := httptest.NewServer(r.Handler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func TestInterceptorCountsByMethodAndCode(t *testing.T) {
	r := New()
	ic := r.Interceptor()
	call := func(method string, err error) {
		_, got := ic(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Node/" + method},
			func(context.Context, any) (any, error) { return nil, err })
		if !errors.Is(got, err) {
			t.Fatalf("interceptor changed the error: %v", got)
		}
	}
	call("NodeStageVolume", nil)
	call("NodeStageVolume", nil)
	call("NodeStageVolume", status.Error(codes.FailedPrecondition, "no nbd"))
	call("NodeUnstageVolume", errors.New("plain"))
	r.ConnectionEvent("link-dead")
	r.ConnectionEvent("reconnected")
	r.ConnectionEvent("link-dead")
	out := scrape(t, r)
	for _, want := range []string{
		`nbdcsi_csi_calls_total{code="OK",method="NodeStageVolume"} 2`,
		`nbdcsi_csi_calls_total{code="FailedPrecondition",method="NodeStageVolume"} 1`,
		`nbdcsi_csi_calls_total{code="Unknown",method="NodeUnstageVolume"} 1`,
		`nbdcsi_csi_call_duration_seconds_count{method="NodeStageVolume"} 3`,
		`nbdcsi_node_connection_events_total{event="link-dead"} 2`,
		`nbdcsi_node_connection_events_total{event="reconnected"} 1`,
		`go_goroutines `,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("scrape lacks %q", want)
		}
	}
}

func TestGaugesComputedAtScrape(t *testing.T) {
	r := New()
	n := 0
	r.Gauges("exports", "Exports by phase.", "phase", func(context.Context) (map[string]float64, error) {
		n++
		return map[string]float64{"Available": float64(n), "Bound": 2}, nil
	})
	r.Gauges("broken", "A family whose source fails.", "x", func(context.Context) (map[string]float64, error) {
		return nil, errors.New("store unreachable")
	})
	if out := scrape(t, r); !strings.Contains(out, `nbdcsi_exports{phase="Available"} 1`) || !strings.Contains(out, `nbdcsi_exports{phase="Bound"} 2`) {
		t.Errorf("first scrape:\n%s", out)
	}
	out := scrape(t, r)
	if !strings.Contains(out, `nbdcsi_exports{phase="Available"} 2`) {
		t.Errorf("gauge not recomputed:\n%s", out)
	}
	// A failing family is left out; the rest is still served.
	if strings.Contains(out, "nbdcsi_broken{") || !strings.Contains(out, "go_goroutines") {
		t.Errorf("failing family handling:\n%s", out)
	}
}

// TestFamilyPerVolume: a Family reports exactly the series its function
// returns at each scrape, so a volume that is gone has no series any more.
func TestFamilyPerVolume(t *testing.T) {
	r := New()
	volumes := []Sample{{Labels: []string{"vol-a", "/dev/nbd0"}, Value: 1}, {Labels: []string{"vol-b", "/dev/nbd1"}, Value: 0}}
	r.Family("node_volume_healthy", "test", false, []string{"volume_id", "device"}, func(context.Context) ([]Sample, error) {
		return volumes, nil
	})
	r.Family("node_volume_connection_events_total", "test", true, []string{"volume_id", "event"}, func(context.Context) ([]Sample, error) {
		return []Sample{{Labels: []string{"vol-a", "reconnected"}, Value: 3}}, nil
	})
	out := scrape(t, r)
	for _, w := range []string{
		`nbdcsi_node_volume_healthy{device="/dev/nbd0",volume_id="vol-a"} 1`,
		`nbdcsi_node_volume_healthy{device="/dev/nbd1",volume_id="vol-b"} 0`,
		"# TYPE nbdcsi_node_volume_connection_events_total counter",
		`nbdcsi_node_volume_connection_events_total{event="reconnected",volume_id="vol-a"} 3`,
	} {
		if !strings.Contains(out, w) {
			t.Errorf("scrape lacks %s:\n%s", w, out)
		}
	}
	volumes = volumes[:1]
	if out := scrape(t, r); strings.Contains(out, "vol-b") {
		t.Errorf("vol-b still reported after it went away:\n%s", out)
	}
}

func TestWipeProgress(t *testing.T) {
	r := New()
	r.WipeProgress("nbdv-1", 1<<30, 3<<30)
	r.WipeProgress("nbdv-2", 0, 1<<20)
	out := scrape(t, r)
	for _, want := range []string{
		`nbdcsi_controller_wipe_remaining_bytes{volume="nbdv-1"} 2.147483648e+09`,
		`nbdcsi_controller_wipe_remaining_bytes{volume="nbdv-2"} 1.048576e+06`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("scrape lacks %q:\n%s", want, out)
		}
	}
	r.WipeDone("nbdv-1", 100<<20, 3<<30-100<<20)
	out = scrape(t, r)
	if strings.Contains(out, `volume="nbdv-1"`) {
		t.Errorf("finished wipe still has a progress series")
	}
	for _, want := range []string{
		`nbdcsi_controller_wipe_bytes_total{kind="zeroed"} 1.048576e+08`,
		`nbdcsi_controller_wipe_bytes_total{kind="skipped"} 3.116367872e+09`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("scrape lacks %q", want)
		}
	}
}
