// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// Handshake benchmarks: connect → ready against nbdkit's memory plugin, on
// a unix socket and on TCP loopback. bench/handshake.sh runs them and
// writes the numbers into docs/performance.md ("Handshake").
//
//	BenchmarkHandshake/unix/probe-userspace   Probe with the profile `nbd-csi probe` uses
//	BenchmarkHandshake/unix/probe-kernel      Probe with the kernel profile
//	BenchmarkHandshake/unix/dial-kernel       Dial (GO) + Close: what an attach costs
//	BenchmarkHandshake/unix/dial-userspace    Dial + Close with structured replies
//	BenchmarkHandshakeNbdinfo/unix/default    one `nbdinfo URI` process per op
//	BenchmarkHandshakeNbdinfo/unix/size       one `nbdinfo --size URI` process per op
//
// The nbdinfo variants include process start-up, so they are compared with
// `nbd-csi probe` run as a process per op (bench/handshake.sh), not with
// the in-process numbers alone.

// benchURI returns the URI of the export to measure: the one named by
// NBDCSI_BENCH_URI_UNIX or NBDCSI_BENCH_URI_TCP (bench/handshake.sh sets
// them so that every tool measures the same export in the same run), else a
// fresh nbdkit memory export.
func benchURI(b *testing.B, l servers.Listen) string {
	b.Helper()
	if u := os.Getenv("NBDCSI_BENCH_URI_" + strings.ToUpper(l.String())); u != "" {
		return u
	}
	return servers.Nbdkit(b, l, "memory", "size=64M").URI("")
}

func BenchmarkHandshake(b *testing.B) {
	for _, l := range []servers.Listen{servers.Unix, servers.TCP} {
		b.Run(l.String(), func(b *testing.B) {
			u, err := nbd.ParseURI(benchURI(b, l))
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			for _, p := range []nbd.Profile{nbd.ProfileUserspace, nbd.ProfileKernel} {
				b.Run("probe-"+p.String(), func(b *testing.B) {
					for b.Loop() {
						if _, err := nbd.Probe(ctx, u, nbd.WithProfile(p)); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
			for _, p := range []nbd.Profile{nbd.ProfileKernel, nbd.ProfileUserspace} {
				b.Run("dial-"+p.String(), func(b *testing.B) {
					for b.Loop() {
						c, err := nbd.Dial(ctx, u, nbd.WithProfile(p))
						if err != nil {
							b.Fatal(err)
						}
						if err := c.Close(); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		})
	}
}

// BenchmarkHandshakeNbdinfo execs libnbd's nbdinfo once per op against the
// same kind of export, for the ratio in docs/performance.md.
func BenchmarkHandshakeNbdinfo(b *testing.B) {
	bin := servers.LookPath(b, "nbdinfo")
	for _, l := range []servers.Listen{servers.Unix, servers.TCP} {
		b.Run(l.String(), func(b *testing.B) {
			uri := benchURI(b, l)
			for _, v := range []struct {
				name string
				args []string
			}{{"default", nil}, {"size", []string{"--size"}}} {
				b.Run(v.name, func(b *testing.B) {
					args := append(append([]string{}, v.args...), uri)
					for b.Loop() {
						if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
							b.Fatalf("nbdinfo: %v\n%s", err, out)
						}
					}
				})
			}
		})
	}
}
