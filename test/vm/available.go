// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// Available reports whether this host can run the rig with the default
// configuration, without downloading or building anything. The error
// lists every missing piece with the Debian package that provides it,
// so that tests can skip with a clear message:
//
//	if err := vm.Available(); err != nil {
//		t.Skip(err)
//	}
func Available() error {
	return Config{}.Available()
}

// Available is the package-level Available for the cache directory,
// extra tools and accelerator of cfg.
func (cfg Config) Available() error {
	var problems []string
	add := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		add("the rig needs a linux/amd64 host (host tools are copied into the guest), this is %s/%s",
			runtime.GOOS, runtime.GOARCH)
	}
	for _, c := range []struct{ cmd, pkg string }{
		{"qemu-system-x86_64", "qemu-system-x86"},
		{"ldd", "libc-bin"},
	} {
		if _, err := exec.LookPath(c.cmd); err != nil {
			add("%s not found (apt-get install %s)", c.cmd, c.pkg)
		}
	}
	if _, err := findBusybox(); err != nil {
		add("%v", err)
	}
	if _, missing := hostTools(cfg.Tools); len(missing) > 0 {
		add("missing host tools: %s", strings.Join(missing, ", "))
	}
	cacheDir := cfg.CacheDir
	if cacheDir == "" {
		d, err := DefaultCacheDir()
		if err != nil {
			add("%v", err)
		}
		cacheDir = d
	}
	if cacheDir != "" {
		if err := checkKernelSource(cacheDir); err != nil {
			add("%v", err)
		}
	}
	accel := cfg.Accel
	if accel == "" {
		accel = os.Getenv(EnvAccel)
	}
	if accel == "kvm" {
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
			add("accelerator kvm requested (%s) but /dev/kvm cannot be opened: %v", EnvAccel, err)
		} else {
			f.Close()
		}
	}
	if len(problems) > 0 {
		return errors.New("vm rig unavailable: " + strings.Join(problems, "; "))
	}
	return nil
}

// checkKernelSource reports whether a kernel is cached in cacheDir or
// can be downloaded with apt-get.
func checkKernelSource(cacheDir string) error {
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return fmt.Errorf("cache directory %s is not usable: %v (set %s)", cacheDir, err, EnvCache)
	}
	if cached, _ := filepath.Glob(filepath.Join(cacheDir, "kernel", "*", "vmlinuz")); len(cached) > 0 {
		return nil
	}
	var missing []string
	for _, c := range []string{"apt-get", "apt-cache", "dpkg", "depmod"} {
		if _, err := exec.LookPath(c); err != nil {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("no kernel cached in %s and cannot download one: %s not found (need apt, dpkg and kmod)",
			cacheDir, strings.Join(missing, ", "))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := kernelPackage(ctx, cacheDir); err != nil {
		return fmt.Errorf("no kernel cached in %s and %v", cacheDir, err)
	}
	return nil
}
