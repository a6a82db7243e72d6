// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/nbd-csi/nbd-csi/pkg/crypt"
)

// runLuks runs `nbd-csi luks rotate`: replace the passphrase of an
// encrypted volume on this node. The old key slot is removed only after
// the new passphrase is proven to open the header.
func runLuks(ctx context.Context, args []string, stdout io.Writer) error {
	const usage = `luks rotate --volume-id ID|--device DEV --old-key-file F --new-key-file F

Replaces the passphrase of an encrypted volume on this node: adds a key slot
for the new passphrase, proves it opens the volume, then removes the slots
the old passphrase opens. Key files are read byte for byte; '-' is standard
input (for one of the two).`
	fs := flag.NewFlagSet("luks rotate", flag.ContinueOnError)
	var (
		dev, volumeID, oldFile, newFile string
		memory, iterations              int
	)
	fs.StringVar(&dev, "device", "", "the encrypted device (e.g. /dev/nbd3); or --volume-id")
	fs.StringVar(&volumeID, "volume-id", "", "the CSI volume ID of a volume staged on this node (its open mapping names the device)")
	fs.StringVar(&oldFile, "old-key-file", "", "file holding the current passphrase, exact bytes ('-': standard input)")
	fs.StringVar(&newFile, "new-key-file", "", "file holding the new passphrase, exact bytes ('-': standard input)")
	fs.IntVar(&memory, "pbkdf-memory", crypt.DefaultPBKDFMemoryKiB, "argon2id memory cost of the new key slot in KiB")
	fs.IntVar(&iterations, "pbkdf-iterations", 0, "argon2id time cost of the new key slot (0: benchmark for cryptsetup's 2 s unlock time)")
	if len(args) == 0 || args[0] != "rotate" {
		if slices.Contains(args, "--help") || slices.Contains(args, "-help") || slices.Contains(args, "-h") {
			return parseFlags(fs, []string{"--help"}, usage)
		}
		return fmt.Errorf("%w: want 'luks rotate'", errUsage)
	}
	if err := parseFlags(fs, args[1:], usage); err != nil {
		return err
	}
	if (dev == "") == (volumeID == "") || oldFile == "" || newFile == "" || fs.NArg() != 0 {
		return fmt.Errorf("%w: give --device or --volume-id, and --old-key-file and --new-key-file", errUsage)
	}
	if oldFile == "-" && newFile == "-" {
		return fmt.Errorf("%w: only one key can come from standard input", errUsage)
	}
	c := crypt.New(crypt.ExecRunner{}, crypt.Options{PBKDFMemoryKiB: memory, PBKDFIterations: iterations})
	if volumeID != "" {
		m, err := c.Status(ctx, crypt.MapperName(volumeID))
		if err != nil {
			return err
		}
		if !m.Active {
			return fmt.Errorf("volume %s has no open mapping on this node; name its device with --device", volumeID)
		}
		dev = m.Device
	}
	oldKey, err := readKey(oldFile)
	if err != nil {
		return fmt.Errorf("old key: %w", err)
	}
	defer crypt.Wipe(oldKey)
	newKey, err := readKey(newFile)
	if err != nil {
		return fmt.Errorf("new key: %w", err)
	}
	defer crypt.Wipe(newKey)
	if err := c.Rotate(ctx, dev, oldKey, newKey); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "rotated the passphrase of %s; update the volume's node-stage secret to the new passphrase\n", dev)
	return nil
}

// readKey reads a passphrase file ("-": stdin), bounded.
func readKey(path string) ([]byte, error) {
	var r io.Reader = os.Stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, crypt.MaxPassphrase+1))
	if err != nil {
		return nil, err
	}
	if err := crypt.CheckPassphrase(b); err != nil {
		return nil, err
	}
	return b, nil
}
