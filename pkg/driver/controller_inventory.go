// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"fmt"
	"sync"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// Discoverer is what the controller needs from NBD servers: the exports of
// a server with their sizes and flags, and wiping an export. The real one
// (NBDDiscoverer) speaks NBD; tests may use a fake.
type Discoverer interface {
	// Discover lists the server's exports (NBD_OPT_LIST) and probes each
	// (NBD_OPT_INFO).
	Discover(ctx context.Context, server *nbd.URI, tls *nbd.TLSOptions) ([]store.Export, error)
	// Probe describes one export.
	Probe(ctx context.Context, export *nbd.URI, tls *nbd.TLSOptions) (*nbd.ExportInfo, error)
	// Wipe makes the export read as zeroes from opts.From on, stopping
	// early at opts.Until (nbd.Conn.Wipe).
	Wipe(ctx context.Context, export *nbd.URI, tls *nbd.TLSOptions, opts nbd.WipeOptions) (nbd.WipeResult, error)
}

// NBDDiscoverer implements Discoverer with pkg/nbd.
type NBDDiscoverer struct {
	// Parallel bounds the probes in flight per scan (default 8).
	Parallel int
	// MaxExports refuses a listing of more exports before probing them
	// (default, and at most, store.MaxServerExports: the store's budget).
	MaxExports int
}

var _ Discoverer = NBDDiscoverer{}

func tlsOption(tls *nbd.TLSOptions) []nbd.Option {
	if tls == nil {
		return nil
	}
	return []nbd.Option{nbd.WithTLS(tls)}
}

// Discover lists and probes a server's exports.
func (d NBDDiscoverer) Discover(ctx context.Context, server *nbd.URI, tls *nbd.TLSOptions) ([]store.Export, error) {
	list, err := nbd.List(ctx, server, tlsOption(tls)...)
	if err != nil {
		return nil, err
	}
	// The store's budget, checked before probing every export (a listing
	// over it would cost one probe per entry, then be refused).
	names := make([]store.Export, len(list))
	for i, e := range list {
		names[i] = store.Export{Name: e.Name, Description: e.Description}
	}
	if err := store.CheckBudget(server.String(), names); err != nil {
		return nil, err
	}
	if d.MaxExports > 0 && len(list) > d.MaxExports {
		return nil, &store.BudgetError{Server: server.String(), What: "exports", Got: len(list), Limit: d.MaxExports}
	}
	par := d.Parallel
	if par <= 0 {
		par = 8
	}
	out := make([]store.Export, len(list))
	errs := make([]error, len(list))
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	for i, e := range list {
		wg.Add(1)
		go func(i int, e nbd.ListEntry) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			info, err := nbd.Probe(ctx, server.WithExport(e.Name), append(tlsOption(tls), nbd.WithProfile(nbd.ProfileUserspace))...)
			if err != nil {
				errs[i] = fmt.Errorf("probe export %q: %w", e.Name, err)
				return
			}
			desc := info.Description
			if desc == "" {
				desc = e.Description
			}
			out[i] = store.Export{Name: e.Name, Description: desc, Size: info.Size, Flags: uint16(info.Flags), ReadOnly: info.ReadOnly()}
		}(i, e)
	}
	wg.Wait()
	var ok []store.Export
	for i := range out {
		if errs[i] == nil {
			ok = append(ok, out[i])
		}
	}
	// An export that cannot be probed is left out of this scan (it turns
	// Missing); the scan fails only if the server answered nothing.
	if len(ok) == 0 && len(list) > 0 {
		return nil, errs[0]
	}
	return ok, nil
}

// Probe describes one export.
func (d NBDDiscoverer) Probe(ctx context.Context, export *nbd.URI, tls *nbd.TLSOptions) (*nbd.ExportInfo, error) {
	return nbd.Probe(ctx, export, append(tlsOption(tls), nbd.WithProfile(nbd.ProfileUserspace))...)
}

// Wipe zeroes the export from opts.From on (nbd.Conn.Wipe): only what
// base:allocation says may hold data, with WRITE_ZEROES where the export has
// it, else writes of zeroes; a FLUSH makes each checkpoint durable.
func (d NBDDiscoverer) Wipe(ctx context.Context, export *nbd.URI, tls *nbd.TLSOptions, opts nbd.WipeOptions) (nbd.WipeResult, error) {
	c, err := nbd.Dial(ctx, export, append(tlsOption(tls), nbd.WithProfile(nbd.ProfileUserspace))...)
	if err != nil {
		return nbd.WipeResult{Next: opts.From}, err
	}
	defer c.Close()
	return c.Wipe(ctx, opts)
}
