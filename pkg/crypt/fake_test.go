// SPDX-License-Identifier: Apache-2.0

package crypt

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
)

// fakeTools models cryptsetup and blkid on regular files standing in for
// block devices. It keeps the key slots of each formatted device and the
// active mappings, and refuses what the real tools refuse: a wrong
// passphrase (exit 2), a device without a LUKS header (exit 1), an active
// name (exit 5), an unknown mapping (exit 4), a busy mapping (exit 5).
// Like the real luksFormat it overwrites whatever the device holds.
type fakeTools struct {
	mu      sync.Mutex
	devDir  string
	slots   map[string][][]byte // device -> passphrases of its key slots
	active  map[string]string   // mapping name -> device
	busy    map[string]bool     // mapping name -> in use (mounted)
	cmds    []Command
	addNoop bool // luksAddKey reports success but adds nothing (a fault)
}

func newFakeTools(devDir string) *fakeTools {
	return &fakeTools{devDir: devDir, slots: map[string][][]byte{}, active: map[string]string{}, busy: map[string]bool{}}
}

var _ Runner = (*fakeTools)(nil)

func (f *fakeTools) Run(_ context.Context, cmd Command) (Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cmds = append(f.cmds, cmd)
	switch cmd.Name {
	case "blkid":
		return f.blkid(cmd.Args)
	case "cryptsetup":
		return f.cryptsetup(cmd)
	}
	return Result{}, fmt.Errorf("fake: %s: executable file not found", cmd.Name)
}

func exit(code int, msg string) (Result, error) {
	return Result{ExitCode: code, Stderr: []byte(msg + "\n")}, nil
}

func (f *fakeTools) blkid(args []string) (Result, error) {
	if len(args) != 4 || args[0] != "-p" || args[1] != "-o" || args[2] != "export" {
		return exit(4, "fake blkid: unexpected arguments")
	}
	b, err := os.ReadFile(args[3])
	if err != nil {
		return exit(4, err.Error())
	}
	switch {
	case bytes.HasPrefix(b, luksMagic):
		return Result{Stdout: []byte("DEVNAME=" + args[3] + "\nTYPE=crypto_LUKS\n")}, nil
	case len(b) > 0x439 && b[0x438] == 0x53 && b[0x439] == 0xef:
		return Result{Stdout: []byte("DEVNAME=" + args[3] + "\nTYPE=ext4\n")}, nil
	}
	return exit(blkidNothing, "")
}

func (f *fakeTools) isLUKS(dev string) bool {
	b, err := os.ReadFile(dev)
	return err == nil && bytes.HasPrefix(b, luksMagic) && f.slots[dev] != nil
}

// opens returns the index of the slot key opens, or -1.
func (f *fakeTools) opens(dev string, key []byte) int {
	return slices.IndexFunc(f.slots[dev], func(s []byte) bool { return bytes.Equal(s, key) })
}

func (f *fakeTools) cryptsetup(cmd Command) (Result, error) {
	a := cmd.Args
	if len(a) == 0 {
		return exit(exitWrongParams, "no action")
	}
	hasKeyFile := slices.Contains(a, "--key-file") && a[slices.Index(a, "--key-file")+1] == "-"
	last := a[len(a)-1]
	switch a[0] {
	case "luksFormat":
		if !hasKeyFile || !slices.Contains(a, "luks2") {
			return exit(exitWrongParams, "fake: luksFormat wants --type luks2 --key-file -")
		}
		fh, err := os.OpenFile(last, os.O_WRONLY, 0)
		if err != nil {
			return exit(exitWrongDevice, err.Error())
		}
		defer fh.Close()
		if _, err := fh.WriteAt(luksMagic, 0); err != nil {
			return exit(exitWrongDevice, err.Error())
		}
		f.slots[last] = [][]byte{bytes.Clone(cmd.Stdin)}
		return Result{}, nil
	case "open":
		if !hasKeyFile {
			return exit(exitWrongParams, "fake: open wants --key-file -")
		}
		if slices.Contains(a, "--test-passphrase") {
			if !f.isLUKS(last) {
				return exit(exitWrongParams, "Device "+last+" is not a valid LUKS device.")
			}
			if f.opens(last, cmd.Stdin) < 0 {
				return exit(exitNoPerm, "No key available with this passphrase.")
			}
			return Result{}, nil
		}
		dev, name := a[len(a)-2], last
		if !slices.Contains(a, "--disable-keyring") {
			return exit(exitWrongParams, "fake: open without --disable-keyring")
		}
		if !f.isLUKS(dev) {
			return exit(exitWrongParams, "Device "+dev+" is not a valid LUKS device.")
		}
		if f.opens(dev, cmd.Stdin) < 0 {
			return exit(exitNoPerm, "No key available with this passphrase.")
		}
		if _, ok := f.active[name]; ok {
			return exit(exitBusy, "Device "+name+" already exists.")
		}
		if err := os.MkdirAll(filepath.Join(f.devDir, "mapper"), 0o755); err != nil {
			return Result{}, err
		}
		if err := os.WriteFile(filepath.Join(f.devDir, "mapper", name), nil, 0o600); err != nil {
			return Result{}, err
		}
		f.active[name] = dev
		return Result{}, nil
	case "status":
		dev, ok := f.active[last]
		if !ok {
			return exit(exitWrongDevice, "/dev/mapper/"+last+" is inactive.")
		}
		return Result{Stdout: []byte("/dev/mapper/" + last + " is active.\n  type:    LUKS2\n  cipher:  aes-xts-plain64\n  device:  " + dev + "\n  mode:    read/write\n")}, nil
	case "close":
		if _, ok := f.active[last]; !ok {
			return exit(exitWrongDevice, "Device "+last+" is not active.")
		}
		if f.busy[last] {
			return exit(exitBusy, "Device "+last+" is still in use.")
		}
		delete(f.active, last)
		return Result{}, os.Remove(filepath.Join(f.devDir, "mapper", last))
	case "resize":
		if _, ok := f.active[last]; !ok {
			return exit(exitWrongDevice, "Device "+last+" is not active.")
		}
		return Result{}, nil
	case "luksAddKey":
		dev := a[len(a)-2]
		if !hasKeyFile || last != "/proc/self/fd/3" || cmd.Fd3 == nil {
			return exit(exitWrongParams, "fake: luksAddKey wants the old key on stdin and the new one on fd 3")
		}
		if !f.isLUKS(dev) {
			return exit(exitWrongParams, "not LUKS")
		}
		if f.opens(dev, cmd.Stdin) < 0 {
			return exit(exitNoPerm, "No key available with this passphrase.")
		}
		if !f.addNoop {
			f.slots[dev] = append(f.slots[dev], bytes.Clone(cmd.Fd3))
		}
		return Result{}, nil
	case "luksRemoveKey":
		if !hasKeyFile || !f.isLUKS(last) {
			return exit(exitWrongParams, "bad luksRemoveKey")
		}
		i := f.opens(last, cmd.Stdin)
		if i < 0 {
			return exit(exitNoPerm, "No key available with this passphrase.")
		}
		f.slots[last] = slices.Delete(f.slots[last], i, i+1)
		return Result{}, nil
	}
	return exit(exitWrongParams, "fake: unknown action "+a[0])
}

// actions lists the cryptsetup actions run so far.
func (f *fakeTools) actions() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.cmds {
		if c.Name == "cryptsetup" {
			out = append(out, c.Args[0])
		}
	}
	return out
}
