// SPDX-License-Identifier: Apache-2.0

// Package crypttest provides a stateful fake of cryptsetup and blkid for
// tests of pkg/crypt and of the node service.
package crypttest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
)

// Tools models cryptsetup and blkid on regular files standing in for
// block devices. It keeps the key slots of each formatted device and the
// active mappings, and refuses what the real tools refuse: a wrong
// passphrase (exit 2), a device without a LUKS header (exit 1), an active
// name (exit 5), an unknown mapping (exit 4), a busy mapping (exit 5).
// Like the real luksFormat it overwrites whatever the device holds.
//
// Active mappings are also published as device-mapper publishes them in
// sysfs (SysDir()/block/dm-N/dm/{name,uuid}, SysDir()/block/dm-N/slaves/
// with the device's base name): the device must then live in devDir, as
// /dev/nbdN does in /dev. A device can be made to stall (Stall): like the
// real cryptsetup, `status` of a mapping on it then reads the LUKS header
// and blocks until its context ends.
type Tools struct {
	mu      sync.Mutex
	devDir  string
	nextDM  int
	dm      map[string]string   // mapping name -> its sysfs dm-N directory
	stalled map[string]bool     // device -> I/O on it blocks
	slots   map[string][][]byte // device -> passphrases of its key slots
	active  map[string]string   // mapping name -> device
	busy    map[string]bool     // mapping name -> in use (mounted)
	cmds    []crypt.Command
	AddNoop bool // luksAddKey reports success but adds nothing (a fault)
}

// NewTools returns the fake; mappings appear as files in devDir/mapper.
func NewTools(devDir string) *Tools {
	return &Tools{devDir: devDir, slots: map[string][][]byte{}, active: map[string]string{}, busy: map[string]bool{},
		dm: map[string]string{}, stalled: map[string]bool{}}
}

// SysDir is the fake's sysfs root, for crypt.Options.SysDir.
func (f *Tools) SysDir() string { return filepath.Join(f.devDir, ".sys") }

// Stall makes I/O on dev block (an NBD device whose server is down) or
// resume.
func (f *Tools) Stall(dev string, stalled bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stalled[dev] = stalled
}

var _ crypt.Runner = (*Tools)(nil)

// Run runs a fake cryptsetup or blkid.
func (f *Tools) Run(ctx context.Context, cmd crypt.Command) (crypt.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cmds = append(f.cmds, cmd)
	if cmd.Name == "cryptsetup" && len(cmd.Args) == 2 && cmd.Args[0] == "status" && f.stalled[f.active[cmd.Args[1]]] {
		// cryptsetup status loads the LUKS header from the device.
		f.mu.Unlock()
		<-ctx.Done()
		f.mu.Lock()
		return crypt.Result{}, ctx.Err()
	}
	switch cmd.Name {
	case "blkid":
		return f.blkid(cmd.Args)
	case "cryptsetup":
		return f.cryptsetup(cmd)
	}
	return crypt.Result{}, fmt.Errorf("fake: %s: executable file not found", cmd.Name)
}

func exit(code int, msg string) (crypt.Result, error) {
	return crypt.Result{ExitCode: code, Stderr: []byte(msg + "\n")}, nil
}

func (f *Tools) blkid(args []string) (crypt.Result, error) {
	if len(args) != 4 || args[0] != "-p" || args[1] != "-o" || args[2] != "export" {
		return exit(4, "fake blkid: unexpected arguments")
	}
	b, err := head(args[3])
	if err != nil {
		return exit(4, err.Error())
	}
	switch {
	case bytes.HasPrefix(b, luksMagic):
		return crypt.Result{Stdout: []byte("DEVNAME=" + args[3] + "\nTYPE=crypto_LUKS\n")}, nil
	case len(b) > 0x439 && b[0x438] == 0x53 && b[0x439] == 0xef:
		return crypt.Result{Stdout: []byte("DEVNAME=" + args[3] + "\nTYPE=ext4\n")}, nil
	}
	return exit(blkidNothing, "")
}

func (f *Tools) isLUKS(dev string) bool {
	b, err := head(dev)
	return err == nil && bytes.HasPrefix(b, luksMagic) && f.slots[dev] != nil
}

// opens returns the index of the slot key opens, or -1.
func (f *Tools) opens(dev string, key []byte) int {
	return slices.IndexFunc(f.slots[dev], func(s []byte) bool { return bytes.Equal(s, key) })
}

