// SPDX-License-Identifier: Apache-2.0

package main

import (
	"archive/tar"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBuild: the archive holds a manifest naming the image, its config
// (architecture, user, labels, entrypoint) and one layer with the files.
func TestBuild(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/bin/x"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "x.tar")
	img := image{name: "example.org/x:v1", root: root, entrypoint: `["/usr/bin/x"]`, arch: "arm64", user: "65532:65532",
		labels: map[string]string{"org.opencontainers.image.version": "v1"}}
	if err := build(img, out); err != nil {
		t.Fatal(err)
	}
	files := readTar(t, out)
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil || len(manifest) != 1 {
		t.Fatalf("manifest.json: %v %s", err, files["manifest.json"])
	}
	m := manifest[0]
	if len(m.RepoTags) != 1 || m.RepoTags[0] != img.name || len(m.Layers) != 1 {
		t.Fatalf("manifest %+v", m)
	}
	var config struct {
		Architecture string
		Config       struct {
			User       string
			Entrypoint []string
			Labels     map[string]string
		}
	}
	if err := json.Unmarshal(files[m.Config], &config); err != nil {
		t.Fatal(err)
	}
	if config.Architecture != "arm64" || config.Config.User != "65532:65532" || strings.Join(config.Config.Entrypoint, " ") != "/usr/bin/x" ||
		config.Config.Labels["org.opencontainers.image.version"] != "v1" {
		t.Errorf("config %+v", config)
	}
	layer := filepath.Join(t.TempDir(), "layer.tar")
	if err := os.WriteFile(layer, files[m.Layers[0]], 0o644); err != nil {
		t.Fatal(err)
	}
	if got := string(readTar(t, layer)["usr/bin/x"]); got != "#!/bin/sh\n" {
		t.Errorf("usr/bin/x in the layer: %q", got)
	}
}

func readTar(t *testing.T, path string) map[string][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = b
	}
}

// TestBuildRefusesMountPointSymlinks: a root whose /proc is a symlink (what
// debootstrap leaves when it believes it runs in a container) is refused
// with the reason: runc would refuse every container of the image
// ("filesystem \"proc\" must be mounted on ordinary directory"). So are a
// /sys or /dev that are files; empty directories and absent ones are fine.
func TestBuildRefusesMountPointSymlinks(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func(root string) error
		bad  bool
	}{
		{"proc symlink", func(root string) error { return os.Symlink("/proc", filepath.Join(root, "proc")) }, true},
		{"sys file", func(root string) error { return os.WriteFile(filepath.Join(root, "sys"), nil, 0o644) }, true},
		{"dev symlink", func(root string) error { return os.Symlink("/dev", filepath.Join(root, "dev")) }, true},
		{"directories", func(root string) error {
			for _, d := range []string{"proc", "sys", "dev"} {
				if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
					return err
				}
			}
			return nil
		}, false},
		{"absent", func(string) error { return nil }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if err := tc.make(root); err != nil {
				t.Fatal(err)
			}
			err := build(image{name: "example.org/x:v1", root: root, arch: "amd64"}, filepath.Join(t.TempDir(), "x.tar"))
			switch {
			case tc.bad && err == nil:
				t.Fatal("build succeeded; runc would refuse every container of this image")
			case tc.bad && !strings.Contains(err.Error(), "not a directory"):
				t.Fatalf("error %q does not say why", err)
			case !tc.bad && err != nil:
				t.Fatal(err)
			}
		})
	}
}

// TestBuildLeavesNoPartialImage: the e2e scripts take an existing image tar
// as built (cluster.sh's build_sidecar), and .ci/run kills the builds it
// started beside make test when that fails. A build killed half-way must
// leave no file under the output name, or a whole image. A child process
// builds an image with a 64 MiB layer and is killed as soon as the output
// name exists.
func TestBuildLeavesNoPartialImage(t *testing.T) {
	if root := os.Getenv("MKIMAGE_TEST_ROOT"); root != "" {
		if err := build(image{name: "example.org/big:v1", root: root, arch: "amd64"}, os.Getenv("MKIMAGE_TEST_OUT")); err != nil {
			t.Fatal(err)
		}
		return
	}
	root := t.TempDir()
	big := make([]byte, 64<<20)
	for i := range big {
		big[i] = byte(i * 7)
	}
	if err := os.WriteFile(filepath.Join(root, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "big.tar")
	cmd := exec.Command(os.Args[0], "-test.run=^TestBuildLeavesNoPartialImage$")
	cmd.Env = append(os.Environ(), "MKIMAGE_TEST_ROOT="+root, "MKIMAGE_TEST_OUT="+out)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	killed := false
	for !killed {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("the child build failed: %v", err)
			}
			done <- nil
			killed = true // finished before it could be killed: a whole image
		case <-time.After(time.Millisecond):
			if _, err := os.Stat(out); err == nil {
				if err := cmd.Process.Kill(); err != nil {
					t.Fatal(err)
				}
				killed = true
			}
		}
	}
	err := <-done
	if _, serr := os.Stat(out); serr != nil {
		return // nothing under the final name: the scripts build again
	}
	f, ferr := os.Open(out)
	if ferr != nil {
		t.Fatal(ferr)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	var names []string
	for {
		h, terr := tr.Next()
		if terr == io.EOF {
			break
		}
		if terr == nil {
			_, terr = io.Copy(io.Discard, tr)
		}
		if terr != nil {
			t.Fatalf("big.tar is not a whole image (killed %v): %v", err != nil, terr)
		}
		names = append(names, h.Name)
	}
	if len(names) == 0 || names[len(names)-1] != "manifest.json" {
		t.Fatalf("big.tar is not a whole image (killed %v): entries %v", err != nil, names)
	}
}
