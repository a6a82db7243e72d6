// SPDX-License-Identifier: Apache-2.0

package crypt

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// cryptsetup exit statuses (cryptsetup(8) "RETURN CODES").
const (
	exitWrongParams = 1
	exitNoPerm      = 2 // bad passphrase
	exitNoMem       = 3
	exitWrongDevice = 4 // also: no such active mapping
	exitBusy        = 5 // device exists or is busy
)

// blkid exit statuses (blkid(8)).
const (
	blkidNothing    = 2
	blkidAmbivalent = 8
)

// DefaultPBKDFMemoryKiB is the argon2id memory cost of a key slot: 64 MiB,
// which every opening of the volume needs transiently. cryptsetup's own
// default is up to 1 GiB, enough to OOM a small node that opens several
// volumes at once.
const DefaultPBKDFMemoryKiB = 64 << 10

// HeaderArea is what luksFormat writes at the start of a device (the
// LUKS2 default: 16 MiB of metadata and key slots). Format refuses a
// device with any non-zero byte there unless it is a LUKS header.
const HeaderArea = 16 << 20

// luks2SecondaryOffsets are where a LUKS2 secondary header may start
// (its primary header's size, 16 KiB to 4 MiB).
var luks2SecondaryOffsets = []int64{0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000}

var (
	luksMagic  = []byte("LUKS\xba\xbe")
	luks2Magic = []byte("SKUL\xba\xbe")
)

// Options tune key slots created by Format and Rotate.
type Options struct {
	// PBKDFMemoryKiB is the argon2id memory cost (default
	// DefaultPBKDFMemoryKiB).
	PBKDFMemoryKiB int
	// IterTimeMS is the PBKDF unlock time target in milliseconds (0:
	// cryptsetup's default, 2000).
	IterTimeMS int
	// PBKDFIterations, when > 0, fixes the argon2id time cost (at least
	// 4) instead of benchmarking for IterTimeMS: cheaper to create and
	// to open, weaker against guessing. For tests on slow emulators.
	PBKDFIterations int
	// DevDir is the /dev directory (default "/dev"); mappings appear in
	// DevDir/mapper.
	DevDir string
	// SysDir is the sysfs root (default "/sys"): Status reads active
	// mappings from SysDir/block/*/dm.
	SysDir string
}

// Crypt runs cryptsetup and blkid.
type Crypt struct {
	run  Runner
	opts Options
}

// New returns a Crypt running programs through r.
func New(r Runner, o Options) *Crypt {
	if o.PBKDFMemoryKiB <= 0 {
		o.PBKDFMemoryKiB = DefaultPBKDFMemoryKiB
	}
	if o.DevDir == "" {
		o.DevDir = "/dev"
	}
	if o.SysDir == "" {
		o.SysDir = "/sys"
	}
	return &Crypt{run: r, opts: o}
}

// MapperName is the device-mapper name of a volume's mapping: derived from
// the volume ID alone, so a restarted plugin finds the mappings it opened.
func MapperName(volumeID string) string {
	h := sha256.Sum256([]byte(volumeID))
	return "nbdcsi-" + hex.EncodeToString(h[:16])
}

// MapperPath is the device node of a mapping.
func (c *Crypt) MapperPath(name string) string {
	return filepath.Join(c.opts.DevDir, "mapper", name)
}

// Content is what Probe found on a device.
type Content int

const (
	// Blank: no signature and only zeros in the header area.
	Blank Content = iota
	// LUKS: a LUKS header (primary or LUKS2 secondary).
	LUKS
)

