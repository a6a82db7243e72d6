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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coordinationv1 "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// controllerFlags configure the controller service.
type controllerFlags struct {
	store       storeFlags
	scanMaxAge  time.Duration
	scanTimeout time.Duration
	scanEvery   time.Duration
	leader      bool
	leaderNS    string
}

func (f *controllerFlags) register(fs *flag.FlagSet) {
	f.store.register(fs)
	fs.DurationVar(&f.scanMaxAge, "scan-max-age", time.Minute, "a server's inventory older than this is scanned again before CreateVolume/GetCapacity")
	fs.DurationVar(&f.scanTimeout, "scan-timeout", 30*time.Second, "bound on one scan of a server")
	fs.DurationVar(&f.scanEvery, "scan-interval", 5*time.Minute, "background rescan of every server seen, so appearing and vanishing exports show (0: off)")
	fs.BoolVar(&f.leader, "leader-election", false, "kubernetes store: only the replica holding a Lease runs background scans (RPCs are served by every replica; the store keeps them consistent)")
	fs.StringVar(&f.leaderNS, "leader-election-namespace", "", "namespace of the leader election Lease (default: $POD_NAMESPACE, else default)")
}

// newControllerService opens the store and builds the controller service.
func newControllerService(ctx context.Context, driverName string, f controllerFlags) (csi.ControllerServer, driver.ReadyFunc, func(), error) {
	if f.leader && f.store.kind != storeKubernetes {
		return nil, nil, nil, fmt.Errorf("--leader-election needs --store=%s", storeKubernetes)
	}
	st, err := f.store.open(ctx, false)
	if err != nil {
		return nil, nil, nil, err
	}
	svc := driver.NewControllerService(driver.ControllerOptions{ScanMaxAge: f.scanMaxAge, ScanTimeout: f.scanTimeout,
		ScanInterval: f.scanEvery}, st, driver.NBDDiscoverer{})
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
	client, err := coordinationv1.NewForConfig(cfg)
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
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: ns, Name: strings.ReplaceAll(driverName, ".", "-") + "-controller"},
		Client:     client,
		LockConfig: resourcelock.ResourceLockConfig{Identity: id},
	}
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock: lock, LeaseDuration: 15 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second,
		ReleaseOnCancel: true, Name: lock.LeaseMeta.Name,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(c context.Context) {
				klog.InfoS("Leading: running background scans", "lease", ns+"/"+lock.LeaseMeta.Name, "identity", id)
				lead(c)
			},
			OnStoppedLeading: func() { klog.InfoS("No longer leading", "identity", id) },
		},
	})
	if err != nil {
		return err
	}
	go func() {
		for ctx.Err() == nil {
			le.Run(ctx)
		}
	}()
	return nil
}
