// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

func TestCheckMkfsOptions(t *testing.T) {
	ok := map[string][]string{
		"ext4": {
			"", "-b 4096", "-E root_owner=1000:1000,lazy_itable_init=1,stride=16,stripe_width=32,discard",
			"-I 256 -i 16384 -L data -m 1 -N 100000", "-O ^has_journal,metadata_csum -T largefile -j -J size=64",
			"-U random -e remount-ro -q -F -g 32768 -G 16 -C 65536",
		},
		"xfs": {
			"-b size=4096", "-d agcount=4,su=64k,sw=2", "-i size=512,sparse=1", "-l size=64m,lazy-count=1",
			"-m crc=1,reflink=1,bigtime=1 -n ftype=1 -s size=4096 -L data -K -f -q",
		},
	}
	for fs, cases := range ok {
		for _, c := range cases {
			if err := driver.CheckMkfsOptions(fs, strings.Fields(c)); err != nil {
				t.Errorf("%s %q: %v, want accepted", fs, c, err)
			}
		}
	}
	bad := map[string][]string{
		"ext4": {
			"-d /etc",                 // copies a host directory into the filesystem
			"-c",                      // badblocks scan
			"-l /etc/badblocks",       // reads a host file
			"-J device=/dev/sda",      // external journal on another device
			"-J location=0,device=/x", // ditto, hidden after an allowed key
			"-z /var/undo",            // writes a host file
			"-E offset=4096",          // not a shaping option
			"-E root_owner=0:0,bogus", // unknown sub-option
			"/dev/sda",                // a bare word: mke2fs would format it
			"-b 4096 /dev/sda",        // ditto, after a valid option
			"-b4096",                  // attached value
			"-jq",                     // combined flags
			"-L",                      // missing value
			"-t ext2",                 // filesystem type is not the StorageClass's to change here
			"-S",                      // superblock-only write
			"-L a\x1bb",               // control character in the label
		},
		"xfs": {
			"-p /etc/proto", "-c options=/etc/mkfs.conf", "-d name=/etc/passwd", "-d file,size=1g",
			"-d agcount=4,name=/x", "-l logdev=/dev/sdb", "-l internal=0,logdev=/dev/sdb", "-r rtdev=/dev/sdc",
			"-N", "-d size=1g", "-L thirteenchars", "-b size=4096 /dev/sda",
		},
	}
	for fs, cases := range bad {
		for _, c := range cases {
			if err := driver.CheckMkfsOptions(fs, strings.Fields(c)); err == nil {
				t.Errorf("%s %q accepted, want refused", fs, c)
			}
		}
	}
}

// TestMkfsOptionsRealTools: every option set the allowlist accepts is also
// accepted by the real mkfs.ext4 and mkfs.xfs, run on an image file the way
// mount-utils runs them (ext4: OPTIONS -F -m0 DEV; xfs: OPTIONS -f DEV).
func TestMkfsOptionsRealTools(t *testing.T) {
	for fs, cases := range map[string][]string{
		"ext4": {"-b 4096 -E root_owner=1000:1000,lazy_itable_init=1,stride=16,stripe_width=32", "-I 256 -i 16384 -L data -m 1",
			"-O ^has_journal -T largefile", "-j -J size=4 -U random -e remount-ro -q"},
		"xfs": {"-b size=4096 -d agcount=4,su=64k,sw=2", "-i size=512,sparse=1 -l size=64m,lazy-count=1",
			"-m crc=1,reflink=1,bigtime=1 -n ftype=1 -s size=4096 -L data -K"},
	} {
		bin := servers.LookPath(t, "mkfs."+fs)
		for _, c := range cases {
			opts := strings.Fields(c)
			if err := driver.CheckMkfsOptions(fs, opts); err != nil {
				t.Fatalf("%s %q refused: %v", fs, c, err)
			}
			img := filepath.Join(t.TempDir(), "img")
			if err := os.WriteFile(img, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(img, 512<<20); err != nil {
				t.Fatal(err)
			}
			args := append(opts, "-f")
			if fs == "ext4" {
				args = append(opts, "-F", "-m0")
			}
			if out, err := exec.Command(bin, append(args, img)...).CombinedOutput(); err != nil {
				t.Errorf("mkfs.%s %q: %v\n%s", fs, c, err, out)
			}
		}
	}
}
