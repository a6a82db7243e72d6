// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/metrics"
	"github.com/nbd-csi/nbd-csi/pkg/store"
	"github.com/nbd-csi/nbd-csi/pkg/store/kubestore"
)

// controllerFlags configure the controller service.
type controllerFlags struct {
	store       storeFlags
	scanMaxAge  time.Duration
	scanTimeout time.Duration
	scanEvery   time.Duration
	leader      bool
	leaderNS    string
	wipeBudget  time.Duration
}

func (f *controllerFlags) register(fs *flag.FlagSet) {
	f.store.register(fs)
	fs.DurationVar(&f.scanMaxAge, "scan-max-age", time.Minute, "a server's inventory older than this is scanned again before CreateVolume/GetCapacity")
	fs.DurationVar(&f.scanTimeout, "scan-timeout", 30*time.Second, "bound on one scan of a server")
	fs.DurationVar(&f.scanEvery, "scan-interval", 5*time.Minute, "background rescan of every server seen, so appearing and vanishing exports show (0: off)")
	fs.DurationVar(&f.wipeBudget, "wipe-budget", time.Minute, "bound on the time one DeleteVolume spends wiping (at most 3/4 of the caller's deadline); a longer wipe saves its progress, returns Aborted and continues on the retry")
	fs.BoolVar(&f.leader, "leader-election", false, "kubernetes store: only the replica holding a Lease runs background scans (RPCs are served by every replica; the store keeps them consistent)")
	fs.StringVar(&f.leaderNS, "leader-election-namespace", "", "namespace of the leader election Lease (default: $POD_NAMESPACE, else default)")
}

// newControllerService opens the store and builds the controller service.
func newControllerService(ctx context.Context, driverName string, f controllerFlags, m *metrics.Registry) (csi.ControllerServer, driver.ReadyFunc, func(), error) {
	if f.leader && f.store.kind != storeKubernetes {
		return nil, nil, nil, fmt.Errorf("--leader-election needs --store=%s", storeKubernetes)
	}
	st, err := f.store.open(ctx, false)
	if err != nil {
		return nil, nil, nil, err
	}
	m.Gauges("exports", "Exports in the controller's inventory, by phase (Available, Bound, Missing).", "phase",
		func(context.Context) (map[string]float64, error) {
			// Counters the store keeps on every write: constant time.
			stats, err := st.Stats()
			if err != nil {
				return nil, err
			}
			n := map[string]float64{string(store.PhaseAvailable): 0, string(store.PhaseBound): 0, string(store.PhaseMissing): 0}
			for p, c := range stats.Phases {
				n[string(p)] = float64(c)
			}
			return n, nil
		})
	svc := driver.NewControllerService(driver.ControllerOptions{ScanMaxAge: f.scanMaxAge, ScanTimeout: f.scanTimeout,
		ScanInterval: f.scanEvery, WipeBudget: f.wipeBudget, Wipes: m}, st, driver.NBDDiscoverer{})
	if f.leader {
		if err := f.runLeaderElection(ctx, driverName, svc.Start); err != nil {
			st.Close()
			return nil, nil, nil, err
		}
	} else {
		svc.Start(ctx)
	}
	return svc, svc.Ready, func() { _ = st.Close() }, nil
}

// runLeaderElection calls lead with a context that ends when this process
// stops leading, each time it becomes the leader, until ctx ends.
func (f controllerFlags) runLeaderElection(ctx context.Context, driverName string, lead func(context.Context)) error {
	cfg, err := f.store.kubeConfig()
	if err != nil {
		return err
	}
	ns := f.leaderNS
	if ns == "" {
		ns = os.Getenv("POD_NAMESPACE")
	}
	if ns == "" {
		ns = "default"
	}
	id := os.Getenv("POD_NAME")
	if id == "" {
		if id, err = os.Hostname(); err != nil {
			return err
		}
	}
	e := kubestore.Election{Namespace: ns, Name: strings.ReplaceAll(driverName, ".", "-") + "-controller", Identity: id}
	go func() {
		if err := kubestore.RunElection(ctx, cfg, e, lead); err != nil {
			klog.ErrorS(err, "Leader election failed; background scans do not run")
		}
	}()
	return nil
}