// Probe reports whether device holds a LUKS header or is blank; anything
// else is a *ForeignDataError naming what was found.
func (c *Crypt) Probe(ctx context.Context, device string) (Content, error) {
	f, err := os.Open(device)
	if err != nil {
		return 0, fmt.Errorf("probe %s: %w", device, err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("probe %s: size: %w", device, err)
	}
	area := min(size, HeaderArea)
	buf := make([]byte, area)
	if _, err := f.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		return 0, fmt.Errorf("probe %s: read: %w", device, err)
	}
	if bytes.HasPrefix(buf, luksMagic) {
		return LUKS, nil
	}
	for _, off := range luks2SecondaryOffsets {
		if off+int64(len(luks2Magic)) <= area && bytes.Equal(buf[off:off+int64(len(luks2Magic))], luks2Magic) {
			return LUKS, nil
		}
	}
	res, err := c.run.Run(ctx, Command{Name: "blkid", Args: []string{"-p", "-o", "export", device}})
	if err != nil {
		return 0, fmt.Errorf("probe %s: %w", device, err)
	}
	switch res.ExitCode {
	case 0:
		vals := parseExport(res.Stdout)
		switch {
		case vals["TYPE"] == "crypto_LUKS":
			return LUKS, nil
		case vals["TYPE"] != "":
			return 0, &ForeignDataError{Device: device, Found: "a " + vals["TYPE"] + " signature"}
		case vals["PTTYPE"] != "":
			return 0, &ForeignDataError{Device: device, Found: "a " + vals["PTTYPE"] + " partition table"}
		}
		return 0, &ForeignDataError{Device: device, Found: "a signature blkid reports without a type"}
	case blkidAmbivalent:
		return 0, &ForeignDataError{Device: device, Found: "several conflicting signatures"}
	case blkidNothing:
	default:
		return 0, &CommandError{Op: "blkid " + device, ExitCode: res.ExitCode, Stderr: string(res.Stderr)}
	}
	if i := firstNonZero(buf); i >= 0 {
		return 0, &ForeignDataError{Device: device, Found: fmt.Sprintf("non-zero data at byte %d with no known signature", i)}
	}
	return Blank, nil
}

// firstNonZero returns the index of the first non-zero byte, or -1.
func firstNonZero(b []byte) int {
	var zero [4096]byte
	for off := 0; off < len(b); off += len(zero) {
		chunk := b[off:min(off+len(zero), len(b))]
		if bytes.Equal(chunk, zero[:len(chunk)]) {
			continue
		}
		for i, c := range chunk {
			if c != 0 {
				return off + i
			}
		}
	}
	return -1
}

// parseExport parses blkid -o export output (KEY=value lines).
func parseExport(b []byte) map[string]string {
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			out[k] = v
		}
	}
	return out
}

// slotArgs are the key-slot options of luksFormat and luksAddKey.
func (c *Crypt) slotArgs() []string {
	a := []string{"--pbkdf", "argon2id", "--pbkdf-memory", strconv.Itoa(c.opts.PBKDFMemoryKiB)}
	switch {
	case c.opts.PBKDFIterations > 0:
		a = append(a, "--pbkdf-force-iterations", strconv.Itoa(max(c.opts.PBKDFIterations, 4)))
	case c.opts.IterTimeMS > 0:
		a = append(a, "--iter-time", strconv.Itoa(c.opts.IterTimeMS))
	}
	return a
}

// Format writes a new LUKS2 header to a blank device. It probes first and
// refuses anything but Blank (a LUKS header too: that is opened, never
// replaced).
func (c *Crypt) Format(ctx context.Context, device string, key []byte) error {
	if err := CheckPassphrase(key); err != nil {
		return err
	}
	content, err := c.Probe(ctx, device)
	if err != nil {
		return err
	}
	if content == LUKS {
		return fmt.Errorf("format %s: it already holds a LUKS header", device)
	}
	return c.format(ctx, device, key)
}

func (c *Crypt) format(ctx context.Context, device string, key []byte) error {
	args := append([]string{"luksFormat", "--batch-mode", "--type", "luks2"}, c.slotArgs()...)
	args = append(args, "--key-file", "-", device)
	return c.cryptsetup(ctx, "luksFormat "+device, args, key, nil)
}

// cryptsetup runs cryptsetup and classifies its exit status.
func (c *Crypt) cryptsetup(ctx context.Context, op string, args []string, stdin, fd3 []byte) error {
	res, err := c.run.Run(ctx, Command{Name: "cryptsetup", Args: args, Stdin: stdin, Fd3: fd3})
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if res.ExitCode == 0 {
		return nil
	}
	ce := &CommandError{Op: op, ExitCode: res.ExitCode, Stderr: string(res.Stderr)}
	switch res.ExitCode {
	case exitNoPerm:
		ce.Err = ErrWrongKey
	case exitBusy:
		ce.Err = ErrBusy
	}
	return ce
}

