// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// dataExportSize is the size of every export of the data-path tests.
const dataExportSize = 4 << 20

// dataCase is a server holding a fresh, all-zero export of dataExportSize
// bytes, the URI and options to reach it, and an independent way to read
// the whole export back (the backing file, qemu-img or libnbd's nbdcopy).
type dataCase struct {
	name  string
	start func(t *testing.T) (uri string, opts []nbd.Option, readBack func(t *testing.T) []byte)
	// onlyReadWrite: nbdkit 1.32 with --oldstyle advertises flush, fua,
	// trim, write-zeroes and cache but refuses them with EINVAL ("FUA
	// flag not supported", "flush operation not supported", …); qemu-io
	// sees the same.
	onlyReadWrite bool
}

func dataCases() []dataCase {
	viaNbdcopy := func(uri string) func(t *testing.T) []byte {
		return func(t *testing.T) []byte { return nbdcopyRead(t, uri) }
	}
	viaFile := func(path string) func(t *testing.T) []byte {
		return func(t *testing.T) []byte {
			t.Helper()
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
	}
	nbdkit := func(l servers.Listen, args ...string) func(t *testing.T) (string, []nbd.Option, func(*testing.T) []byte) {
		return func(t *testing.T) (string, []nbd.Option, func(*testing.T) []byte) {
			s := servers.Nbdkit(t, l, append(args, "memory", "size=4M")...)
			return s.URI(""), nil, viaNbdcopy(s.URI(""))
		}
	}
	rawFile := func(t *testing.T) string {
		p := filepath.Join(t.TempDir(), "disk.img")
		emptyFile(t, p, dataExportSize)
		return p
	}
	return []dataCase{
		{name: "nbdkit/memory/unix", start: nbdkit(servers.Unix)},
		{name: "nbdkit/memory/tcp", start: nbdkit(servers.TCP)},
		{name: "nbdkit/no-sr", start: nbdkit(servers.Unix, "--no-sr")},
		{name: "nbdkit/newstyle+padding", start: nbdkit(servers.Unix, "--mask-handshake=0")},
		{name: "nbdkit/fixed-newstyle+padding", start: nbdkit(servers.Unix, "--mask-handshake=1")},
		{name: "nbdkit/oldstyle", start: nbdkit(servers.TCP, "--oldstyle"), onlyReadWrite: true},
		{name: "nbdkit/file", start: func(t *testing.T) (string, []nbd.Option, func(*testing.T) []byte) {
			p := rawFile(t)
			s := servers.Nbdkit(t, servers.Unix, "file", "file="+p)
			return s.URI(""), nil, viaFile(p)
		}},
		{name: "nbdkit/tls", start: func(t *testing.T) (string, []nbd.Option, func(*testing.T) []byte) {
			c := servers.GenerateCerts(t)
			s := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+c.Dir, "memory", "size=4M")
			uri := s.TLSURI("") + "?tls-certificates=" + c.CADir
			return uri, nil, viaNbdcopy(uri)
		}},
		{name: "qemu-nbd/raw", start: func(t *testing.T) (string, []nbd.Option, func(*testing.T) []byte) {
			p := rawFile(t)
			s := servers.QemuNBD(t, servers.TCP, "-x", "disk", "-f", "raw", p)
			return s.URI("disk"), nil, viaFile(p)
		}},
		{name: "qemu-nbd/qcow2", start: func(t *testing.T) (string, []nbd.Option, func(*testing.T) []byte) {
			p := filepath.Join(t.TempDir(), "disk.qcow2")
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "4M")
			s := servers.QemuNBD(t, servers.Unix, "-x", "disk", "-f", "qcow2", p)
			return s.URI("disk"), nil, func(t *testing.T) []byte {
				// -U: qemu-nbd holds the image lock.
				out := filepath.Join(t.TempDir(), "out.raw")
				run(t, "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", p, out)
				return viaFile(out)(t)
			}
		}},
		{name: "qemu-nbd/tls", start: func(t *testing.T) (string, []nbd.Option, func(*testing.T) []byte) {
			c := servers.GenerateCerts(t)
			s := servers.QemuNBD(t, servers.Unix,
				"--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="+c.Dir,
				"--tls-creds=tls0", "-x", "disk", "-f", "raw", rawFile(t))
			uri := s.TLSURI("disk") + "&tls-certificates=" + c.CADir
			return uri, nil, viaNbdcopy(uri)
		}},
		{name: "nbd-server", start: func(t *testing.T) (string, []nbd.Option, func(*testing.T) []byte) {
			p := rawFile(t)
			s := servers.NBDServer(t, servers.TCP, "[disk]\nexportname = "+p+"\nflush = true\nfua = true\ntrim = true\n")
			return s.URI("disk"), nil, viaFile(p)
		}},
	}
}

