// SPDX-License-Identifier: Apache-2.0

package crypt_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	. "github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/crypt/crypttest"
)

type env struct {
	c     *Crypt
	tools *crypttest.Tools
	dev   string
}

// newEnv returns a Crypt on the fake tools and a blank 32 MiB "device".
func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	devDir := filepath.Join(dir, "dev")
	if err := os.MkdirAll(devDir, 0o755); err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(devDir, "nbd0")
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(dev, 32<<20); err != nil {
		t.Fatal(err)
	}
	tools := crypttest.NewTools(devDir)
	return &env{c: New(tools, Options{DevDir: devDir, SysDir: tools.SysDir()}), tools: tools, dev: dev}
}

func writeAt(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// noSecretInArgs fails if a passphrase appears in any argument.
func noSecretInArgs(t *testing.T, tools *crypttest.Tools, secrets ...string) {
	t.Helper()
	for _, c := range tools.Commands() {
		for _, a := range c.Args {
			for _, s := range secrets {
				if strings.Contains(a, s) {
					t.Errorf("a passphrase appears in the arguments of %s %v", c.Name, c.Args[0])
				}
			}
		}
	}
}

func TestMapperName(t *testing.T) {
	a, b := MapperName("vol-1"), MapperName("vol-2")
	if a == b || a != MapperName("vol-1") || !strings.HasPrefix(a, "nbdcsi-") || len(a) > 127 {
		t.Fatalf("MapperName: %q %q", a, b)
	}
	if strings.ContainsAny(MapperName(strings.Repeat("/x y", 100)), "/ ") {
		t.Fatal("mapper name carries characters of the volume ID")
	}
}

func TestEnsureOpenFormatsBlankOnceAndReopens(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	name := MapperName("vol")
	formatted, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("secret-1"), false)
	if err != nil || !formatted {
		t.Fatalf("first EnsureOpen: formatted=%v err=%v", formatted, err)
	}
	// Repeated: the mapping is active on the same device.
	if formatted, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("secret-1"), false); err != nil || formatted {
		t.Fatalf("repeated EnsureOpen: formatted=%v err=%v", formatted, err)
	}
	if err := e.c.Close(ctx, name); err != nil {
		t.Fatal(err)
	}
	if err := e.c.Close(ctx, name); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if formatted, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("secret-1"), false); err != nil || formatted {
		t.Fatalf("reopen: formatted=%v err=%v", formatted, err)
	}
	if n := strings.Count(strings.Join(e.tools.Actions(), " "), "luksFormat"); n != 1 {
		t.Fatalf("luksFormat ran %d times, want 1", n)
	}
	noSecretInArgs(t, e.tools, "secret-1")
}

func TestEnsureOpenWrongKeyNeverFormats(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	name := MapperName("vol")
	if _, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("right"), false); err != nil {
		t.Fatal(err)
	}
	if err := e.c.Close(ctx, name); err != nil {
		t.Fatal(err)
	}
	before := len(e.tools.Actions())
	_, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("wrong"), false)
	if !errors.Is(err, ErrWrongKey) {
		t.Fatalf("wrong key: got %v, want ErrWrongKey", err)
	}
	if slices.Contains(e.tools.Actions()[before:], "luksFormat") {
		t.Fatal("a wrong key led to luksFormat")
	}
	if !e.tools.Opens(e.dev, []byte("right")) {
		t.Fatal("the right key no longer opens the header")
	}
	// An active mapping does not let a wrong key in either.
	if _, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("right"), false); err != nil {
		t.Fatal(err)
	}
}

func TestEnsureOpenRefusesForeignData(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		write func(t *testing.T, dev string)
		found string
	}{
		{"ext4", func(t *testing.T, dev string) { writeAt(t, dev, 0x438, []byte{0x53, 0xef}) }, "ext4"},
		{"data without signature", func(t *testing.T, dev string) { writeAt(t, dev, 5<<20, []byte{1}) }, "non-zero data at byte 5242880"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			tc.write(t, e.dev)
			_, err := e.c.EnsureOpen(ctx, e.dev, MapperName("v"), []byte("k"), false)
			var fe *ForeignDataError
			if !errors.As(err, &fe) || !strings.Contains(fe.Found, tc.found) {
				t.Fatalf("got %v, want ForeignDataError naming %q", err, tc.found)
			}
			if slices.Contains(e.tools.Actions(), "luksFormat") {
				t.Fatal("a device with foreign data was formatted")
			}
			if err := e.c.Format(ctx, e.dev, []byte("k")); !errors.As(err, &fe) {
				t.Fatalf("Format: got %v, want ForeignDataError", err)
			}
		})
	}
}