// Mapping is the state of a device-mapper name.
type Mapping struct {
	// Active is true when the mapping exists.
	Active bool
	// Device is the device under an active mapping.
	Device string
}

// Status reports whether the mapping name is active and on which device.
// It asks device-mapper through sysfs and never runs cryptsetup: `cryptsetup
// status` loads the LUKS header from the device under the mapping, so it
// blocks for as long as that device stalls — an NBD device whose server is
// down stalls up to its dead-connection timeout — and the volume health
// check, which must answer during exactly such an outage, calls Status.
func (c *Crypt) Status(_ context.Context, name string) (Mapping, error) {
	if _, err := os.Lstat(c.MapperPath(name)); errors.Is(err, os.ErrNotExist) {
		return Mapping{}, nil
	}
	names, err := filepath.Glob(filepath.Join(c.opts.SysDir, "block", "*", "dm", "name"))
	if err != nil {
		return Mapping{}, fmt.Errorf("status %s: %w", name, err)
	}
	for _, p := range names {
		b, err := os.ReadFile(p)
		if errors.Is(err, os.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil {
			return Mapping{}, fmt.Errorf("status %s: %w", name, err)
		}
		if strings.TrimSpace(string(b)) != name {
			continue
		}
		dm := filepath.Dir(p)
		uuid, err := os.ReadFile(filepath.Join(dm, "uuid"))
		if err != nil {
			return Mapping{}, fmt.Errorf("status %s: %w", name, err)
		}
		if !strings.HasPrefix(string(uuid), "CRYPT-") {
			return Mapping{}, fmt.Errorf("status %s: the device-mapper device %s is not a dm-crypt mapping (uuid %q)", name, filepath.Base(filepath.Dir(dm)), strings.TrimSpace(string(uuid)))
		}
		slaves, err := os.ReadDir(filepath.Join(filepath.Dir(dm), "slaves"))
		if err != nil {
			return Mapping{}, fmt.Errorf("status %s: %w", name, err)
		}
		if len(slaves) != 1 {
			return Mapping{}, fmt.Errorf("status %s: the mapping sits on %d devices, want 1", name, len(slaves))
		}
		return Mapping{Active: true, Device: filepath.Join(c.opts.DevDir, slaves[0].Name())}, nil
	}
	// A node in DevDir/mapper that device-mapper does not know: inactive
	// (cryptsetup says the same).
	return Mapping{}, nil
}

// Open opens the LUKS device under name with the keyring disabled (the
// volume key stays in the dm table, so resize needs no passphrase). An
// active mapping of name on device is accepted; on another device it is
// ErrBusy.
func (c *Crypt) Open(ctx context.Context, device, name string, key []byte, readOnly bool) error {
	if err := CheckPassphrase(key); err != nil {
		return err
	}
	m, err := c.Status(ctx, name)
	if err != nil {
		return err
	}
	if m.Active {
		if m.Device != device {
			return fmt.Errorf("open %s: mapping %s is active on %s: %w", device, name, m.Device, ErrBusy)
		}
		return nil
	}
	args := []string{"open", "--type", "luks", "--disable-keyring", "--key-file", "-"}
	if readOnly {
		args = append(args, "--readonly")
	}
	args = append(args, device, name)
	return c.cryptsetup(ctx, "open "+device, args, key, nil)
}

// Close removes the mapping name; an inactive one is fine. A mapping still
// in use (mounted) is ErrBusy.
func (c *Crypt) Close(ctx context.Context, name string) error {
	m, err := c.Status(ctx, name)
	if err != nil || !m.Active {
		return err
	}
	err = c.cryptsetup(ctx, "close "+name, []string{"close", name}, nil, nil)
	var ce *CommandError
	if errors.As(err, &ce) && ce.ExitCode == exitWrongDevice {
		return nil // gone in between
	}
	return err
}

// Resize grows the mapping name to fill its (resized) device. It needs no
// passphrase because Open disables the keyring.
func (c *Crypt) Resize(ctx context.Context, name string) error {
	return c.cryptsetup(ctx, "resize "+name, []string{"resize", name}, nil, nil)
}

// TestKey checks that key opens a key slot of device's LUKS header,
// without activating anything. A wrong key is ErrWrongKey.
func (c *Crypt) TestKey(ctx context.Context, device string, key []byte) error {
	if err := CheckPassphrase(key); err != nil {
		return err
	}
	return c.cryptsetup(ctx, "test passphrase on "+device,
		[]string{"open", "--test-passphrase", "--type", "luks", "--key-file", "-", device}, key, nil)
}

// EnsureOpen opens device under name, formatting it first if it is blank
// (Probe). formatted tells whether it did. It never formats a device with
// a LUKS header (a wrong key stays ErrWrongKey) or anything else on it
// (*ForeignDataError), nor a blank device opened read-only (ErrReadOnly).
func (c *Crypt) EnsureOpen(ctx context.Context, device, name string, key []byte, readOnly bool) (formatted bool, err error) {
	if err := CheckPassphrase(key); err != nil {
		return false, err
	}
	m, err := c.Status(ctx, name)
	if err != nil {
		return false, err
	}
	if m.Active {
		return false, c.Open(ctx, device, name, key, readOnly)
	}
	content, err := c.Probe(ctx, device)
	if err != nil {
		return false, err
	}
	if content == Blank {
		if readOnly {
			return false, fmt.Errorf("%s: %w", device, ErrReadOnly)
		}
		if err := c.format(ctx, device, key); err != nil {
			return false, err
		}
		formatted = true
	}
	return formatted, c.Open(ctx, device, name, key, readOnly)
}

// maxSlots bounds the removal loop of Rotate (LUKS2 has 32 key slots).
const maxSlots = 32

// Rotate replaces the passphrase old by new on device: it adds a key slot
// for new (unless new already opens one: a rotation interrupted earlier),
// proves that new opens the header, and only then removes every slot old
// opens, and checks that old opens none. The volume key does not change,
// so an open mapping keeps working. Run again after any failure: each step
// checks the header first.
func (c *Crypt) Rotate(ctx context.Context, device string, oldKey, newKey []byte) error {
	if err := CheckPassphrase(oldKey); err != nil {
		return fmt.Errorf("old passphrase: %w", err)
	}
	if err := CheckPassphrase(newKey); err != nil {
		return fmt.Errorf("new passphrase: %w", err)
	}
	if bytes.Equal(oldKey, newKey) {
		return fmt.Errorf("the new passphrase equals the old one: %w", ErrBadKey)
	}
	content, err := c.Probe(ctx, device)
	if err != nil {
		return err
	}
	if content != LUKS {
		return fmt.Errorf("rotate %s: %w", device, ErrNotLUKS)
	}
	newErr := c.TestKey(ctx, device, newKey)
	oldErr := c.TestKey(ctx, device, oldKey)
	switch {
	case oldErr != nil && !errors.Is(oldErr, ErrWrongKey):
		return oldErr
	case newErr != nil && !errors.Is(newErr, ErrWrongKey):
		return newErr
	case oldErr != nil && newErr == nil:
		return nil // already rotated
	case oldErr != nil:
		return fmt.Errorf("rotate %s: old passphrase: %w", device, ErrWrongKey)
	}
	if newErr != nil {
		args := append([]string{"luksAddKey", "--batch-mode"}, c.slotArgs()...)
		args = append(args, "--key-file", "-", device, "/proc/self/fd/3")
		if err := c.cryptsetup(ctx, "add key slot on "+device, args, oldKey, newKey); err != nil {
			return err
		}
	}
	if err := c.TestKey(ctx, device, newKey); err != nil {
		return fmt.Errorf("rotate %s: the new key slot does not open, the old one is kept: %w", device, err)
	}
	for range maxSlots {
		err := c.TestKey(ctx, device, oldKey)
		if errors.Is(err, ErrWrongKey) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := c.cryptsetup(ctx, "remove old key slot on "+device,
			[]string{"luksRemoveKey", "--batch-mode", "--key-file", "-", device}, oldKey, nil); err != nil {
			return err
		}
	}
	return fmt.Errorf("rotate %s: the old passphrase still opens a key slot after %d removals", device, maxSlots)
}
