// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Accelerators (Config.Accel, $NBDCSI_VM_ACCEL).
const (
	// AccelAuto uses KVM only when a probe boot with it succeeds, else
	// TCG. The default.
	AccelAuto = "auto"
	// AccelKVM forces KVM, without a probe.
	AccelKVM = "kvm"
	// AccelTCG forces TCG (software emulation).
	AccelTCG = "tcg"
)

// ProbeTimeout bounds the KVM probe boot. A working KVM reaches the
// kernel's root mount in about a second; a broken one either aborts at
// once or hangs in early boot.
const ProbeTimeout = 20 * time.Second

// probeMarker is what the kernel prints when, booted without an initramfs
// or root device, it gives up mounting the root file system: proof that
// the CPU model and the accelerator carried it through the whole early boot.
const probeMarker = "Kernel panic - not syncing"

// AccelArgs returns the QEMU arguments for accel (AccelKVM or AccelTCG):
// the host's CPU under KVM, "max" under TCG ("max" exposes RDRAND, so the
// guest's CRNG is ready at once).
func AccelArgs(accel string) []string {
	if accel == AccelKVM {
		return []string{"-accel", "kvm", "-cpu", "host"}
	}
	return []string{"-accel", "tcg,thread=multi", "-cpu", "max"}
}

// AccelChoice is the outcome of ChooseAccel.
type AccelChoice struct {
	// Accel is AccelKVM or AccelTCG.
	Accel string `json:"accel"`
	// Reason says why, for the log.
	Reason string `json:"reason"`
}

// String is the log line for c.
func (c AccelChoice) String() string {
	return fmt.Sprintf("vm: accelerator %s (%s)", c.Accel, c.Reason)
}

// accelProbe holds what ChooseAccel needs; the zero values of qemu and kvmDev
// select the real ones.
type accelProbe struct {
	want     string // AccelAuto, AccelKVM, AccelTCG
	vmlinuz  string // kernel the probe boots
	qemu     string // default "qemu-system-x86_64"
	kvmDev   string // default "/dev/kvm"
	cacheDir string // where a probe result is kept; "" keeps none
	timeout  time.Duration
	args     []string // accelerator arguments of the probe boot; default AccelArgs(AccelKVM)
}

// ChooseAccel decides the accelerator for want (AccelAuto, AccelKVM,
// AccelTCG; empty means $NBDCSI_VM_ACCEL, else AccelAuto): for AccelAuto,
// KVM only when /dev/kvm opens and a probe boot of vmlinuz under KVM
// reaches the kernel's root mount within ProbeTimeout, else TCG. A /dev/kvm
// that opens is no proof: under nested virtualisation QEMU can abort ("failed
// to set MSR 0x10a") or the guest hang after "Probing EDD". The result is
// kept in cacheDir for this host boot, QEMU binary and kernel.
func ChooseAccel(ctx context.Context, want, vmlinuz, cacheDir string) (AccelChoice, error) {
	return accelProbe{want: want, vmlinuz: vmlinuz, cacheDir: cacheDir}.choose(ctx)
}

// ChooseAccel is the package-level ChooseAccel for cfg (Accel, CacheDir,
// Console for download messages) and the rig's kernel, downloaded into the
// cache when missing: for programs that start QEMU themselves
// (test/e2e/vm/cluster.sh, through vmrun -print-accel).
func (cfg Config) ChooseAccel(ctx context.Context) (AccelChoice, error) {
	cfg.Script = "true" // withDefaults wants one; nothing runs
	cfg, err := cfg.withDefaults()
	if err != nil {
		return AccelChoice{}, err
	}
	logf := func(format string, args ...any) { fmt.Fprintf(cfg.Console, format+"\n", args...) }
	k, err := ensureKernel(ctx, cfg.CacheDir, append(DefaultModules(), cfg.Modules...), logf)
	if err != nil {
		return AccelChoice{}, fmt.Errorf("vm: kernel: %w", err)
	}
	return ChooseAccel(ctx, cfg.Accel, k.vmlinuz, cfg.CacheDir)
}

