// SPDX-License-Identifier: Apache-2.0

// Package wipe benchmarks the controller's wipe (nbd.Conn.Wipe) on a 10 GiB
// sparse export with 100 MiB written: the allocation-aware path (zero only
// what base:allocation says may hold data) against zeroing everything
// (WRITE_ZEROES over the whole export), in the same run, against nbdkit's
// file plugin (punching holes, and zeroing by writes) and qemu-nbd. `make bench` runs it; it reports both times,
// the bytes each path zeroed and the ratio full/aware. Each wipe is checked:
// the backing file must read as zeroes where the data was.
package wipe

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

const (
	exportSize = 10 << 30
	written    = 100 << 20
	extent     = 1 << 20 // written as 100 runs of 1 MiB spread over the export
)

// dirty makes the backing file sparse again (a wipe that writes zeroes
// allocates it), then writes 100 MiB of non-zero data, 1 MiB every
// exportSize/100 bytes, and returns the offsets.
func dirty(b *testing.B, file string) []int64 {
	b.Helper()
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, exportSize); err != nil {
		b.Fatal(err)
	}
	data := bytes.Repeat([]byte("tenant!"), extent/7+1)[:extent]
	var offs []int64
	for i := range written / extent {
		off := int64(i) * (exportSize / (written / extent))
		if _, err := f.WriteAt(data, off); err != nil {
			b.Fatal(err)
		}
		offs = append(offs, off)
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	return offs
}

// clean fails unless every written range reads as zeroes in the file.
func clean(b *testing.B, file string, offs []int64) {
	b.Helper()
	f, err := os.Open(file)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, extent)
	for _, off := range offs {
		if _, err := f.ReadAt(buf, off); err != nil {
			b.Fatal(err)
		}
		if !bytes.Equal(buf, make([]byte, extent)) {
			b.Fatalf("data left at offset %d after the wipe", off)
		}
	}
}

func BenchmarkWipe(b *testing.B) {
	for _, srv := range []struct {
		name  string
		start func(b *testing.B, file string) string
	}{
		{"nbdkit-file", func(b *testing.B, f string) string {
			return servers.Nbdkit(b, servers.Unix, "file", "file="+f).URI("")
		}},
		// A server whose zeroing writes (nbdkit's nozero filter emulating
		// WRITE_ZEROES by writes, as on a backing store that cannot punch
		// holes): zeroing everything writes 10 GiB.
		{"nbdkit-file-zero-by-writes", func(b *testing.B, f string) string {
			return servers.Nbdkit(b, servers.Unix, "--filter=nozero", "file", "file="+f, "zeromode=emulate").URI("")
		}},
		{"qemu-nbd", func(b *testing.B, f string) string {
			return servers.QemuNBD(b, servers.Unix, "-x", "disk", "-f", "raw", "--discard=unmap", "--cache=none", "--aio=native", f).URI("disk")
		}},
	} {
		b.Run(srv.name, func(b *testing.B) {
			file := filepath.Join(b.TempDir(), "disk.img")
			fh, err := os.Create(file)
			if err != nil {
				b.Fatal(err)
			}
			if err := fh.Truncate(exportSize); err != nil {
				b.Fatal(err)
			}
			fh.Close()
			u, err := nbd.ParseURI(srv.start(b, file))
			if err != nil {
				b.Fatal(err)
			}
			wipe := func(ignore bool) (time.Duration, nbd.WipeResult) {
				b.StopTimer()
				offs := dirty(b, file)
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
				defer cancel()
				c, err := nbd.Dial(ctx, u, nbd.WithProfile(nbd.ProfileUserspace))
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				b.StartTimer()
				start := time.Now()
				res, err := c.Wipe(ctx, nbd.WipeOptions{IgnoreAllocation: ignore})
				d := time.Since(start)
				b.StopTimer()
				if err != nil || !res.Done() {
					b.Fatalf("wipe (ignore allocation %v): %+v, %v", ignore, res, err)
				}
				clean(b, file, offs)
				b.StartTimer()
				return d, res
			}
			var aware, full time.Duration
			var ra, rf nbd.WipeResult
			for range b.N {
				d, r := wipe(false)
				aware, ra = aware+d, r
				d, r = wipe(true)
				full, rf = full+d, r
			}
			n := float64(b.N)
			b.ReportMetric(aware.Seconds()*1000/n, "aware-ms")
			b.ReportMetric(full.Seconds()*1000/n, "full-ms")
			b.ReportMetric(float64(full)/float64(aware), "full/aware")
			b.ReportMetric(float64(ra.Zeroed)/(1<<20), "aware-zeroed-MiB")
			b.ReportMetric(float64(rf.Zeroed)/(1<<20), "full-zeroed-MiB")
			b.Logf("%s: aware %v per wipe (%s, zeroed %d MiB, skipped %d MiB); full %v per wipe (%s, zeroed %d MiB); ratio %.1f",
				srv.name, aware/time.Duration(b.N), ra.Method, ra.Zeroed>>20, ra.Skipped>>20, full/time.Duration(b.N), rf.Method, rf.Zeroed>>20, float64(full)/float64(aware))
		})
	}
}
