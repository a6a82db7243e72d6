// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/nbd-csi/nbd-csi/pkg/store"
	"github.com/nbd-csi/nbd-csi/pkg/store/kubestore"
)

// Store kinds (--store).
const (
	storeEmbedded   = "embedded"
	storeKubernetes = "kubernetes"
)

// storeFlags select and locate the controller's metadata store.
type storeFlags struct {
	kind       string
	path       string
	kubeconfig string
}

func (f *storeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.kind, "store", storeEmbedded, "where the controller keeps its metadata: embedded (one bbolt file, --store-path) or kubernetes (NBDExport and NBDVolume custom resources)")
	fs.StringVar(&f.path, "store-path", "/var/lib/nbd-csi/store.db", "embedded store file (inventory, claims, fencing); one controller process at a time")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubernetes store: kubeconfig file (default: $KUBECONFIG, else the in-cluster service account)")
}

// kubeConfig returns the client config of --kubeconfig, $KUBECONFIG or the
// pod's service account.
func (f *storeFlags) kubeConfig() (*rest.Config, error) {
	path := f.kubeconfig
	if path == "" {
		path = os.Getenv("KUBECONFIG")
	}
	if path == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("kubernetes store: no --kubeconfig and not in a pod: %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubernetes store: kubeconfig %s: %w", path, err)
	}
	return cfg, nil
}

// open opens the store; readOnly opens the embedded file without waiting
// for the controller's lock (for nbd-csi exports next to a running
// controller: it reads a checked snapshot copy).
func (f *storeFlags) open(ctx context.Context, readOnly bool) (store.Store, error) {
	switch f.kind {
	case storeEmbedded:
		if readOnly {
			return store.OpenBoltReadOnly(f.path)
		}
		if err := os.MkdirAll(filepath.Dir(f.path), 0o700); err != nil {
			return nil, fmt.Errorf("store directory: %w", err)
		}
		return store.OpenBolt(f.path)
	case storeKubernetes:
		cfg, err := f.kubeConfig()
		if err != nil {
			return nil, err
		}
		s, err := kubestore.New(cfg)
		if err != nil {
			return nil, err
		}
		if err := s.Check(ctx); err != nil {
			return nil, err
		}
		if !readOnly {
			// Objects of earlier versions move to server identities.
			if err := s.Migrate(ctx); err != nil {
				s.Close()
				return nil, fmt.Errorf("kubernetes store: migrate: %w", err)
			}
		}
		return s, nil
	default:
		return nil, fmt.Errorf("--store=%q: want %s or %s", f.kind, storeEmbedded, storeKubernetes)
	}
}