func (f *Tools) cryptsetup(cmd crypt.Command) (crypt.Result, error) {
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
		return crypt.Result{}, nil
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
			return crypt.Result{}, nil
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
			return crypt.Result{}, err
		}
		if err := os.WriteFile(filepath.Join(f.devDir, "mapper", name), nil, 0o600); err != nil {
			return crypt.Result{}, err
		}
		if err := f.publish(name, dev); err != nil {
			return crypt.Result{}, err
		}
		f.active[name] = dev
		return crypt.Result{}, nil
	case "status":
		dev, ok := f.active[last]
		if !ok {
			return exit(exitWrongDevice, "/dev/mapper/"+last+" is inactive.")
		}
		return crypt.Result{Stdout: []byte("/dev/mapper/" + last + " is active.\n  type:    LUKS2\n  cipher:  aes-xts-plain64\n  device:  " + dev + "\n  mode:    read/write\n")}, nil
	case "close":
		if _, ok := f.active[last]; !ok {
			return exit(exitWrongDevice, "Device "+last+" is not active.")
		}
		if f.busy[last] {
			return exit(exitBusy, "Device "+last+" is still in use.")
		}
		delete(f.active, last)
		if err := os.RemoveAll(f.dm[last]); err != nil {
			return crypt.Result{}, err
		}
		delete(f.dm, last)
		return crypt.Result{}, os.Remove(filepath.Join(f.devDir, "mapper", last))
	case "resize":
		if _, ok := f.active[last]; !ok {
			return exit(exitWrongDevice, "Device "+last+" is not active.")
		}
		return crypt.Result{}, nil
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
		if !f.AddNoop {
			f.slots[dev] = append(f.slots[dev], bytes.Clone(cmd.Fd3))
		}
		return crypt.Result{}, nil
	case "luksRemoveKey":
		if !hasKeyFile || !f.isLUKS(last) {
			return exit(exitWrongParams, "bad luksRemoveKey")
		}
		i := f.opens(last, cmd.Stdin)
		if i < 0 {
			return exit(exitNoPerm, "No key available with this passphrase.")
		}
		f.slots[last] = slices.Delete(f.slots[last], i, i+1)
		return crypt.Result{}, nil
	}
	return exit(exitWrongParams, "fake: unknown action "+a[0])
}

// publish shows an opened mapping in the fake sysfs.
func (f *Tools) publish(name, dev string) error {
	if filepath.Dir(dev) != filepath.Clean(f.devDir) {
		return fmt.Errorf("fake: device %s is not in the fake's /dev (%s)", dev, f.devDir)
	}
	dir := filepath.Join(f.SysDir(), "block", fmt.Sprintf("dm-%d", f.nextDM))
	f.nextDM++
	if err := os.MkdirAll(filepath.Join(dir, "dm"), 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(dir, "slaves"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "dm", "name"), []byte(name+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "dm", "uuid"), []byte("CRYPT-LUKS2-00000000000000000000000000000000-"+name+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "slaves", filepath.Base(dev)), nil, 0o644); err != nil {
		return err
	}
	f.dm[name] = dir
	return nil
}

// Actions lists the cryptsetup actions run so far.
func (f *Tools) Actions() []string {
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

// Opens reports whether key opens a key slot of dev.
func (f *Tools) Opens(dev string, key []byte) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.opens(dev, key) >= 0
}

// Slots returns the passphrases of dev's key slots.
func (f *Tools) Slots(dev string) [][]byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.slots[dev])
}

// AddSlot adds a key slot to dev (as an interrupted rotation leaves it).
func (f *Tools) AddSlot(dev string, key []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.slots[dev] = append(f.slots[dev], bytes.Clone(key))
}

// SetBusy marks a mapping as in use (close then fails with exit 5).
func (f *Tools) SetBusy(name string, busy bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.busy[name] = busy
}

// Active returns the device under an active mapping.
func (f *Tools) Active(name string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.active[name]
	return d, ok
}

// Commands returns every command run so far.
func (f *Tools) Commands() []crypt.Command {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.cmds)
}

// cryptsetup and blkid exit statuses, as in their manual pages.
const (
	exitWrongParams = 1
	exitNoPerm      = 2
	exitWrongDevice = 4
	exitBusy        = 5
	blkidNothing    = 2
)

var luksMagic = []byte("LUKS\xba\xbe")

// head reads the first 4 KiB of a device (all the fake's signatures).
func head(dev string) ([]byte, error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, 4096)
	n, err := f.ReadAt(b, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:n], nil
}
