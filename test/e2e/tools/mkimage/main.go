// SPDX-License-Identifier: Apache-2.0

// Command mkimage writes a container image as a docker-archive tar (what
// `docker save` writes and `ctr images import` reads) from a root
// filesystem directory, without a container engine:
//
//	mkimage -name registry.example/x:v1 -rootfs DIR -entrypoint '["/bin/x"]' -out x.tar
//
// -arch names the architecture of the files (default amd64), -user the
// user the image runs as, -label adds OCI labels.
//
// One layer; every file owned by root; modes, symlinks and hard links as in
// DIR.
package main

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func main() {
	name := flag.String("name", "", "image reference, e.g. registry.example/x:v1")
	root := flag.String("rootfs", "", "root filesystem directory")
	entrypoint := flag.String("entrypoint", "", "entrypoint as a JSON array")
	cmd := flag.String("cmd", "", "command as a JSON array")
	out := flag.String("out", "", "output tar")
	arch := flag.String("arch", "amd64", "architecture of the files in -rootfs (GOARCH spelling: amd64, arm64)")
	user := flag.String("user", "", "user (and group) the image runs as, e.g. 65532:65532")
	var env, labels multi
	flag.Var(&env, "env", "KEY=VALUE (repeatable)")
	flag.Var(&labels, "label", "KEY=VALUE image label (repeatable)")
	flag.Parse()
	if *name == "" || *root == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "usage: mkimage -name REF -rootfs DIR -out FILE [-entrypoint JSON] [-cmd JSON] [-env K=V]...")
		os.Exit(2)
	}
	img := image{name: *name, root: *root, entrypoint: *entrypoint, cmd: *cmd, env: env, arch: *arch, user: *user, labels: map[string]string{}}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			fmt.Fprintf(os.Stderr, "mkimage: -label %q: want KEY=VALUE\n", l)
			os.Exit(2)
		}
		img.labels[k] = v
	}
	if err := build(img, *out); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

// image is what mkimage writes: a name, one layer from root, and the config.
type image struct {
	name, root, entrypoint, cmd string
	env                         []string
	arch, user                  string
	labels                      map[string]string
}

func build(img image, out string) error {
	name, root, entrypoint, cmd, env := img.name, img.root, img.entrypoint, img.cmd, img.env
	var ep, cm []string
	if entrypoint != "" {
		if err := json.Unmarshal([]byte(entrypoint), &ep); err != nil {
			return fmt.Errorf("-entrypoint: %w", err)
		}
	}
	if cmd != "" {
		if err := json.Unmarshal([]byte(cmd), &cm); err != nil {
			return fmt.Errorf("-cmd: %w", err)
		}
	}
	if err := checkMountPoints(root); err != nil {
		return err
	}
	layer, err := os.CreateTemp(filepath.Dir(out), ".layer-*")
	if err != nil {
		return err
	}
	defer os.Remove(layer.Name())
	defer layer.Close()
	h := sha256.New()
	if err := writeLayer(io.MultiWriter(layer, h), root); err != nil {
		return err
	}
	diffID := hex.EncodeToString(h.Sum(nil))
	if !hasPath(env) {
		env = append(env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	cfg := map[string]any{"Entrypoint": ep, "Cmd": cm, "Env": env, "WorkingDir": "/"}
	if img.user != "" {
		cfg["User"] = img.user
	}
	if len(img.labels) > 0 {
		cfg["Labels"] = img.labels
	}
	config, err := json.Marshal(map[string]any{
		"architecture": img.arch, "os": "linux", "created": time.Unix(0, 0).UTC(),
		"config": cfg,
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + diffID}},
	})
	if err != nil {
		return err
	}
	cs := sha256.Sum256(config)
	configName := hex.EncodeToString(cs[:]) + ".json"
	manifest, err := json.Marshal([]map[string]any{{"Config": configName, "RepoTags": []string{name}, "Layers": []string{diffID + "/layer.tar"}}})
	if err != nil {
		return err
	}
	// The archive is written under a temporary name and renamed when whole:
	// the e2e scripts take an existing image tar as built, so a build killed
	// half-way must not leave one under the final name.
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(n string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	if err := add(configName, config); err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: diffID + "/", Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
		return err
	}
	st, err := layer.Stat()
	if err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: diffID + "/layer.tar", Mode: 0o644, Size: st.Size(), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := layer.Seek(0, io.SeekStart); err != nil {
		return err
	}
	if _, err := io.Copy(tw, layer); err != nil {
		return err
	}
	if err := add("manifest.json", manifest); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), out)
}

func hasPath(env []string) bool {
	for _, e := range env {
		if strings.HasPrefix(e, "PATH=") {
			return true
		}
	}
	return false
}

// checkMountPoints refuses a root whose /proc, /sys or /dev exists as
// something other than a directory: the container runtime mounts them
// there, and runc refuses to start the container ("must be mounted on
// ordinary directory"). debootstrap leaves /proc a symlink to the host's
// when it believes it runs in a container.
func checkMountPoints(root string) error {
	for _, d := range []string{"proc", "sys", "dev"} {
		fi, err := os.Lstat(filepath.Join(root, d))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return fmt.Errorf("-rootfs %s: /%s is a %v, not a directory: the container runtime mounts %s there and refuses anything else", root, d, fi.Mode().Type(), d)
		}
	}
	return nil
}

// writeLayer tars root: regular files, directories, symlinks, hard links
// (by inode), owned by root.
func writeLayer(w io.Writer, root string) error {
	tw := tar.NewWriter(w)
	links := map[uint64]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		target := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(path); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, target)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if info.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "root", "root"
		hdr.ModTime = time.Unix(0, 0)
		hdr.Format = tar.FormatPAX
		if st, ok := info.Sys().(*syscall.Stat_t); ok && info.Mode().IsRegular() && st.Nlink > 1 {
			if first, seen := links[st.Ino]; seen {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
				return tw.WriteHeader(hdr)
			}
			links[st.Ino] = hdr.Name
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !info.Mode().IsRegular() {
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
	if err != nil {
		return err
	}
	return tw.Close()
}
