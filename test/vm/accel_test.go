// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeQEMU writes a qemu-system-x86_64 stand-in that counts its runs in
// dir/runs, refuses a command line without KVM and the probe's kernel (as
// the real one would boot something else), and then behaves as body says.
func fakeQEMU(t *testing.T, body string) (qemu, runs string) {
	t.Helper()
	dir := t.TempDir()
	qemu = filepath.Join(dir, "qemu-system-x86_64")
	runs = filepath.Join(dir, "runs")
	script := `#!/bin/bash
echo run >> ` + runs + `
args=" $* "
[[ $args == *" -accel kvm -cpu host "* ]] || { echo "fake qemu: not the KVM probe: $*" >&2; exit 3; }
[[ $args == *" -kernel "* && $args == *" -no-reboot "* && $args == *"panic=-1"* ]] || { echo "fake qemu: bad probe command line: $*" >&2; exit 3; }
` + body
	if err := os.WriteFile(qemu, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return qemu, runs
}

func countRuns(t *testing.T, runs string) int {
	t.Helper()
	data, err := os.ReadFile(runs)
	if os.IsNotExist(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(data), "run\n")
}

// usableKVM is a stand-in for a /dev/kvm that opens read-write.
func usableKVM(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kvm")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func fakeKernel(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(p, []byte("not a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const (
	bootsFine = `echo "Probing EDD (edd=off to disable)... ok"
echo "[    0.000000] Linux version 6.1.0"
echo "[    0.912345] VFS: Cannot open root device \"nbdcsi-probe-none\""
echo "[    0.912400] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
exit 0
`
	// What nested virtualisation did to -cpu host and -cpu max.
	abortsMSR = `echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x2000000001c0000" >&2
echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3245: kvm_buf_set_msrs: Assertion failed." >&2
exit 134
`
	// ... and to other CPU models: a guest that hangs in early boot.
	hangsEDD = `echo "Probing EDD (edd=off to disable)... ok"
exec sleep 60
`
)

func TestChooseAccel(t *testing.T) {
	for _, tc := range []struct {
		name       string
		want       string
		body       string
		kvm        bool
		wantAccel  string
		wantReason string
		wantRuns   int
	}{
		{"probe boots", "", bootsFine, true, AccelKVM, "KVM probe boot reached the root mount", 1},
		{"auto probe boots", AccelAuto, bootsFine, true, AccelKVM, "KVM probe boot reached the root mount", 1},
		{"QEMU aborts", "", abortsMSR, true, AccelTCG, "failed to set MSR 0x10a", 1},
		{"guest hangs", "", hangsEDD, true, AccelTCG, "no root mount within 1s (guest hung?); last output: Probing EDD", 1},
		{"exits 0 without booting", "", "echo hello; exit 0\n", true, AccelTCG, "QEMU exited before the kernel reached its root mount", 1},
		{"no /dev/kvm", "", bootsFine, false, AccelTCG, "unusable", 0},
		{"forced tcg", AccelTCG, bootsFine, true, AccelTCG, "forced by NBDCSI_VM_ACCEL=tcg", 0},
		{"forced kvm, even broken", AccelKVM, abortsMSR, false, AccelKVM, "forced by NBDCSI_VM_ACCEL=kvm, not probed", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(EnvAccel, "")
			qemu, runs := fakeQEMU(t, tc.body)
			p := accelProbe{want: tc.want, vmlinuz: fakeKernel(t), qemu: qemu, timeout: time.Second,
				kvmDev: filepath.Join(t.TempDir(), "no-kvm")}
			if tc.kvm {
				p.kvmDev = usableKVM(t)
			}
			start := time.Now()
			c, err := p.choose(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if c.Accel != tc.wantAccel || !strings.Contains(c.Reason, tc.wantReason) {
				t.Errorf("choose = %s, want accelerator %s with reason containing %q", c, tc.wantAccel, tc.wantReason)
			}
			if n := countRuns(t, runs); n != tc.wantRuns {
				t.Errorf("QEMU ran %d times, want %d", n, tc.wantRuns)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("choosing took %s: the probe timeout does not bound it", d)
			}
		})
	}
}

// TestChooseAccelEnv: $NBDCSI_VM_ACCEL applies when Config.Accel is empty,
// and a bad value is an error, not a silent default.
func TestChooseAccelEnv(t *testing.T) {
	qemu, runs := fakeQEMU(t, abortsMSR)
	p := accelProbe{vmlinuz: fakeKernel(t), qemu: qemu, kvmDev: usableKVM(t), timeout: time.Second}
	t.Setenv(EnvAccel, "tcg")
	if c, err := p.choose(context.Background()); err != nil || c.Accel != AccelTCG {
		t.Errorf("%s=tcg: %s, %v", EnvAccel, c, err)
	}
	t.Setenv(EnvAccel, "kvm")
	if c, err := p.choose(context.Background()); err != nil || c.Accel != AccelKVM {
		t.Errorf("%s=kvm: %s, %v", EnvAccel, c, err)
	}
	t.Setenv(EnvAccel, "hvf")
	if c, err := p.choose(context.Background()); err == nil {
		t.Errorf("%s=hvf: %s, want an error", EnvAccel, c)
	}
	if n := countRuns(t, runs); n != 0 {
		t.Errorf("QEMU ran %d times for forced accelerators", n)
	}
	if _, err := (Config{Script: "true", Accel: "hvf"}).withDefaults(); err == nil {
		t.Error("Config.Accel hvf accepted")
	}
}

// TestChooseAccelCached: the probe runs once per host boot, QEMU binary and
// kernel; a changed kernel probes again.
func TestChooseAccelCached(t *testing.T) {
	t.Setenv(EnvAccel, "")
	qemu, runs := fakeQEMU(t, abortsMSR)
	cache := t.TempDir()
	p := accelProbe{vmlinuz: fakeKernel(t), qemu: qemu, kvmDev: usableKVM(t), timeout: time.Second, cacheDir: cache}
	for i := 0; i < 3; i++ {
		c, err := p.choose(context.Background())
		if err != nil || c.Accel != AccelTCG || !strings.Contains(c.Reason, "MSR") {
			t.Fatalf("run %d: %s, %v", i, c, err)
		}
		if i > 0 && !strings.Contains(c.Reason, "cached") {
			t.Errorf("run %d does not say the result is cached: %s", i, c)
		}
	}
	if n := countRuns(t, runs); n != 1 {
		t.Errorf("QEMU ran %d times for three choices, want 1", n)
	}
	if err := os.WriteFile(p.vmlinuz, []byte("another kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := p.choose(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := countRuns(t, runs); n != 2 {
		t.Errorf("after the kernel changed QEMU ran %d times in all, want 2", n)
	}
}

// TestVMProbeBootReal runs the probe boot's command line with the real QEMU
// and the rig's real kernel — under TCG, as this host may have no KVM — and
// checks that the kernel reaches the point the probe waits for: the success
// criterion holds on the real thing, not only on the fake. On a host whose
// /dev/kvm opens it also runs the real automatic choice.
func TestVMProbeBootReal(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM; skipped in -short mode")
	}
	if err := Available(); err != nil {
		if os.Getenv("NBDCSI_REQUIRE_VM") == "1" {
			t.Fatalf("%v, and NBDCSI_REQUIRE_VM=1 forbids skipping", err)
		}
		t.Skip(err)
	}
	cfg, err := Config{Script: "true"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	k, err := ensureKernel(ctx, cfg.CacheDir, DefaultModules(), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	p := accelProbe{vmlinuz: k.vmlinuz, qemu: "qemu-system-x86_64", timeout: 2 * time.Minute, args: AccelArgs(AccelTCG)}
	took, err := p.probeBoot(ctx)
	if err != nil {
		t.Fatalf("probe boot under TCG: %v", err)
	}
	t.Logf("probe boot under TCG reached the root mount in %s", took)
	c, err := ChooseAccel(ctx, AccelAuto, k.vmlinuz, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("this host: %s", c)
}
