// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
)

// The node service acts only on paths it owns. A path a request names is
// first resolved the way the kernel would (symlinks and ".." of the longest
// existing prefix, in order), and the result must then be one of the paths
// the kubelet hands a CSI driver, relative to the (resolved) kubelet
// directory:
//
//	plugins/kubernetes.io/csi/DRIVER/SHA256(VOLUME_ID)/globalmount  staging, filesystem (kubelet 1.24+)
//	plugins/kubernetes.io/csi/pv/PV/globalmount                    staging, filesystem (older kubelets)
//	plugins/kubernetes.io/csi/volumeDevices/staging/PV             staging, block
//	pods/POD_UID/volumes/kubernetes.io~csi/PV/mount                target, filesystem
//	plugins/kubernetes.io/csi/volumeDevices/publish/PV/POD_UID     target, block
//	plugins/kubernetes.io/csi/volumeDevices/PV/dev[/POD_UID]       volume path of a block volume (stats, expand)
//
// Where the kubelet left its vol_data.json beside such a path, it must name
// this driver and this volume. Everything else is refused before anything
// is touched, and what is touched is the resolved path, so a symlink or a
// ".." cannot lead the plugin to unmount or delete anything elsewhere.
//
// NodeOptions.PathRoot replaces the layout by "anywhere strictly below this
// directory" for csi-sanity, which makes its own directories.

// pathUse says what a request uses a path for.
type pathUse int

const (
	useStaging pathUse = iota + 1
	useTarget
	// useVolume: NodeGetVolumeStats and NodeExpandVolume accept a target
	// or a staging path.
	useVolume
)

func (u pathUse) String() string {
	switch u {
	case useStaging:
		return "staging target path"
	case useTarget:
		return "target path"
	}
	return "volume path"
}

// maxPathLen bounds a path from a request (PATH_MAX).
const maxPathLen = 4096

// resolvePath resolves p as the kernel would: every symlink and ".." of its
// longest existing prefix is evaluated in order, and the rest, which does not
// exist yet, is appended. A rest that climbs with ".." or starts at a
// dangling symlink is refused: creating it could land anywhere.
func resolvePath(p string) (string, error) {
	if p == "" || !filepath.IsAbs(p) {
		return "", fmt.Errorf("%q is not an absolute path", p)
	}
	if len(p) > maxPathLen || strings.ContainsRune(p, 0) {
		return "", fmt.Errorf("path is longer than %d bytes or contains NUL", maxPathLen)
	}
	parts := strings.Split(p, "/")
	for i := len(parts); i >= 1; i-- {
		prefix := strings.Join(parts[:i], "/")
		if prefix == "" {
			prefix = "/"
		}
		r, err := filepath.EvalSymlinks(prefix)
		if err == nil {
			rest := []string{r}
			for _, c := range parts[i:] {
				switch c {
				case "", ".":
					continue
				case "..":
					return "", fmt.Errorf("%q climbs with \"..\" out of a directory that does not exist", p)
				}
				rest = append(rest, c)
			}
			return filepath.Join(rest...), nil
		}
		if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
			return "", fmt.Errorf("resolve %q: %w", prefix, err)
		}
		// The prefix cannot be resolved; if its last component exists
		// nonetheless it is a symlink to nowhere.
		if fi, lerr := os.Lstat(prefix); lerr == nil && fi.Mode()&fs.ModeSymlink != 0 {
			return "", fmt.Errorf("%s is a symlink to a path that does not exist", prefix)
		}
	}
	return "", fmt.Errorf("resolve %q: no existing prefix", p)
}

