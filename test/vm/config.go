// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Environment variables understood by the rig.
const (
	// EnvCache overrides the default cache directory (see Config.CacheDir).
	EnvCache = "NBDCSI_VM_CACHE"
	// EnvInVM is set to "1" for every process started inside the VM, so
	// that tests can tell they run in the rig (see InVM).
	EnvInVM = "NBDCSI_IN_VM"
	// EnvKernelPackage names the Debian kernel image package to boot,
	// e.g. "linux-image-6.1.0-48-cloud-amd64". By default the package
	// that linux-image-cloud-amd64 depends on is used.
	EnvKernelPackage = "NBDCSI_VM_KERNEL_PKG"
	// EnvAccel selects the QEMU accelerator when Config.Accel is empty:
	// "auto" (the default: KVM if a probe boot with it succeeds, else
	// TCG), "kvm" or "tcg" (forced, no probe). See ChooseAccel.
	EnvAccel = "NBDCSI_VM_ACCEL"
)

// Defaults used for zero fields of Config.
const (
	// DefaultMemoryMB is the guest memory size. The initramfs (≈70 MiB)
	// and every tmpfs live in it.
	DefaultMemoryMB = 2048
	// DefaultCPUs is the number of virtual CPUs.
	DefaultCPUs = 2
	// DefaultTimeout bounds a whole run, including preparing the kernel
	// and the initramfs.
	DefaultTimeout = 10 * time.Minute
	// ModulePath is the Go module whose root holds the default cache.
	ModulePath = "github.com/nbd-csi/nbd-csi"
)

// File is a host file or directory copied into the per-run part of the
// initramfs.
type File struct {
	// HostPath is the file or directory on the host. Symlinks are
	// followed for HostPath itself; inside a directory they are copied
	// as symlinks.
	HostPath string
	// GuestPath is the absolute path inside the VM. Directories of the
	// merged-/usr layout are honoured (/bin/x ends up in /usr/bin/x).
	// Paths under /tmp, /run, /proc, /sys and /dev are hidden by the
	// file systems that init mounts there, so they are rejected.
	GuestPath string
	// Mode overrides the permission bits of a regular file; zero keeps
	// the host file's permissions.
	Mode fs.FileMode
}

// Config describes one VM run. The zero value of every field except
// Script selects a default.
type Config struct {
	// CacheDir holds the downloaded kernel and the cached base
	// initramfs. Default: $NBDCSI_VM_CACHE, else <module root>/.cache/vm
	// where the module root is the nearest directory above the working
	// directory whose go.mod declares ModulePath, else
	// <user cache dir>/nbd-csi-vm.
	CacheDir string
	// MemoryMB is the guest memory in MiB (default DefaultMemoryMB).
	MemoryMB int
	// CPUs is the number of virtual CPUs (default DefaultCPUs).
	CPUs int
	// Files are copied into the VM for this run only.
	Files []File
	// Script is the shell script that the VM runs with busybox sh after
	// booting, from the directory /root. Its exit status becomes the
	// result of Run. Kernel modules are not loaded automatically: use
	// e.g. "modprobe nbd nbds_max=16 max_part=0" in the script.
	Script string
	// Env holds extra KEY=VALUE pairs exported to Script. EnvInVM=1,
	// PATH, HOME and TMPDIR are always set.
	Env []string
	// Timeout bounds the whole run (default DefaultTimeout). The context
	// passed to Run can end it earlier.
	Timeout time.Duration
	// Console receives the serial console of the VM (kernel messages,
	// and the output of Script) as it arrives, with CR LF line ends
	// turned into LF. Nil discards it; errors still quote its last lines.
	Console io.Writer
	// KernelArgs are appended to the kernel command line.
	KernelArgs []string
	// Accel is the QEMU accelerator: AccelAuto, AccelKVM or AccelTCG.
	// Empty means $NBDCSI_VM_ACCEL, else AccelAuto: KVM only after a
	// probe boot with it succeeded, because a /dev/kvm that opens is no
	// proof that nested virtualisation works (ChooseAccel).
	Accel string
	// Tools are extra host programs (absolute paths) added to the cached
	// base image together with their shared libraries.
	Tools []string
	// Modules are extra kernel modules (names as for modprobe) added to
	// the image with their dependencies, besides DefaultModules.
	Modules []string
}