func TestProbeSecondaryHeader(t *testing.T) {
	e := newEnv(t)
	// A LUKS2 device whose primary header was overwritten is still LUKS
	// (cryptsetup repair restores it from the secondary): never format it.
	writeAt(t, e.dev, 0x4000, []byte("SKUL\xba\xbe"))
	got, err := e.c.Probe(context.Background(), e.dev)
	if err != nil || got != LUKS {
		t.Fatalf("Probe: %v %v, want LUKS", got, err)
	}
}

func TestEnsureOpenReadOnlyBlank(t *testing.T) {
	e := newEnv(t)
	if _, err := e.c.EnsureOpen(context.Background(), e.dev, MapperName("v"), []byte("k"), true); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("got %v, want ErrReadOnly", err)
	}
}

func TestOpenNameOnOtherDeviceIsBusy(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	name := MapperName("v")
	if _, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("k"), false); err != nil {
		t.Fatal(err)
	}
	other := e.dev + "-other"
	if err := os.WriteFile(other, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.c.Open(ctx, other, name, []byte("k"), false); !errors.Is(err, ErrBusy) {
		t.Fatalf("got %v, want ErrBusy", err)
	}
}

func TestCloseBusy(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	name := MapperName("v")
	if _, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("k"), false); err != nil {
		t.Fatal(err)
	}
	e.tools.SetBusy(name, true)
	if err := e.c.Close(ctx, name); !errors.Is(err, ErrBusy) {
		t.Fatalf("got %v, want ErrBusy", err)
	}
}

func TestBadPassphrases(t *testing.T) {
	e := newEnv(t)
	for _, k := range [][]byte{nil, {}, bytes.Repeat([]byte("x"), MaxPassphrase+1)} {
		if _, err := e.c.EnsureOpen(context.Background(), e.dev, "n", k, false); !errors.Is(err, ErrBadKey) {
			t.Errorf("passphrase of %d bytes: got %v, want ErrBadKey", len(k), err)
		}
	}
	if len(e.tools.Commands()) != 0 {
		t.Fatalf("bad passphrases ran %d commands", len(e.tools.Commands()))
	}
}

func TestSecretKeySource(t *testing.T) {
	ctx := context.Background()
	if _, err := (SecretKeySource{}).Passphrase(ctx, "v", map[string]string{"tls.key": "x"}); !errors.Is(err, ErrNoKey) {
		t.Fatalf("missing: got %v, want ErrNoKey", err)
	}
	if _, err := (SecretKeySource{}).Passphrase(ctx, "v", map[string]string{SecretPassphraseKey: ""}); !errors.Is(err, ErrBadKey) {
		t.Fatalf("empty: got %v, want ErrBadKey", err)
	}
	long := strings.Repeat("s", MaxPassphrase+1)
	_, err := (SecretKeySource{}).Passphrase(ctx, "v", map[string]string{SecretPassphraseKey: long})
	if !errors.Is(err, ErrBadKey) || strings.Contains(err.Error(), long[:16]) {
		t.Fatalf("long: got %v, want ErrBadKey without the value", err)
	}
	p, err := (SecretKeySource{}).Passphrase(ctx, "v", map[string]string{SecretPassphraseKey: "pass\n"})
	if err != nil || string(p) != "pass\n" {
		t.Fatalf("got %q %v, want the bytes unchanged", p, err)
	}
}

func TestRotate(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	name := MapperName("v")
	if _, err := e.c.EnsureOpen(ctx, e.dev, name, []byte("old-pass"), false); err != nil {
		t.Fatal(err)
	}
	if err := e.c.Rotate(ctx, e.dev, []byte("old-pass"), []byte("new-pass")); err != nil {
		t.Fatal(err)
	}
	if e.tools.Opens(e.dev, []byte("old-pass")) || !e.tools.Opens(e.dev, []byte("new-pass")) {
		t.Fatalf("after rotation: slots %q", e.tools.Slots(e.dev))
	}
	// Repeating it is fine (already rotated); the mapping stayed active.
	if err := e.c.Rotate(ctx, e.dev, []byte("old-pass"), []byte("new-pass")); err != nil {
		t.Fatalf("repeated rotation: %v", err)
	}
	if _, ok := e.tools.Active(name); !ok {
		t.Fatal("rotation closed the mapping")
	}
	noSecretInArgs(t, e.tools, "old-pass", "new-pass")
}

