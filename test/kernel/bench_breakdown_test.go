// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/attach"
	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// TestKernelBenchBreakdown says where `nbd-csi attach` and NodeStage spend
// their time on this kernel: process start and package initialisation,
// netlink set-up, the handshake, CONNECT with the readiness wait, and each
// process NodeStage spawns (blkid, mkfs, mount), next to the reference
// tools. Every step is measured once per round and the rounds repeated
// (median of 9), so that a change of the host's load during the run
// touches all rows alike. It only reports; it runs when NBDCSI_BENCH=1,
// NBDCSI_BIN names the binary and NBDCSI_GOFLOOR bench/gofloor's
// (bench/kernel.sh breakdown).
func TestKernelBenchBreakdown(t *testing.T) {
	if os.Getenv("NBDCSI_BENCH") != "1" {
		t.Skip("benchmark: set NBDCSI_BENCH=1 (bench/kernel.sh does)")
	}
	requireKernel(t)
	bin, floor := os.Getenv("NBDCSI_BIN"), os.Getenv("NBDCSI_GOFLOOR")
	if bin == "" || floor == "" {
		t.Fatal("NBDCSI_BIN must name the nbd-csi binary, NBDCSI_GOFLOOR bench/gofloor's")
	}
	const rounds = 9
	ctx := context.Background()
	run := func(env []string, name string, args ...string) time.Duration {
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), env...)
		start := time.Now()
		out, err := cmd.CombinedOutput()
		d := time.Since(start)
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return d
	}
	timed := func(f func()) time.Duration {
		start := time.Now()
		f()
		return time.Since(start)
	}
	srv := servers.Nbdkit(t, servers.Unix, "memory", "size=1G")
	u, err := nbd.ParseURI(srv.URI(""))
	if err != nil {
		t.Fatal(err)
	}
	// Fresh sparse exports for the stage steps (mkfs writes them).
	dir := t.TempDir()
	for i := 0; i < rounds; i++ {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("s%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(1 << 30); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	files := servers.Nbdkit(t, servers.Unix, "file", "dir="+dir)
	mnt := t.TempDir()
	dev, err := device.New(ctx, device.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	a := attach.New(ctx, attach.Options{BackendPrefix: attach.CLIBackendPrefix})
	defer a.Close()

	type step struct {
		name, note string
		d          []time.Duration
	}
	var steps []*step
	add := func(name, note string, d time.Duration) {
		for _, s := range steps {
			if s.name == name {
				s.d = append(s.d, d)
				return
			}
		}
		steps = append(steps, &step{name: name, note: note, d: []time.Duration{d}})
	}
	var pkgs int
	for i := 0; i < rounds; i++ {
		// Process start: a trivial C program, the smallest Go program, the
		// binary doing nothing, and its package initialisation as the
		// runtime reports it.
		add("process: /bin/true", "fork, exec, exit", run(nil, "/bin/true"))
		add("process: nbdinfo --version", "C, libnbd, dynamically linked", run(nil, "nbdinfo", "--version"))
		add("process: bench/gofloor", "the smallest Go program: Go runtime start and exit", run(nil, floor))
		add("process: nbd-csi version", "Go runtime start, package init, exit", run(nil, bin, "version"))
		cmd := exec.Command(bin, "version")
		cmd.Env = append(os.Environ(), "GODEBUG=inittrace=1")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("nbd-csi version: %v", err)
		}
		total, n, groups := parseInitTrace(stderr.String())
		pkgs = n
		add("package init (GODEBUG=inittrace=1), sum", "", total)
		for _, g := range []string{"kubernetes", "grpc+protobuf+csi", "prometheus", "other"} {
			add("package init: "+g, "", groups[g])
		}

		// The steps of an attach, in process.
		add("in process: device.New + Close", "genetlink socket, family lookup", timed(func() {
			d, err := device.New(ctx, device.Options{})
			if err != nil {
				t.Fatal(err)
			}
			d.Close()
		}))
		add("in process: attach.New + Close", "device.New and the attacher's set-up", timed(func() {
			a := attach.New(ctx, attach.Options{BackendPrefix: attach.CLIBackendPrefix})
			if err := a.Ready(ctx); err != nil {
				t.Fatal(err)
			}
			a.Close()
		}))
		var c *nbd.Conn
		add("in process: handshake", "nbd.Dial, kernel profile, unix socket", timed(func() {
			if c, err = nbd.Dial(ctx, u, nbd.WithProfile(nbd.ProfileKernel)); err != nil {
				t.Fatal(err)
			}
		}))
		f, err := c.File()
		if err != nil {
			t.Fatal(err)
		}
		var d *device.Device
		add("in process: CONNECT + readiness wait", "device.Attach of a negotiated socket", timed(func() {
			if d, err = dev.Attach(ctx, device.Config{Sockets: []*os.File{f}, SizeBytes: c.Export().Size,
				BlockSize: 512, BackendID: "breakdown-dev"}); err != nil {
				t.Fatal(err)
			}
		}))
		f.Close()
		c.Close()
		add("in process: one netlink round trip", "STATUS of all devices", timed(func() {
			if _, err := dev.Status(ctx); err != nil {
				t.Fatal(err)
			}
		}))
		add("in process: one readiness check", "read pid, size, backend; stat the node", timed(func() {
			for _, name := range []string{"pid", "size", "backend"} {
				if _, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/%s", d.Index, name)); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := os.Stat(d.Path); err != nil {
				t.Fatal(err)
			}
		}))
		add("in process: device.Detach", "DISCONNECT, wait until released", timed(func() {
			if err := dev.Detach(ctx, d.Index); err != nil {
				t.Fatal(err)
			}
		}))
		add("in process: Attacher.Attach", "handshake, CONNECT, readiness, supervision set-up", timed(func() {
			if _, err := a.Attach(ctx, driver.AttachSpec{VolumeID: "breakdown", URI: u, Connections: 1}); err != nil {
				t.Fatal(err)
			}
		}))
		if err := a.Detach(ctx, "breakdown"); err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("bd%d", i)
		add("process: nbd-csi attach", "", run(nil, bin, "attach", "--id", id, srv.URI("")))
		run(nil, bin, "detach", "--id", id)
		add("process: nbd-client -b 512", "", run(nil, "nbd-client", "-unix", srv.Socket, "/dev/nbd5", "-b", "512"))
		run(nil, "nbd-client", "-d", "/dev/nbd5")
		add("process: nbd-csi probe", "", run(nil, bin, "probe", srv.URI("")))
		add("process: nbdinfo --size", "", run(nil, "nbdinfo", "--size", srv.URI("")))

		// What NodeStage runs on a fresh volume, on a fresh device.
		run(nil, "nbd-client", "-unix", files.Socket, "/dev/nbd6", "-N", fmt.Sprintf("s%d", i), "-b", "512")
		add("stage: blank check (driver.IsBlank)", "in process, replaces blkid on a blank device", timed(func() {
			if empty, err := driver.IsBlank("/dev/nbd6"); err != nil || !empty {
				t.Fatalf("fresh device: blank %v, %v", empty, err)
			}
		}))
		add("stage: blkid -p process", "", timed(func() {
			// Exit status 2: nothing found.
			_ = exec.Command("blkid", "-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", "/dev/nbd6").Run()
		}))
		add("stage: mkfs.ext4 -q -F -m0, 1 GiB", "", run(nil, "mkfs.ext4", "-q", "-F", "-m0", "/dev/nbd6"))
		add("stage: mount process", "", run(nil, "mount", "-t", "ext4", "-o", "defaults", "/dev/nbd6", mnt))
		run(nil, "umount", mnt)
		add("stage: mount(2)", "what NodeStage now does for ext4/xfs", timed(func() {
			if err := unix.Mount("/dev/nbd6", mnt, "ext4", 0, ""); err != nil {
				t.Fatal(err)
			}
		}))
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatal(err)
		}
		run(nil, "nbd-client", "-d", "/dev/nbd6")
	}
	for _, s := range steps {
		sort.Slice(s.d, func(i, j int) bool { return s.d[i] < s.d[j] })
		note := s.note
		if strings.HasPrefix(s.name, "package init (") {
			note = fmt.Sprintf("%d packages", pkgs)
		}
		fmt.Printf("BREAKDOWN| %s | %.1f | %s |\n", s.name, float64(s.d[len(s.d)/2])/float64(time.Millisecond), note)
	}
}