func (p accelProbe) choose(ctx context.Context) (AccelChoice, error) {
	if p.want == "" {
		p.want = os.Getenv(EnvAccel)
	}
	if p.qemu == "" {
		p.qemu = "qemu-system-x86_64"
	}
	if p.kvmDev == "" {
		p.kvmDev = "/dev/kvm"
	}
	if p.timeout == 0 {
		p.timeout = ProbeTimeout
	}
	switch p.want {
	case AccelTCG:
		return AccelChoice{AccelTCG, "forced by " + EnvAccel + "=tcg"}, nil
	case AccelKVM:
		return AccelChoice{AccelKVM, "forced by " + EnvAccel + "=kvm, not probed"}, nil
	case "", AccelAuto:
	default:
		return AccelChoice{}, fmt.Errorf("vm: accelerator %q: want auto, kvm or tcg", p.want)
	}
	f, err := os.OpenFile(p.kvmDev, os.O_RDWR, 0)
	if err != nil {
		return AccelChoice{AccelTCG, fmt.Sprintf("%s unusable: %v", p.kvmDev, err)}, nil
	}
	f.Close()
	key, keyErr := p.cacheKey()
	cache := ""
	if p.cacheDir != "" && keyErr == nil {
		cache = filepath.Join(p.cacheDir, "accel-probe-"+key+".json")
		if data, err := os.ReadFile(cache); err == nil {
			var c AccelChoice
			if json.Unmarshal(data, &c) == nil && (c.Accel == AccelKVM || c.Accel == AccelTCG) {
				c.Reason += ", cached for this host boot"
				return c, nil
			}
		}
	}
	var c AccelChoice
	took, err := p.probeBoot(ctx)
	switch {
	case ctx.Err() != nil:
		return AccelChoice{}, fmt.Errorf("vm: KVM probe: %w", ctx.Err())
	case err != nil:
		c = AccelChoice{AccelTCG, "KVM probe boot failed: " + err.Error()}
	default:
		c = AccelChoice{AccelKVM, fmt.Sprintf("KVM probe boot reached the root mount in %s", took.Round(10*time.Millisecond))}
	}
	if cache != "" {
		// Atomically, for concurrent rigs; a cache: a failed write only
		// costs the next run a probe.
		if data, err := json.Marshal(c); err == nil {
			if f, err := os.CreateTemp(p.cacheDir, ".accel-probe-*"); err == nil {
				_, werr := f.Write(data)
				if cerr := f.Close(); werr == nil && cerr == nil {
					werr = os.Rename(f.Name(), cache)
				}
				if werr != nil {
					_ = os.Remove(f.Name())
				}
			}
		}
	}
	return c, nil
}

// cacheKey identifies what the probe result depends on: this host boot (a
// reboot may change the hypervisor), the QEMU binary and the kernel.
func (p accelProbe) cacheKey() (string, error) {
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", err
	}
	q, err := exec.LookPath(p.qemu)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "boot=%s\n", bytes.TrimSpace(boot))
	for _, f := range []string{q, p.vmlinuz} {
		fi, err := os.Stat(f)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d %d\n", f, fi.Size(), fi.ModTime().UnixNano())
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// probeBoot boots vmlinuz under KVM without an initramfs or root device:
// the kernel must get as far as giving up on the root mount (it prints
// probeMarker, panics, and panic=-1 with -no-reboot ends QEMU) within the
// timeout. It returns how long that took, or why it did not happen, with
// the last lines QEMU and the kernel printed.
func (p accelProbe) probeBoot(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	args := []string{"-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
		"-serial", "stdio", "-no-reboot", "-m", "256", "-smp", "1"}
	if p.args == nil {
		p.args = AccelArgs(AccelKVM)
	}
	args = append(args, p.args...)
	args = append(args, "-kernel", p.vmlinuz, "-append", "console=ttyS0 panic=-1 root=/dev/nbdcsi-probe-none")
	cmd := exec.CommandContext(ctx, p.qemu, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 2 * time.Second
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	got := strings.ReplaceAll(out.String(), "\r\n", "\n")
	reached := strings.Contains(got, probeMarker)
	switch {
	case reached && err == nil:
		return took, nil
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		err = fmt.Errorf("no root mount within %s (guest hung?)", p.timeout)
	case err == nil:
		err = errors.New("QEMU exited before the kernel reached its root mount")
	case reached:
		err = fmt.Errorf("QEMU: %v after the kernel reached its root mount", err)
	default:
		err = fmt.Errorf("QEMU: %v", err)
	}
	return took, fmt.Errorf("%w; last output: %s", err, lastLines(got, 3))
}

// lastLines returns the last n non-empty lines of s, joined by " | ".
func lastLines(s string, n int) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	if len(lines) == 0 {
		return "(none)"
	}
	return strings.Join(lines, " | ")
}
