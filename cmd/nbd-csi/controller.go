// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// controllerFlags configure the controller service.
type controllerFlags struct {
	storePath   string
	scanMaxAge  time.Duration
	scanTimeout time.Duration
	scanEvery   time.Duration
}

func (f *controllerFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.storePath, "store-path", "/var/lib/nbd-csi/store.db", "embedded metadata store file (inventory, claims, fencing); one controller at a time")
	fs.DurationVar(&f.scanMaxAge, "scan-max-age", time.Minute, "a server's inventory older than this is scanned again before CreateVolume/GetCapacity")
	fs.DurationVar(&f.scanTimeout, "scan-timeout", 30*time.Second, "bound on one scan of a server")
	fs.DurationVar(&f.scanEvery, "scan-interval", 5*time.Minute, "background rescan of every server seen, so appearing and vanishing exports show (0: off)")
}

// newControllerService opens the store and builds the controller service.
func newControllerService(ctx context.Context, _ string, f controllerFlags) (csi.ControllerServer, driver.ReadyFunc, func(), error) {
	if err := os.MkdirAll(filepath.Dir(f.storePath), 0o700); err != nil {
		return nil, nil, nil, fmt.Errorf("store directory: %w", err)
	}
	st, err := store.OpenBolt(f.storePath)
	if err != nil {
		return nil, nil, nil, err
	}
	svc := driver.NewControllerService(driver.ControllerOptions{ScanMaxAge: f.scanMaxAge, ScanTimeout: f.scanTimeout,
		ScanInterval: f.scanEvery}, st, driver.NBDDiscoverer{})
	svc.Start(ctx)
	return svc, svc.Ready, func() { _ = st.Close() }, nil
}