// parseInitTrace sums GODEBUG=inittrace=1 output: total init time, the
// number of packages, and the time per group of packages.
func parseInitTrace(s string) (time.Duration, int, map[string]time.Duration) {
	var total time.Duration
	n := 0
	groups := map[string]time.Duration{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		// init PKG @0.5 ms, 0.1 ms clock, 1024 bytes, 12 allocs
		f := strings.Fields(sc.Text())
		if len(f) < 7 || f[0] != "init" || f[6] != "clock," {
			continue
		}
		ms, err := strconv.ParseFloat(f[4], 64)
		if err != nil {
			continue
		}
		d := time.Duration(ms * float64(time.Millisecond))
		total += d
		n++
		groups[initGroup(f[1])] += d
	}
	return total, n, groups
}

func initGroup(pkg string) string {
	switch {
	case strings.HasPrefix(pkg, "k8s.io/api/"), strings.HasPrefix(pkg, "k8s.io/apimachinery/"),
		strings.HasPrefix(pkg, "k8s.io/client-go/"), strings.HasPrefix(pkg, "k8s.io/kube-openapi/"),
		strings.HasPrefix(pkg, "sigs.k8s.io/"), strings.Contains(pkg, "gnostic"),
		strings.Contains(pkg, "json-iterator"), strings.Contains(pkg, "fxamacker/cbor"),
		strings.Contains(pkg, "go-openapi"), strings.Contains(pkg, "modern-go"),
		strings.Contains(pkg, "davecgh/go-spew"), strings.Contains(pkg, "emicklei"),
		strings.Contains(pkg, "gogo/protobuf"), strings.HasPrefix(pkg, "go.yaml.in/"),
		strings.HasPrefix(pkg, "gopkg.in/"):
		return "kubernetes"
	case strings.HasPrefix(pkg, "google.golang.org/"), strings.Contains(pkg, "container-storage-interface"),
		strings.HasPrefix(pkg, "golang.org/x/net/"):
		return "grpc+protobuf+csi"
	case strings.Contains(pkg, "prometheus"), pkg == "runtime/metrics", pkg == "expvar":
		return "prometheus"
	}
	return "other"
}

func TestParseInitTrace(t *testing.T) {
	total, n, g := parseInitTrace("init internal/bytealg @0.008 ms, 0 ms clock, 0 bytes, 0 allocs\n" +
		"init k8s.io/api/core/v1 @1.2 ms, 0.5 ms clock, 99976 bytes, 12 allocs\n" +
		"init google.golang.org/grpc @2 ms, 0.25 ms clock, 100 bytes, 1 allocs\n" +
		"hello\n")
	if total != 750*time.Microsecond || n != 3 || g["kubernetes"] != 500*time.Microsecond || g["grpc+protobuf+csi"] != 250*time.Microsecond {
		t.Errorf("parseInitTrace = %v, %d, %v", total, n, g)
	}
}