func TestRotateRefusals(t *testing.T) {
	ctx := context.Background()
	t.Run("wrong old key", func(t *testing.T) {
		e := newEnv(t)
		if err := e.c.Format(ctx, e.dev, []byte("k1")); err != nil {
			t.Fatal(err)
		}
		if err := e.c.Rotate(ctx, e.dev, []byte("nope"), []byte("k2")); !errors.Is(err, ErrWrongKey) {
			t.Fatalf("got %v, want ErrWrongKey", err)
		}
		if len(e.tools.Slots(e.dev)) != 1 || !e.tools.Opens(e.dev, []byte("k1")) {
			t.Fatalf("slots changed: %q", e.tools.Slots(e.dev))
		}
	})
	t.Run("same key", func(t *testing.T) {
		e := newEnv(t)
		if err := e.c.Rotate(ctx, e.dev, []byte("k1"), []byte("k1")); !errors.Is(err, ErrBadKey) {
			t.Fatalf("got %v, want ErrBadKey", err)
		}
	})
	t.Run("not LUKS", func(t *testing.T) {
		e := newEnv(t)
		if err := e.c.Rotate(ctx, e.dev, []byte("k1"), []byte("k2")); !errors.Is(err, ErrNotLUKS) {
			t.Fatalf("got %v, want ErrNotLUKS", err)
		}
	})
	t.Run("new slot unproven keeps the old", func(t *testing.T) {
		e := newEnv(t)
		if err := e.c.Format(ctx, e.dev, []byte("k1")); err != nil {
			t.Fatal(err)
		}
		e.tools.AddNoop = true
		if err := e.c.Rotate(ctx, e.dev, []byte("k1"), []byte("k2")); !errors.Is(err, ErrWrongKey) {
			t.Fatalf("got %v, want the proof to fail with ErrWrongKey", err)
		}
		if !e.tools.Opens(e.dev, []byte("k1")) {
			t.Fatal("the old slot was removed although the new one was never proven")
		}
		if slices.Contains(e.tools.Actions(), "luksRemoveKey") {
			t.Fatal("luksRemoveKey ran before the new key was proven")
		}
	})
	t.Run("interrupted rotation completes", func(t *testing.T) {
		e := newEnv(t)
		if err := e.c.Format(ctx, e.dev, []byte("k1")); err != nil {
			t.Fatal(err)
		}
		e.tools.AddSlot(e.dev, []byte("k2")) // added, not yet removed
		if err := e.c.Rotate(ctx, e.dev, []byte("k1"), []byte("k2")); err != nil {
			t.Fatal(err)
		}
		if slices.Contains(e.tools.Actions(), "luksAddKey") {
			t.Fatal("a second slot was added for a key that already opens one")
		}
		if got := e.tools.Slots(e.dev); len(got) != 1 || string(got[0]) != "k2" {
			t.Fatalf("slots %q, want only k2", got)
		}
	})
}

func TestExecRunnerSecretChannels(t *testing.T) {
	res, err := ExecRunner{}.Run(context.Background(), Command{Name: "sh", Args: []string{"-c", "cat; cat <&3; exit 3"},
		Stdin: []byte("on-stdin "), Fd3: []byte("on-fd3")})
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Stdout) != "on-stdin on-fd3" || res.ExitCode != 3 {
		t.Fatalf("got %q exit %d", res.Stdout, res.ExitCode)
	}
	if _, err := (ExecRunner{}).Run(context.Background(), Command{Name: "sh", Fd3: make([]byte, 1<<20)}); err == nil {
		t.Fatal("an oversized fd 3 input was accepted")
	}
}

