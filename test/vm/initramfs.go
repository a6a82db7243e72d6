// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"bufio"
	"bytes"

	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// imageFormat is bumped whenever the layout of the base image changes,
// to invalidate cached images.
const imageFormat = "nbdcsi-vm-base-4"

// nbdkitDir is where Debian installs nbdkit plugins and filters.
const nbdkitDir = "/usr/lib/x86_64-linux-gnu/nbdkit"

// DefaultTools returns the host programs that every base image contains
// with their shared libraries, at their host paths: NBD servers and
// clients, file system tools, and the util-linux and coreutils programs
// whose GNU behaviour tests rely on (busybox provides everything else).
// Besides these the image holds the nbdkit plugins listed by
// NBDKitPlugins and all installed nbdkit filters.
func DefaultTools() []string {
	return []string{
		// NBD servers and clients.
		"/usr/bin/nbdkit", "/usr/bin/qemu-nbd", "/usr/bin/qemu-img",
		"/usr/bin/nbd-server", "/usr/sbin/nbd-client",
		"/usr/bin/nbdinfo", "/usr/bin/nbdcopy",
		// File systems.
		"/usr/sbin/mke2fs", "/usr/sbin/mkfs.ext4", "/usr/sbin/e2fsck", "/usr/sbin/fsck.ext4",
		"/usr/sbin/resize2fs", "/usr/sbin/tune2fs", "/usr/sbin/dumpe2fs",
		"/usr/sbin/mkfs.xfs", "/usr/sbin/xfs_growfs", "/usr/sbin/xfs_repair",
		"/usr/sbin/xfs_db", "/usr/sbin/xfs_admin", "/usr/sbin/fsck.xfs",
		// util-linux: mount-utils and tests exec these by name.
		"/usr/bin/mount", "/usr/bin/umount", "/usr/sbin/blkid", "/usr/sbin/blockdev",
		"/usr/bin/lsblk", "/usr/bin/findmnt", "/usr/sbin/fsfreeze", "/usr/sbin/wipefs",
		"/usr/sbin/losetup",
		// Encrypted volumes: cryptsetup, and libgcc_s, which it dlopens
		// (ldd does not list it; without it cryptsetup aborts in
		// pthread_exit).
		"/usr/sbin/cryptsetup", "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
		// coreutils with GNU options.
		"/usr/bin/dd", "/usr/bin/sha256sum", "/usr/bin/truncate", "/usr/bin/date",
		"/usr/bin/stat", "/usr/bin/timeout",
	}
}

// NBDKitPlugins returns the nbdkit plugins the base image contains
// (memory and file are required, the others are added when installed).
// Plugins that pull in large libraries (curl, ssh, torrent) are left out.
func NBDKitPlugins() []string {
	return []string{"memory", "file", "null", "zero", "pattern", "data", "full",
		"sparse-random", "random", "sh", "eval", "nbd", "info", "split",
		"partitioning", "ondemand", "tmpdisk", "linuxdisk"}
}

// toolPackage maps a tool to the Debian package that provides it, for
// error messages.
func toolPackage(tool string) string {
	switch filepath.Base(tool) {
	case "nbdkit":
		return "nbdkit"
	case "cryptsetup":
		return "cryptsetup-bin"
	case "libgcc_s.so.1":
		return "libgcc-s1"
	case "qemu-nbd", "qemu-img":
		return "qemu-utils"
	case "nbd-server":
		return "nbd-server"
	case "nbd-client":
		return "nbd-client"
	case "nbdinfo", "nbdcopy":
		return "libnbd-bin"
	case "mke2fs", "mkfs.ext4", "e2fsck", "fsck.ext4", "resize2fs", "tune2fs", "dumpe2fs":
		return "e2fsprogs"
	case "mkfs.xfs", "xfs_growfs", "xfs_repair", "xfs_db", "xfs_admin", "fsck.xfs":
		return "xfsprogs"
	case "dd", "sha256sum", "truncate", "date", "stat", "timeout":
		return "coreutils"
	}
	return "util-linux"
}

// findBusybox returns the path of a statically linked busybox.
func findBusybox() (string, error) {
	for _, p := range []string{"/usr/bin/busybox", "/bin/busybox"} {
		if !fileExists(p) {
			continue
		}
		static, err := isStaticELF(p)
		if err != nil {
			return "", fmt.Errorf("%s: %w", p, err)
		}
		if !static {
			return "", fmt.Errorf("%s is dynamically linked: install busybox-static (apt-get install busybox-static)", p)
		}
		return p, nil
	}
	return "", fmt.Errorf("no busybox: install busybox-static (apt-get install busybox-static)")
}

// baseInputs lists the host files the base image is built from.
type baseInputs struct {
	busybox string
	tools   []string // programs and nbdkit plugins/filters
	etc     []string // host configuration files copied as they are
}

