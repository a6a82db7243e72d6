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
// process NodeStage spawns (blkid, mkfs, mount), measured one at a time in
// the same run (median of 9). It only reports; it runs when NBDCSI_BENCH=1
// and NBDCSI_BIN names the binary (bench/kernel.sh).
func TestKernelBenchBreakdown(t *testing.T) {
	if os.Getenv("NBDCSI_BENCH") != "1" {
		t.Skip("benchmark: set NBDCSI_BENCH=1 (bench/kernel.sh does)")
	}
	requireKernel(t)
	bin, floor := os.Getenv("NBDCSI_BIN"), os.Getenv("NBDCSI_GOFLOOR")
	if bin == "" || floor == "" {
		t.Fatal("NBDCSI_BIN must name the nbd-csi binary, NBDCSI_GOFLOOR bench/gofloor's")
	}
	const runs = 9
	ctx := context.Background()
	row := func(what string, d time.Duration, note string) {
		fmt.Printf("BREAKDOWN| %s | %.1f | %s |\n", what, float64(d)/float64(time.Millisecond), note)
	}
	median := func(f func() time.Duration) time.Duration {
		var ds []time.Duration
		for i := 0; i < runs; i++ {
			ds = append(ds, f())
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		return ds[len(ds)/2]
	}
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

	// Process start: a trivial C program, the binary doing nothing, and
	// its package initialisation as the runtime reports it.
	row("process: /bin/true (fork, exec, exit)", median(func() time.Duration { return run(nil, "/bin/true") }), "baseline of any process")
	row("process: nbdinfo --version", median(func() time.Duration { return run(nil, "nbdinfo", "--version") }), "C, libnbd, dynamically linked")
	row("process: gofloor (smallest Go program)", median(func() time.Duration { return run(nil, floor) }), "Go runtime start + exit")
	row("process: nbd-csi version", median(func() time.Duration { return run(nil, bin, "version") }), "Go runtime start + package init + exit")
	var inits []time.Duration
	var pkgs int
	groups := map[string][]time.Duration{}
	for i := 0; i < runs; i++ {
		cmd := exec.Command(bin, "version")
		cmd.Env = append(os.Environ(), "GODEBUG=inittrace=1")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("nbd-csi version: %v", err)
		}
		total, n, g := parseInitTrace(stderr.String())
		inits, pkgs = append(inits, total), n
		for k, v := range g {
			groups[k] = append(groups[k], v)
		}
	}
	med := func(ds []time.Duration) time.Duration {
		if len(ds) == 0 {
			return 0
		}
		s := append([]time.Duration(nil), ds...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2]
	}
	row("package init (GODEBUG=inittrace=1, sum)", med(inits), fmt.Sprintf("%d packages with init work", pkgs))
	for _, g := range []string{"kubernetes", "grpc+protobuf+csi", "prometheus", "other"} {
		row("package init: "+g, med(groups[g]), "")
	}

	// The attach steps in process.
	srv := servers.Nbdkit(t, servers.Unix, "memory", "size=1G")
	u, err := nbd.ParseURI(srv.URI(""))
	if err != nil {
		t.Fatal(err)
	}
	row("in process: device.New + Close (genetlink family)", median(func() time.Duration {
		start := time.Now()
		d, err := device.New(ctx, device.Options{})
		if err != nil {
			t.Fatal(err)
		}
		el := time.Since(start)
		d.Close()
		return el
	}), "")
	row("in process: attach.New + Close", median(func() time.Duration {
		start := time.Now()
		a := attach.New(ctx, attach.Options{BackendPrefix: attach.CLIBackendPrefix})
		if err := a.Ready(ctx); err != nil {
			t.Fatal(err)
		}
		a.Close()
		return time.Since(start)
	}), "device.New plus the attacher's own set-up")
	row("in process: handshake (nbd.Dial kernel profile + close)", median(func() time.Duration {
		start := time.Now()
		c, err := nbd.Dial(ctx, u, nbd.WithProfile(nbd.ProfileKernel))
		if err != nil {
			t.Fatal(err)
		}
		el := time.Since(start)
		c.Close()
		return el
	}), "")
	a := attach.New(ctx, attach.Options{BackendPrefix: attach.CLIBackendPrefix})
	defer a.Close()
	var detach []time.Duration
	row("in process: Attacher.Attach (handshake + CONNECT + readiness)", median(func() time.Duration {
		start := time.Now()
		if _, err := a.Attach(ctx, driver.AttachSpec{VolumeID: "breakdown", URI: u, Connections: 1}); err != nil {
			t.Fatal(err)
		}
		el := time.Since(start)
		start = time.Now()
		if err := a.Detach(ctx, "breakdown"); err != nil {
			t.Fatal(err)
		}
		detach = append(detach, time.Since(start))
		return el
	}), "")
	row("in process: Attacher.Detach (DISCONNECT + wait released)", med(detach), "")
	i := 0
	row("process: nbd-csi attach", median(func() time.Duration {
		i++
		id := fmt.Sprintf("bd%d", i)
		d := run(nil, bin, "attach", "--id", id, srv.URI(""))
		run(nil, bin, "detach", "--id", id)
		return d
	}), "")
	row("process: nbd-client -b 512", median(func() time.Duration {
		d := run(nil, "nbd-client", "-unix", srv.Socket, "/dev/nbd5", "-b", "512")
		run(nil, "nbd-client", "-d", "/dev/nbd5")
		return d
	}), "")

	// The processes NodeStage spawns for a fresh volume, on a fresh device
	// each time (mkfs writes it).
	dir := t.TempDir()
	for i := 0; i < runs; i++ {
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
	var blkid, blank, mkfs, mountp, mounts []time.Duration
	for i := 0; i < runs; i++ {
		run(nil, "nbd-client", "-unix", files.Socket, "/dev/nbd6", "-N", fmt.Sprintf("s%d", i), "-b", "512")
		start := time.Now()
		if empty, err := driver.IsBlank("/dev/nbd6"); err != nil || !empty {
			t.Fatalf("fresh device: blank %v, %v", empty, err)
		}
		blank = append(blank, time.Since(start))
		cmd := exec.Command("blkid", "-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", "/dev/nbd6")
		start = time.Now()
		_ = cmd.Run() // exit status 2: nothing found
		blkid = append(blkid, time.Since(start))
		mkfs = append(mkfs, run(nil, "mkfs.ext4", "-q", "-F", "-m0", "/dev/nbd6"))
		mountp = append(mountp, run(nil, "mount", "-t", "ext4", "-o", "defaults", "/dev/nbd6", mnt))
		run(nil, "umount", mnt)
		start = time.Now()
		if err := unix.Mount("/dev/nbd6", mnt, "ext4", 0, ""); err != nil {
			t.Fatal(err)
		}
		mounts = append(mounts, time.Since(start))
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatal(err)
		}
		run(nil, "nbd-client", "-d", "/dev/nbd6")
	}
	row("stage: blank check reading the device (driver.IsBlank)", med(blank), "in process")
	row("stage: blkid -p process", med(blkid), "")
	row("stage: mkfs.ext4 -q -F -m0 of 1 GiB", med(mkfs), "")
	row("stage: mount process", med(mountp), "")
	row("stage: mount(2) syscall", med(mounts), "")
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