// TestCryptsetupOnFile runs the real cryptsetup on a regular file: format,
// probe, key test, rotation (all of which need no device mapper).
func TestCryptsetupOnFile(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		if os.Getenv("NBDCSI_REQUIRE_SERVERS") == "1" {
			t.Fatal("cryptsetup is not installed (hack/install-deps.sh vm installs cryptsetup-bin)")
		}
		t.Skip("cryptsetup is not installed (Debian: cryptsetup-bin); the VM kernel tests cover it too")
	}
	ctx := context.Background()
	dir := t.TempDir()
	dev := filepath.Join(dir, "disk")
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(dev, 32<<20); err != nil {
		t.Fatal(err)
	}
	c := New(ExecRunner{}, Options{PBKDFMemoryKiB: 32 << 10, PBKDFIterations: 4, DevDir: filepath.Join(dir, "dev")})
	if got, err := c.Probe(ctx, dev); err != nil || got != Blank {
		t.Fatalf("Probe blank: %v %v", got, err)
	}
	if err := c.Format(ctx, dev, []byte("first\n")); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Probe(ctx, dev); err != nil || got != LUKS {
		t.Fatalf("Probe after format: %v %v", got, err)
	}
	if err := c.Format(ctx, dev, []byte("first\n")); err == nil {
		t.Fatal("Format over a LUKS header succeeded")
	}
	if err := c.TestKey(ctx, dev, []byte("first")); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("the passphrase without its newline: got %v, want ErrWrongKey (keys are exact bytes)", err)
	}
	if err := c.Rotate(ctx, dev, []byte("first\n"), []byte("second")); err != nil {
		t.Fatal(err)
	}
	if err := c.TestKey(ctx, dev, []byte("second")); err != nil {
		t.Fatalf("new key: %v", err)
	}
	if err := c.TestKey(ctx, dev, []byte("first\n")); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("old key after rotation: got %v, want ErrWrongKey", err)
	}
	// An ext4 file system is foreign data.
	ext := filepath.Join(dir, "ext4")
	if err := os.WriteFile(ext, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(ext, 32<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", ext).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	var fe *ForeignDataError
	if err := c.Format(ctx, ext, []byte("k")); !errors.As(err, &fe) || !strings.Contains(fe.Found, "ext4") {
		t.Fatalf("Format on ext4: got %v, want ForeignDataError naming ext4", err)
	}
}

// TestStatusFromSysfs: Status reads device-mapper's sysfs (it never runs
// cryptsetup, which would read the device) and refuses what is not one
// dm-crypt mapping on one device.
func TestStatusFromSysfs(t *testing.T) {
	root := t.TempDir()
	devDir, sysDir := filepath.Join(root, "dev"), filepath.Join(root, "sys")
	c := New(crypttest.NewTools(devDir), Options{DevDir: devDir, SysDir: sysDir})
	mk := func(dm, name, uuid string, slaves ...string) {
		t.Helper()
		d := filepath.Join(sysDir, "block", dm)
		for _, p := range []string{filepath.Join(d, "dm"), filepath.Join(d, "slaves"), filepath.Join(devDir, "mapper")} {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		for f, b := range map[string]string{filepath.Join(d, "dm", "name"): name + "\n", filepath.Join(d, "dm", "uuid"): uuid + "\n",
			filepath.Join(devDir, "mapper", name): ""} {
			if err := os.WriteFile(f, []byte(b), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		for _, s := range slaves {
			if err := os.WriteFile(filepath.Join(d, "slaves", s), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	mk("dm-0", "enc", "CRYPT-LUKS2-0123-enc", "nbd3")
	mk("dm-1", "lvm", "LVM-abc", "sda")
	mk("dm-2", "striped", "CRYPT-LUKS2-4567-striped", "nbd4", "nbd5")
	ctx := context.Background()
	if m, err := c.Status(ctx, "enc"); err != nil || !m.Active || m.Device != filepath.Join(devDir, "nbd3") {
		t.Errorf("Status(enc) = %+v, %v; want active on %s", m, err, filepath.Join(devDir, "nbd3"))
	}
	if m, err := c.Status(ctx, "absent"); err != nil || m.Active {
		t.Errorf("Status(absent) = %+v, %v; want inactive", m, err)
	}
	if _, err := c.Status(ctx, "lvm"); err == nil || !strings.Contains(err.Error(), "not a dm-crypt mapping") {
		t.Errorf("Status(lvm) = %v, want a refusal (not dm-crypt)", err)
	}
	if _, err := c.Status(ctx, "striped"); err == nil || !strings.Contains(err.Error(), "2 devices") {
		t.Errorf("Status(striped) = %v, want a refusal (two devices)", err)
	}
	// A node left in /dev/mapper that device-mapper does not know.
	if err := os.WriteFile(filepath.Join(devDir, "mapper", "stale"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if m, err := c.Status(ctx, "stale"); err != nil || m.Active {
		t.Errorf("Status(stale) = %+v, %v; want inactive", m, err)
	}
}