// serverRefuses accepts success (a server that was fixed) or a refusal by
// the server (a CommandError); any other error fails the test.
func serverRefuses(t *testing.T, what string, err error) {
	t.Helper()
	var ce *nbd.CommandError
	switch {
	case err == nil:
		t.Logf("%s succeeded: the server no longer has this quirk", what)
	case errors.As(err, &ce):
		t.Logf("%s refused by the server, a known server quirk: %v", what, err)
	default:
		t.Errorf("%s: %v, want success or a server refusal", what, err)
	}
}

// run runs a command (skipping when its binary is missing).
func run(t *testing.T, name string, args ...string) {
	t.Helper()
	bin := servers.LookPath(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	defer cancel()
	if out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// TestInteropDataPath moves data through the userspace profile against
// every server: WRITE (plain and FUA), FLUSH, READ, WRITE_ZEROES (plain and
// FAST_ZERO), TRIM, CACHE, and 64 concurrent READ/WRITE requests on one
// connection; then a second, independent reader checks the whole export.
func TestInteropDataPath(t *testing.T) {
	for _, tc := range dataCases() {
		t.Run(tc.name, func(t *testing.T) {
			uri, opts, readBack := tc.start(t)
			c := dial(t, uri, append(opts, userspace)...)
			info := c.Export()
			if info.Size != dataExportSize {
				t.Fatalf("size %d, want %d", info.Size, dataExportSize)
			}
			ctx := testCtx(t)
			model := make([]byte, dataExportSize)
			write := func(off int, data []byte, flags nbd.CmdFlags) {
				t.Helper()
				if err := c.WriteAt(ctx, data, uint64(off), flags); err != nil {
					t.Fatalf("WriteAt(%d, %d bytes, flags %#x): %v", off, len(data), flags, err)
				}
				copy(model[off:], data)
			}
			check := func(off, n int) {
				t.Helper()
				got := make([]byte, n)
				if err := c.ReadAt(ctx, got, uint64(off)); err != nil {
					t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
				}
				if !bytes.Equal(got, model[off:off+n]) {
					t.Fatalf("ReadAt(%d, %d) differs from what was written", off, n)
				}
			}

			write(1<<20, randomBytes(t, 256<<10), 0)
			if tc.onlyReadWrite {
				serverRefuses(t, "FUA write", c.WriteAt(ctx, make([]byte, 512), 0, nbd.CmdFUA))
				serverRefuses(t, "Flush", c.Flush(ctx))
				serverRefuses(t, "WriteZeroes", c.WriteZeroes(ctx, 0, 512, 0))
				serverRefuses(t, "Trim", c.Trim(ctx, 0, 512, 0))
				serverRefuses(t, "Cache", c.Cache(ctx, 0, 512))
				info.Flags &^= nbd.FlagSendFUA | nbd.FlagSendFlush | nbd.FlagSendWriteZeroes | nbd.FlagSendTrim | nbd.FlagSendCache
			}
			if info.Flags.Has(nbd.FlagSendFUA) {
				write(2<<20, randomBytes(t, 64<<10), nbd.CmdFUA)
			} else if c.Export().Flags.Has(nbd.FlagSendFUA) {
				write(2<<20, randomBytes(t, 64<<10), 0)
			} else if err := c.WriteAt(ctx, make([]byte, 512), 0, nbd.CmdFUA); !errors.Is(err, nbd.ErrNotSupportedByExport) {
				t.Errorf("FUA write without the fua flag = %v, want ErrNotSupportedByExport", err)
			}
			if info.Flags.Has(nbd.FlagSendFlush) {
				if err := c.Flush(ctx); err != nil {
					t.Fatalf("Flush: %v", err)
				}
			}
			check(1<<20, 256<<10)
			check(2<<20, 64<<10)
			check(3<<20, 4096) // never written: zeroes

			if info.Flags.Has(nbd.FlagSendWriteZeroes) {
				if err := c.WriteZeroes(ctx, 1<<20+8192, 4096, 0); err != nil {
					t.Fatalf("WriteZeroes: %v", err)
				}
				clear(model[1<<20+8192 : 1<<20+8192+4096])
				if info.Flags.Has(nbd.FlagSendFastZero) {
					// A fast zero may be refused (ENOTSUP) but not fail
					// otherwise.
					err := c.WriteZeroes(ctx, 1<<20+65536, 4096, nbd.CmdFastZero)
					if err == nil {
						clear(model[1<<20+65536 : 1<<20+65536+4096])
					} else if !errors.Is(err, nbd.ErrUnsupported) {
						t.Fatalf("WriteZeroes(FAST_ZERO): %v", err)
					}
				}
				check(1<<20, 256<<10)
			}
			if info.Flags.Has(nbd.FlagSendTrim) {
				// Trimmed contents are undefined; this range was never
				// written, so both outcomes read as zeroes.
				if err := c.Trim(ctx, 3<<20, 64<<10, 0); err != nil {
					t.Fatalf("Trim: %v", err)
				}
				check(3<<20, 64<<10)
			}
			if info.Flags.Has(nbd.FlagSendCache) {
				if err := c.Cache(ctx, 0, 64<<10); err != nil {
					t.Fatalf("Cache: %v", err)
				}
			}

			concurrent(t, c, model)

			if info.Flags.Has(nbd.FlagSendFlush) {
				if err := c.Flush(ctx); err != nil {
					t.Fatalf("Flush: %v", err)
				}
			}
			got := readBack(t)
			if !bytes.Equal(got, model) {
				t.Fatalf("the export read back independently (sha256 %x, %d bytes) differs from what was written (sha256 %x)",
					sha256.Sum256(got), len(got), sha256.Sum256(model))
			}
		})
	}
}

// concurrent runs 64 goroutines on one connection, each writing and reading
// back its own 16 KiB range of the first MiB, and updates model.
func concurrent(t *testing.T, c *nbd.Conn, model []byte) {
	t.Helper()
	const workers, span = 64, 16 << 10
	ctx := testCtx(t)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for i := range workers {
		off := i * span
		data := randomBytes(t, span)
		copy(model[off:], data)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.WriteAt(ctx, data, uint64(off), 0); err != nil {
				errs <- fmt.Errorf("worker %d: WriteAt: %w", i, err)
				return
			}
			got := make([]byte, span)
			if err := c.ReadAt(ctx, got, uint64(off)); err != nil {
				errs <- fmt.Errorf("worker %d: ReadAt: %w", i, err)
				return
			}
			if !bytes.Equal(got, data) {
				errs <- fmt.Errorf("worker %d: read back other data", i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
}

// TestInteropBlockStatus reads base:allocation through BlockStatus: a fresh
// export is a hole, written ranges become data, and after writes at
// scattered offsets the whole map equals `nbdinfo --map` of the same
// export. Servers without structured replies, or a connection that asked
// for no metadata context, refuse BlockStatus locally.
func TestInteropBlockStatus(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name  string
		start func(t *testing.T) string
	}{
		{"nbdkit/memory", func(t *testing.T) string {
			return servers.Nbdkit(t, servers.Unix, "memory", "size=4M").URI("")
		}},
		{"qemu-nbd/raw", func(t *testing.T) string {
			p := filepath.Join(dir, "sparse.img")
			emptyFile(t, p, dataExportSize)
			return servers.QemuNBD(t, servers.TCP, "-x", "disk", "-f", "raw", p).URI("disk")
		}},
		{"qemu-nbd/qcow2", func(t *testing.T) string {
			p := filepath.Join(dir, "disk.qcow2")
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "4M")
			return servers.QemuNBD(t, servers.Unix, "-x", "disk", "-f", "qcow2", p).URI("disk")
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			uri := tc.start(t)
			c := dial(t, uri, userspace)
			ctx := testCtx(t)
			ext, err := c.BlockStatus(ctx, "base:allocation", 0, 1<<20, 0)
			if err != nil {
				t.Fatalf("BlockStatus: %v", err)
			}
			if len(ext) == 0 || ext[0].Flags&1 == 0 {
				t.Fatalf("fresh export: extents %+v, want a hole (flag 1) first", ext)
			}
			for _, w := range []struct{ off, n int }{{64 << 10, 128 << 10}, {1 << 20, 4096}, {3 << 20, 256 << 10}} {
				if err := c.WriteAt(ctx, randomBytes(t, w.n), uint64(w.off), 0); err != nil {
					t.Fatalf("WriteAt: %v", err)
				}
			}
			one, err := c.BlockStatus(ctx, "base:allocation", 64<<10, 1<<20, nbd.CmdReqOne)
			if err != nil {
				t.Fatalf("BlockStatus(REQ_ONE): %v", err)
			}
			if len(one) != 1 || one[0].Flags&1 != 0 || one[0].Length < 4096 {
				t.Errorf("BlockStatus(REQ_ONE) over written data = %+v, want one data extent", one)
			}
			var ours []mapExtent
			for off := uint64(0); off < dataExportSize; {
				ext, err := c.BlockStatus(ctx, "base:allocation", off, uint32(dataExportSize-off), 0)
				if err != nil {
					t.Fatalf("BlockStatus(%d): %v", off, err)
				}
				for _, e := range ext {
					n := min(uint64(e.Length), dataExportSize-off)
					ours = appendExtent(ours, mapExtent{Offset: off, Length: n, Type: e.Flags})
					off += n
				}
			}
			if diff := cmp.Diff(nbdinfoMap(t, uri), ours); diff != "" {
				t.Errorf("block status map differs from nbdinfo --map (-nbdinfo +ours):\n%s", diff)
			}
		})
	}
	t.Run("refused", func(t *testing.T) {
		s := servers.Nbdkit(t, servers.Unix, "--no-sr", "memory", "size=1M")
		for name, c := range map[string]*nbd.Conn{
			"no-sr":       dial(t, s.URI(""), userspace),
			"no-contexts": dial(t, servers.Nbdkit(t, servers.Unix, "memory", "size=1M").URI(""), userspace, nbd.WithMetaContexts()),
		} {
			if _, err := c.BlockStatus(testCtx(t), "base:allocation", 0, 4096, 0); !errors.Is(err, nbd.ErrNotSupportedByExport) {
				t.Errorf("%s: BlockStatus = %v, want ErrNotSupportedByExport", name, err)
			}
		}
	})
}

// mapExtent is one entry of `nbdinfo --map --json`.
type mapExtent struct {
	Offset uint64 `json:"offset"`
	Length uint64 `json:"length"`
	Type   uint32 `json:"type"`
}

// appendExtent appends e, merging it with the last extent of the same type.
func appendExtent(m []mapExtent, e mapExtent) []mapExtent {
	if k := len(m); k > 0 && m[k-1].Type == e.Type && m[k-1].Offset+m[k-1].Length == e.Offset {
		m[k-1].Length += e.Length
		return m
	}
	return append(m, e)
}

// nbdinfoMap returns the merged base:allocation map nbdinfo reports.
func nbdinfoMap(t *testing.T, uri string) []mapExtent {
	t.Helper()
	bin := servers.LookPath(t, "nbdinfo")
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--map", "--json", uri).Output()
	if err != nil {
		t.Fatalf("nbdinfo --map: %v", err)
	}
	var raw []mapExtent
	if err := json.Unmarshal(out, &raw); err != nil {
		t.Fatalf("parse nbdinfo --map: %v\n%s", err, out)
	}
	var m []mapExtent
	for _, e := range raw {
		m = appendExtent(m, e)
	}
	return m
}

// TestInteropServerRestart stops (SIGTERM) or kills (SIGKILL) each server
// under an open connection and starts it again on the same address: requests on the old connection fail
// promptly (no hang), a new connection to the same URI works, and data
// flushed before the restart is still there.
func TestInteropServerRestart(t *testing.T) {
	tests := []struct {
		name  string
		start func(t *testing.T, img string) (*servers.Server, string)
	}{
		{"nbdkit", func(t *testing.T, img string) (*servers.Server, string) {
			s := servers.Nbdkit(t, servers.TCP, "file", "file="+img)
			return s, s.URI("")
		}},
		{"qemu-nbd", func(t *testing.T, img string) (*servers.Server, string) {
			s := servers.QemuNBD(t, servers.Unix, "-x", "disk", "-f", "raw", img)
			return s, s.URI("disk")
		}},
		{"nbd-server", func(t *testing.T, img string) (*servers.Server, string) {
			s := servers.NBDServer(t, servers.TCP, "[disk]\nexportname = "+img+"\nflush = true\n")
			return s, s.URI("disk")
		}},
	}
	for _, tc := range tests {
		for _, crash := range []bool{false, true} {
			name := tc.name + "/stop"
			if crash {
				name = tc.name + "/kill"
			}
			t.Run(name, func(t *testing.T) {
				img := filepath.Join(t.TempDir(), "disk.img")
				emptyFile(t, img, 1<<20)
				s, uri := tc.start(t, img)
				c := dial(t, uri, userspace)
				ctx := testCtx(t)
				data := randomBytes(t, 64<<10)
				if err := c.WriteAt(ctx, data, 4096, 0); err != nil {
					t.Fatalf("WriteAt: %v", err)
				}
				if err := c.Flush(ctx); err != nil {
					t.Fatalf("Flush: %v", err)
				}
				if crash {
					s.Kill()
					s.Start()
				} else {
					s.Restart()
				}
				if err := c.ReadAt(ctx, make([]byte, 4096), 0); err == nil {
					t.Fatalf("ReadAt on a connection to a killed server succeeded")
				} else if ctx.Err() != nil {
					t.Fatalf("ReadAt did not notice the dead server before the deadline: %v", err)
				}
				c2 := dial(t, uri, userspace)
				got := make([]byte, len(data))
				if err := c2.ReadAt(ctx, got, 4096); err != nil {
					t.Fatalf("ReadAt after restart: %v", err)
				}
				if !bytes.Equal(got, data) {
					t.Fatalf("data flushed before the restart is gone")
				}
			})
		}
	}
}