func collectInputs(cfg Config) (baseInputs, error) {
	bb, err := findBusybox()
	if err != nil {
		return baseInputs{}, err
	}
	tools, missing := hostTools(cfg.Tools)
	if len(missing) > 0 {
		return baseInputs{}, fmt.Errorf("missing host tools: %s", strings.Join(missing, ", "))
	}
	in := baseInputs{busybox: bb, tools: tools}
	for _, e := range []string{"/etc/mke2fs.conf", "/etc/services", "/etc/protocols"} {
		if fileExists(e) {
			in.etc = append(in.etc, e)
		}
	}
	return in, nil
}

// hostTools returns the programs, nbdkit plugins and filters of the base
// image that exist on the host, and a description of each required one
// that is missing.
func hostTools(extra []string) (found, missing []string) {
	for _, t := range append(DefaultTools(), extra...) {
		if !fileExists(t) {
			missing = append(missing, fmt.Sprintf("%s (package %s)", t, toolPackage(t)))
			continue
		}
		found = append(found, t)
	}
	for _, name := range NBDKitPlugins() {
		p := filepath.Join(nbdkitDir, "plugins", "nbdkit-"+name+"-plugin.so")
		switch {
		case fileExists(p):
			found = append(found, p)
		case name == "memory" || name == "file":
			missing = append(missing, fmt.Sprintf("%s (package nbdkit)", p))
		}
	}
	filters, _ := filepath.Glob(filepath.Join(nbdkitDir, "filters", "nbdkit-*-filter.so"))
	return append(found, filters...), missing
}

// baseImage is a cached base initramfs.
type baseImage struct {
	path     string
	manifest manifest
}

// manifest records the directories and symlinks of a base image, so
// that the per-run archive can place files through the same layout
// (e.g. /bin → usr/bin).
type manifest struct {
	Format   string            `json:"format"`
	Release  string            `json:"release"`
	Dirs     map[string]uint32 `json:"dirs"`
	Symlinks map[string]string `json:"symlinks"`
	Files    int               `json:"files"`
}

// ensureBase returns the cached base image for cfg and k, building it
// when its inputs changed. The key covers the identity (size, mtime,
// mode) of every listed program, plugin and configuration file, the
// kernel modules and the init script; shared libraries are resolved
// only when building, so a library upgrade alone keeps the old (still
// self-consistent) image.
func ensureBase(ctx context.Context, cfg Config, k kernel, logf func(string, ...any)) (baseImage, error) {
	in, err := collectInputs(cfg)
	if err != nil {
		return baseImage{}, err
	}
	h := newHasher()
	h.add("format", imageFormat)
	h.add("init", initScript)
	h.add("release", k.release)
	h.add("modules", k.modRoot)
	h.addStat(in.busybox)
	for _, t := range in.tools {
		h.addStat(t)
	}
	for _, e := range in.etc {
		h.addStat(e)
	}
	dir := filepath.Join(cfg.CacheDir, "initramfs")
	img := baseImage{path: filepath.Join(dir, "base-"+h.sum()+".cpio")}
	if m, err := readManifest(img.path + ".json"); err == nil && fileExists(img.path) {
		img.manifest = m
		now := time.Now()
		_ = os.Chtimes(img.path, now, now) // marks it as in use for pruneBases
		return img, nil
	}
	unlock, err := lockFile(ctx, filepath.Join(dir, ".lock"))
	if err != nil {
		return baseImage{}, err
	}
	defer unlock()
	if m, err := readManifest(img.path + ".json"); err == nil && fileExists(img.path) {
		img.manifest = m
		return img, nil
	}
	logf("vm: building base initramfs %s", img.path)
	started := time.Now()
	t, err := buildBaseTree(ctx, in, k)
	if err != nil {
		return baseImage{}, fmt.Errorf("base initramfs: %w", err)
	}
	// The image stays uncompressed: under TCG the guest kernel needs
	// about 1.5 s longer to boot from a gzip'd one, which costs more
	// than the disk space saved.
	err = writeFileAtomic(img.path, 0o644, t.writeCPIO)
	if err != nil {
		return baseImage{}, fmt.Errorf("base initramfs: %w", err)
	}
	img.manifest = manifest{Format: imageFormat, Release: k.release, Dirs: map[string]uint32{}, Symlinks: map[string]string{}}
	for key, n := range t.nodes {
		switch n.kind {
		case kindDir:
			img.manifest.Dirs[key] = n.perm
		case kindSymlink:
			img.manifest.Symlinks[key] = n.target
		case kindFile:
			img.manifest.Files++
		}
	}
	data, err := json.MarshalIndent(img.manifest, "", "  ")
	if err != nil {
		return baseImage{}, err
	}
	err = writeFileAtomic(img.path+".json", 0o644, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
	if err != nil {
		return baseImage{}, err
	}
	if fi, err := os.Stat(img.path); err == nil {
		logf("vm: built base initramfs (%d files, %d MiB) in %s", img.manifest.Files, fi.Size()>>20,
			time.Since(started).Round(time.Millisecond))
	}
	pruneBases(dir, img.path, logf)
	return img, nil
}

// baseMaxIdle is how long an unused base image stays in the cache.
const baseMaxIdle = 7 * 24 * time.Hour

// pruneBases removes base images (other than keep) that no run used for
// baseMaxIdle; every run touches the image it uses.
func pruneBases(dir, keep string, logf func(string, ...any)) {
	old, _ := filepath.Glob(filepath.Join(dir, "base-*.cpio"))
	for _, p := range old {
		fi, err := os.Stat(p)
		if p == keep || err != nil || time.Since(fi.ModTime()) < baseMaxIdle {
			continue
		}
		logf("vm: removing unused base initramfs %s", p)
		_ = os.Remove(p)
		_ = os.Remove(p + ".json")
	}
}

func readManifest(p string) (manifest, error) {
	var m manifest
	data, err := os.ReadFile(p)
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return m, fmt.Errorf("%s: %w", p, err)
	}
	if m.Format != imageFormat {
		return m, fmt.Errorf("%s: format %q, want %q", p, m.Format, imageFormat)
	}
	return m, nil
}