// ownedPath resolves p and checks that this driver may use it for
// volumeID (see the comment at the top of this file). It returns the
// resolved path, which is what the caller must act on, or InvalidArgument
// (NotFound for useVolume);
// confirmed is true when the kubelet's own records tie the path to this
// driver and volume (the staging path's hash, or its vol_data.json).
func (s *NodeService) ownedPath(volumeID, p string, use pathUse) (resolved string, confirmed bool, err error) {
	// A volume path (stats, expand) that is not ours is one where this
	// volume does not exist: NotFound, as the spec has it for those RPCs.
	bad := codes.InvalidArgument
	if use == useVolume {
		bad = codes.NotFound
	}
	r, err := resolvePath(p)
	if err != nil {
		return "", false, status.Errorf(bad, "%s: %v", use, err)
	}
	if s.opts.PathRoot != "" {
		root, err := resolvePath(s.opts.PathRoot)
		if err != nil {
			return "", false, status.Errorf(codes.Internal, "path root: %v", err)
		}
		if rel, ok := below(root, r); !ok || rel == "" {
			return "", false, status.Errorf(bad, "%s %s resolves to %s, outside %s", use, p, r, root)
		}
		return r, false, nil
	}
	root, err := resolvePath(s.opts.KubeletDir)
	if err != nil {
		return "", false, status.Errorf(codes.Internal, "kubelet directory: %v", err)
	}
	rel, ok := below(root, r)
	if !ok {
		return "", false, status.Errorf(bad, "%s %s resolves to %s, outside the kubelet directory %s", use, p, r, root)
	}
	c := strings.Split(rel, "/")
	var volData string // the kubelet's vol_data.json for this path
	matched := false
	if use == useStaging || use == useVolume {
		switch {
		case len(c) == 6 && c[0] == "plugins" && c[1] == "kubernetes.io" && c[2] == "csi" && c[5] == "globalmount" &&
			c[3] == s.driverDirName() && len(c[4]) == 64:
			if h := sha256.Sum256([]byte(volumeID)); c[4] != hex.EncodeToString(h[:]) {
				return "", false, status.Errorf(bad, "%s %s is the kubelet's staging path of another volume, not %s", use, p, volumeID)
			}
			volData, matched, confirmed = filepath.Join(root, filepath.Join(c[:5]...), "vol_data.json"), true, true
		case len(c) == 6 && c[0] == "plugins" && c[1] == "kubernetes.io" && c[2] == "csi" && c[3] == "pv" && c[5] == "globalmount":
			volData, matched = filepath.Join(root, filepath.Join(c[:5]...), "vol_data.json"), true
		case len(c) == 6 && c[0] == "plugins" && c[1] == "kubernetes.io" && c[2] == "csi" && c[3] == "volumeDevices" && c[4] == "staging":
			volData, matched = filepath.Join(root, "plugins", "kubernetes.io", "csi", "volumeDevices", c[5], "data", "vol_data.json"), true
		}
	}
	if !matched && use == useVolume && len(c) >= 6 && len(c) <= 7 && c[0] == "plugins" && c[1] == "kubernetes.io" && c[2] == "csi" &&
		c[3] == "volumeDevices" && c[4] != "staging" && c[4] != "publish" && c[5] == "dev" {
		// The kubelet's global map path of a block volume (NodeExpandVolume)
		// and its per-pod entry there, a bind mount of the published
		// device (NodeGetVolumeStats).
		volData, matched = filepath.Join(root, "plugins", "kubernetes.io", "csi", "volumeDevices", c[4], "data", "vol_data.json"), true
	}
	if !matched && (use == useTarget || use == useVolume) {
		switch {
		case len(c) == 6 && c[0] == "pods" && c[2] == "volumes" && c[3] == "kubernetes.io~csi" && c[5] == "mount":
			volData, matched = filepath.Join(root, filepath.Join(c[:5]...), "vol_data.json"), true
		case len(c) == 7 && c[0] == "plugins" && c[1] == "kubernetes.io" && c[2] == "csi" && c[3] == "volumeDevices" && c[4] == "publish":
			volData, matched = filepath.Join(root, "plugins", "kubernetes.io", "csi", "volumeDevices", c[5], "data", "vol_data.json"), true
		}
	}
	if !matched {
		return "", false, status.Errorf(bad, "%s %s (resolved %s) is not where the kubelet puts a CSI %s under %s", use, p, r, use, root)
	}
	ours, err := s.checkVolData(volData, volumeID)
	if err != nil {
		return "", false, status.Errorf(bad, "%s %s: %v", use, p, err)
	}
	return r, confirmed || ours, nil
}

// driverDirName is the driver's directory name in the kubelet's plugin
// directory (the kubelet escapes "/" as "~").
func (s *NodeService) driverDirName() string {
	n := s.opts.DriverName
	if n == "" {
		n = DefaultDriverName
	}
	return strings.ReplaceAll(n, "/", "~")
}

// checkVolData reads the kubelet's record of the volume beside a path, if
// there is one, and refuses a path the kubelet made for another driver or
// volume; ours is true when it names this driver and volume.
func (s *NodeService) checkVolData(path, volumeID string) (ours bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read kubelet's %s: %w", path, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return false, fmt.Errorf("read kubelet's %s: %w", path, err)
	}
	var vd struct {
		Driver string `json:"driverName"`
		Handle string `json:"volumeHandle"`
	}
	if err := json.Unmarshal(b, &vd); err != nil {
		return false, fmt.Errorf("kubelet's %s is not JSON: %w", path, err)
	}
	want := s.opts.DriverName
	if want == "" {
		want = DefaultDriverName
	}
	if vd.Driver != "" && vd.Driver != want {
		return false, fmt.Errorf("the kubelet made it for driver %q, not %q", vd.Driver, want)
	}
	if vd.Handle != "" && vd.Handle != volumeID {
		return false, fmt.Errorf("the kubelet made it for volume %q, not %q", vd.Handle, volumeID)
	}
	return vd.Driver == want && vd.Handle == volumeID, nil
}

// below returns p relative to root if p is root or below it.
func below(root, p string) (string, bool) {
	if p == root {
		return "", true
	}
	prefix := root
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	rel, ok := strings.CutPrefix(p, prefix)
	return rel, ok
}

// removeOwned undoes what a publish or stage left at the resolved path p:
// it unmounts p if it is a mount point (only when owned says this driver
// mounted the volume there: its record or the kubelet's), then removes p if
// it is an empty directory, or an empty regular file when ownFile says this
// plugin created it (a block target). Anything else stays: the plugin never
// deletes a file it did not make, nor a directory with something in it. A
// missing p is fine.
func (s *NodeService) removeOwned(p string, owned, ownFile bool) error {
	if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	mounted, err := s.mounter.IsMountPoint(p)
	switch {
	case err == nil:
	case mount.IsCorruptedMnt(err):
		mounted = true
	default:
		return status.Errorf(codes.Internal, "check mount at %s: %v", p, err)
	}
	if mounted {
		if !owned {
			return status.Errorf(codes.FailedPrecondition, "%s is a mount point, but neither this driver's record nor the kubelet's says the volume is mounted there; left as is", p)
		}
		if err := s.mounter.Unmount(p); err != nil {
			return status.Errorf(codes.Internal, "unmount %s: %v", p, err)
		}
	}
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return status.Errorf(codes.Internal, "inspect %s: %v", p, err)
	}
	switch {
	case fi.IsDir():
		// os.Remove on a directory is rmdir: it refuses one with entries.
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
				return status.Errorf(codes.FailedPrecondition, "%s is not empty after unmounting; left in place", p)
			}
			return status.Errorf(codes.Internal, "remove %s: %v", p, err)
		}
	case fi.Mode().IsRegular() && fi.Size() == 0 && ownFile:
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return status.Errorf(codes.Internal, "remove %s: %v", p, err)
		}
	}
	return nil
}