// DefaultModules returns the kernel modules that every image contains
// (with their dependencies): nbd, xfs, tls with the AES-GCM template the
// kernel's TLS layer loads on demand (gcm, ghash), loop, dm-mod, the
// accelerated crc32c, dm-crypt with the ciphers the kernel loads on
// demand for LUKS2's default aes-xts-plain64 (through /sbin/modprobe) and
// the AF_ALG sockets cryptsetup uses, and the sock_diag handlers for unix
// and TCP sockets (the node plugin asks them which sockets the kernel holds).
func DefaultModules() []string {
	return []string{"nbd", "xfs", "libcrc32c", "crc32c-intel", "tls", "loop", "dm-mod",
		"dm-crypt", "xts", "ecb", "aesni-intel", "af_alg", "algif_skcipher", "algif_hash",
		"unix_diag", "inet_diag", "tcp_diag", "gcm", "ghash-clmulni-intel", "ghash-generic"}
}

// InVM reports whether the calling process runs inside the rig's VM.
func InVM() bool { return os.Getenv(EnvInVM) == "1" }

// DefaultCacheDir returns the cache directory used when Config.CacheDir
// is empty (see Config.CacheDir).
func DefaultCacheDir() (string, error) {
	if d := os.Getenv(EnvCache); d != "" {
		return filepath.Abs(d)
	}
	if root, err := moduleRoot(); err == nil {
		return filepath.Join(root, ".cache", "vm"), nil
	}
	uc, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("no cache directory: set %s (%v)", EnvCache, err)
	}
	return filepath.Join(uc, "nbd-csi-vm"), nil
}

// moduleRoot finds the directory of the go.mod declaring ModulePath at
// or above the working directory.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(bytes.TrimSpace(data), []byte("module "+ModulePath)) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod for %s above the working directory", ModulePath)
		}
		dir = parent
	}
}

// isShellName reports whether s is a valid shell variable name.
func isShellName(s string) bool {
	for i, r := range s {
		switch {
		case r == '_', r >= 'A' && r <= 'Z', r >= 'a' && r <= 'z':
		case i > 0 && r >= '0' && r <= '9':
		default:
			return false
		}
	}
	return s != ""
}

// withDefaults validates cfg and returns a copy with defaults filled in.
func (cfg Config) withDefaults() (Config, error) {
	if strings.TrimSpace(cfg.Script) == "" {
		return cfg, fmt.Errorf("vm: Config.Script is empty")
	}
	if cfg.CacheDir == "" {
		d, err := DefaultCacheDir()
		if err != nil {
			return cfg, fmt.Errorf("vm: %w", err)
		}
		cfg.CacheDir = d
	}
	abs, err := filepath.Abs(cfg.CacheDir)
	if err != nil {
		return cfg, fmt.Errorf("vm: cache dir: %w", err)
	}
	cfg.CacheDir = abs
	if cfg.MemoryMB == 0 {
		cfg.MemoryMB = DefaultMemoryMB
	}
	if cfg.MemoryMB < 256 {
		return cfg, fmt.Errorf("vm: MemoryMB %d is too small (the image alone needs about 200 MiB)", cfg.MemoryMB)
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = DefaultCPUs
	}
	if cfg.CPUs < 1 {
		return cfg, fmt.Errorf("vm: CPUs %d is invalid", cfg.CPUs)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Accel == "" {
		cfg.Accel = os.Getenv(EnvAccel)
	}
	if cfg.Accel == "" {
		cfg.Accel = AccelAuto
	}
	if cfg.Accel != AccelAuto && cfg.Accel != AccelTCG && cfg.Accel != AccelKVM {
		return cfg, fmt.Errorf("vm: accelerator %q: want auto, kvm or tcg", cfg.Accel)
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	for _, kv := range cfg.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || !isShellName(k) {
			return cfg, fmt.Errorf("vm: environment entry %q is not KEY=VALUE", kv)
		}
	}
	for _, f := range cfg.Files {
		if err := checkGuestPath(f.GuestPath); err != nil {
			return cfg, fmt.Errorf("vm: file %s: %w", f.HostPath, err)
		}
		if _, err := os.Stat(f.HostPath); err != nil {
			return cfg, fmt.Errorf("vm: file: %w", err)
		}
	}
	for _, t := range cfg.Tools {
		if !filepath.IsAbs(t) {
			return cfg, fmt.Errorf("vm: tool %q is not an absolute path", t)
		}
	}
	return cfg, nil
}

// checkGuestPath rejects guest paths that would be hidden or clash with
// the rig's own files.
func checkGuestPath(p string) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("guest path %q is not absolute", p)
	}
	c := filepath.Clean(p)
	for _, hidden := range []string{"/tmp", "/run", "/proc", "/sys", "/dev", "/vmrun"} {
		if c == hidden || strings.HasPrefix(c, hidden+"/") {
			return fmt.Errorf("guest path %s is under %s, which the rig mounts over or owns", c, hidden)
		}
	}
	if c == "/" || c == "/init" {
		return fmt.Errorf("guest path %s is reserved", c)
	}
	return nil
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