// buildBaseTree assembles the base image: the merged-/usr layout of the
// host, busybox and its applets, the tools with their libraries, the
// kernel modules, a minimal /etc and /init.
func buildBaseTree(ctx context.Context, in baseInputs, k kernel) (*tree, error) {
	t := newTree()
	// Mirror top-level symlinks such as /bin → usr/bin first, so that
	// everything below lands in one place whatever path names it.
	for _, d := range []string{"/bin", "/sbin", "/lib", "/lib64"} {
		if fi, err := os.Lstat(d); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
			target, err := os.Readlink(d)
			if err != nil {
				return nil, err
			}
			if err := t.addSymlink(d, target); err != nil {
				return nil, err
			}
		}
	}
	for _, d := range []struct {
		path string
		perm fs.FileMode
	}{
		{"/proc", 0o555}, {"/sys", 0o555}, {"/dev", 0o755}, {"/run", 0o755},
		{"/tmp", 0o777 | fs.ModeSticky}, {"/var/tmp", 0o777 | fs.ModeSticky},
		{"/root", 0o700}, {"/mnt", 0o755}, {"/etc", 0o755}, {"/usr/bin", 0o755},
		{"/usr/sbin", 0o755}, {"/usr/lib", 0o755},
	} {
		if err := t.mkdir(d.path, d.perm); err != nil {
			return nil, err
		}
	}
	// The kernel opens /dev/console for init before devtmpfs is mounted.
	if err := t.addCharDev("/dev/console", 0o600, 5, 1); err != nil {
		return nil, err
	}
	if err := t.addCharDev("/dev/null", 0o666, 1, 3); err != nil {
		return nil, err
	}
	// Real tools first: busybox applets only fill the remaining names.
	for _, p := range append(append([]string{}, in.tools...), in.etc...) {
		if err := t.addHost(p); err != nil {
			return nil, err
		}
	}
	libs, err := sharedLibs(ctx, in.tools)
	if err != nil {
		return nil, err
	}
	for _, l := range libs {
		if err := t.addHost(l); err != nil {
			return nil, err
		}
	}
	if err := addBusybox(ctx, t, in.busybox); err != nil {
		return nil, err
	}
	modDir := filepath.Join("/lib/modules", k.release)
	if err := t.addGuestCopy(filepath.Join(k.modRoot, modDir), modDir, 0); err != nil {
		return nil, fmt.Errorf("kernel modules: %w", err)
	}
	etc := map[string]string{
		"/etc/passwd": "root:x:0:0:root:/root:/bin/sh\n" +
			"nbd:x:100:101:NBD server:/var/lib/nbd:/usr/sbin/nologin\n" +
			"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
		"/etc/group":         "root:x:0:\ndisk:x:6:\nnbd:x:101:\nnogroup:x:65534:\n",
		"/etc/shadow":        "root:*:19000:0:99999:7:::\n",
		"/etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\nservices: files\n",
		"/etc/hosts":         "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"/etc/hostname":      "nbdcsi-vm\n",
		"/init":              initScript,
	}
	for p, content := range etc {
		perm := fs.FileMode(0o644)
		switch p {
		case "/init":
			perm = 0o755
		case "/etc/shadow":
			perm = 0o600
		}
		if err := t.addData(p, []byte(content), perm); err != nil {
			return nil, err
		}
	}
	if err := t.addSymlink("/etc/mtab", "../proc/self/mounts"); err != nil {
		return nil, err
	}
	return t, nil
}

// addBusybox adds busybox and a symlink for each applet whose name is
// not taken by a real tool.
func addBusybox(ctx context.Context, t *tree, bb string) error {
	if err := t.addHost(bb); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, bb, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("%s --list-full: %w", bb, err)
	}
	var applets []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if a := strings.TrimSpace(sc.Text()); a != "" {
			applets = append(applets, "/"+a)
		}
	}
	sort.Strings(applets)
	for _, a := range applets {
		if t.exists(a) {
			continue
		}
		if err := t.addSymlink(a, bb); err != nil {
			return fmt.Errorf("busybox applet %s: %w", a, err)
		}
	}
	return nil
}
