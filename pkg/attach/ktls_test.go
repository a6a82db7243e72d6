// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"context"
	"errors"
	"os"
	"slices"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// TestAttachTLSModesWithoutKernelTLS runs where the kernel has no TLS
// layer (this repository's development hosts: no tls module; the VM tests
// in test/kernel cover a kernel with one): tls=auto falls back to the
// relay and says why (Attachment and a tls-relay-fallback event), tls=kernel
// refuses with ErrPlatform and attaches nothing, tls=relay relays without
// calling it a fallback.
func TestAttachTLSModesWithoutKernelTLS(t *testing.T) {
	if _, err := os.Stat("/sys/module/tls"); err == nil {
		t.Skip("the tls module is loaded here: kernel TLS would succeed (test/kernel covers it)")
	}
	certs := servers.GenerateCerts(t)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "memory", "size=1M")
	ctx := context.Background()
	for _, tc := range []struct {
		mode     string
		wantTLS  string
		fallback bool
	}{
		{"", driver.TLSRelay, true}, // auto
		{driver.TLSAuto, driver.TLSRelay, true},
		{driver.TLSRelay, driver.TLSRelay, false},
		{driver.TLSKernel, "", false},
	} {
		t.Run("mode="+tc.mode, func(t *testing.T) {
			k := newFakeKernel(t)
			p := newPlugin(t, k)
			sp := spec(t, srv.TLSURI(""), 1)
			sp.TLS = &nbd.TLSOptions{CAFile: certs.CAFile}
			sp.TLSMode = tc.mode
			att, err := p.a.Attach(ctx, sp)
			if tc.wantTLS == "" {
				if !errors.Is(err, nbd.ErrPlatform) {
					t.Fatalf("attach = %v, want ErrPlatform", err)
				}
				if devs, _ := k.List(ctx); len(devs) != 0 {
					t.Fatalf("refused attach left %d devices", len(devs))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := p.a.Lookup(ctx, "vol")
			if err != nil {
				t.Fatal(err)
			}
			if got.TLS != tc.wantTLS || (got.TLSFallback != "") != tc.fallback {
				t.Errorf("TLS %q fallback %q; want %q, fallback reported %v", got.TLS, got.TLSFallback, tc.wantTLS, tc.fallback)
			}
			if ev := p.events(); slices.Contains(ev, "tls-relay-fallback") != tc.fallback {
				t.Errorf("events %v; fallback event wanted: %v", ev, tc.fallback)
			}
			_ = att
			// What `nbd-csi devices --state-dir` shows.
			mode, reason, err := ReadTLSMode(p.secrets, "vol")
			if err != nil || mode != tc.wantTLS || (reason != "") != tc.fallback {
				t.Errorf("recorded mode %q reason %q (%v); want %q, reason given %v", mode, reason, err, tc.wantTLS, tc.fallback)
			}
			if err := p.a.Detach(ctx, "vol"); err != nil {
				t.Fatal(err)
			}
			if mode, _, err := ReadTLSMode(p.secrets, "vol"); mode != "" || err != nil {
				t.Errorf("mode %q (%v) still recorded after detach", mode, err)
			}
		})
	}
}
