// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
	testingexec "k8s.io/utils/exec/testing"
)

// blankTestSizes are device sizes the region tests cover: tiny, around the
// whole-device limit, unaligned to 256 KiB (ZFS label alignment), and
// large.
var blankTestSizes = []int64{512, 1 << 20, 1000448, blankWholeDevice, blankWholeDevice + 512,
	10 << 20, 256<<20 + 3*512, 1 << 30, 1<<30 + 100*4096, 5000000000 &^ 511}

func TestBlankRegions(t *testing.T) {
	for _, size := range blankTestSizes {
		rs := blankRegions(size)
		end := int64(-1)
		for _, r := range rs {
			if r.off <= end || r.n <= 0 || r.off+r.n > size || r.off%4096 != 0 || ((r.off+r.n)%4096 != 0 && r.off+r.n != size) {
				t.Errorf("size %d: bad region %+v in %+v", size, r, rs)
			}
			end = r.off + r.n
		}
		if rs[0].off != 0 || end != size {
			t.Errorf("size %d: regions %+v do not start at 0 and end at the size", size, rs)
		}
	}
}

// covered reports whether [off, off+n) lies in rs.
func covered(rs []region, off, n int64) bool {
	for _, r := range rs {
		if off >= r.off && off+n <= r.off+r.n {
			return true
		}
	}
	return false
}

func zeroFile(t *testing.T, size int64) string {
	t.Helper()
	return servers.SparseFile(t, filepath.Join(t.TempDir(), "dev"), size)
}

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("NBDCSI_REQUIRE_SERVERS") == "1" {
			t.Fatalf("%s is not installed (hack/install-deps.sh test): %v", name, err)
		}
		t.Skipf("%s is not installed: %v", name, err)
	}
	return p
}

// blkidReads runs blkid -p as NodeStage's check does under strace and
// returns the byte ranges it read from path.
func blkidReads(t *testing.T, path string) [][2]int64 {
	t.Helper()
	trace := filepath.Join(t.TempDir(), "trace")
	cmd := exec.Command(needTool(t, "strace"), "-o", trace, "-e", "trace=openat,lseek,read,pread64,readv,preadv",
		needTool(t, "blkid"), "-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", path)
	out, err := cmd.CombinedOutput()
	if ee := (*exec.ExitError)(nil); err != nil && !(errorsAs(err, &ee) && ee.ExitCode() == 2) {
		t.Fatalf("strace blkid: %v\n%s", err, out)
	}
	b, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	var reads [][2]int64
	fd := ""
	var pos int64
	openRe := regexp.MustCompile(`^openat\(.*"` + regexp.QuoteMeta(path) + `".*= (\d+)$`)
	num := func(s string) int64 {
		v, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
		if err != nil {
			t.Fatalf("strace line: %v", err)
		}
		return v
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if m := openRe.FindStringSubmatch(l); m != nil {
			fd, pos = m[1], 0
			continue
		}
		if fd == "" {
			continue
		}
		ret := l[strings.LastIndex(l, "= ")+2:]
		switch {
		case strings.HasPrefix(l, "lseek("+fd+","):
			pos = num(ret)
		case strings.HasPrefix(l, "read("+fd+","):
			n := num(ret)
			reads = append(reads, [2]int64{pos, n})
			pos += n
		case strings.HasPrefix(l, "pread64("+fd+","), strings.HasPrefix(l, "readv("+fd+","), strings.HasPrefix(l, "preadv("+fd+","):
			t.Fatalf("blkid used a read call this test does not parse: %s", l)
		}
	}
	if len(reads) == 0 {
		t.Fatalf("no reads of %s in the trace", path)
	}
	return reads
}

func errorsAs(err error, target **exec.ExitError) bool {
	e, ok := err.(*exec.ExitError)
	*target = e
	return ok
}

// TestBlankRegionsCoverBlkid is the premise of the blank shortcut: on an
// all-zero device, every byte the installed blkid reads lies in
// blankRegions. If a newer blkid reads elsewhere, this fails, and the
// regions must grow before the shortcut may be trusted with it.
func TestBlankRegionsCoverBlkid(t *testing.T) {
	for _, size := range blankTestSizes {
		path := zeroFile(t, size)
		rs := blankRegions(size)
		for _, r := range blkidReads(t, path) {
			if r[1] > 0 && !covered(rs, r[0], r[1]) {
				t.Errorf("size %d: blkid read %d bytes at %d (%d from the end), outside %+v", size, r[1], r[0], size-r[0], rs)
			}
		}
	}
}

// knownProbeOffsets are places where libblkid 2.38 looks for signatures
// on a blank device (from strace), relative to the start or, when
// negative, to the end.
var knownProbeOffsets = []int64{0, 510, 512, 1024 + 0x38, 3072, 4096, 8192 + 0x2c, 16384, 32768 + 1, 65536 + 0x40,
	131072, 262144, 262144 + 1376, 524288, 1 << 20, 2 << 20, 4 << 20,
	-512, -1024, -4096, -5632, -8192, -32256, -65536, -130560, -131584, -204288, -262144, -524288, -507392, -1580544}

// TestIsBlankSeesOneByte: a single non-zero byte anywhere blkid looks on a
// blank device (as traced, and at known probe offsets), or at the edge of
// any region, makes the device "not proven blank".
func TestIsBlankSeesOneByte(t *testing.T) {
	for _, size := range []int64{1 << 30, 1<<30 + 100*4096, 3 << 20} {
		path := zeroFile(t, size)
		if blank, err := IsBlank(path); err != nil || !blank {
			t.Fatalf("size %d, all zero: IsBlank = %v, %v; want true", size, blank, err)
		}
		offsets := map[int64]bool{}
		for _, o := range knownProbeOffsets {
			if o < 0 {
				o += size
			}
			if o >= 0 && o < size {
				offsets[o] = true
			}
		}
		if _, err := exec.LookPath("strace"); err == nil {
			for _, r := range blkidReads(t, path) {
				for _, o := range []int64{r[0], r[0] + r[1] - 1, r[0] + r[1]/2} {
					if r[1] > 0 {
						offsets[o] = true
					}
				}
			}
		}
		for _, r := range blankRegions(size) {
			offsets[r.off], offsets[r.off+r.n-1] = true, true
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		for o := range offsets {
			if _, err := f.WriteAt([]byte{0x5a}, o); err != nil {
				t.Fatal(err)
			}
			if blank, err := IsBlank(path); err != nil || blank {
				t.Errorf("size %d, byte at %d (%d from the end): IsBlank = %v, %v; want false", size, o, size-o, blank, err)
			}
			if _, err := f.WriteAt([]byte{0}, o); err != nil {
				t.Fatal(err)
			}
		}
		f.Close()
	}
}

// signatureFixtures make files that blkid recognises with real tools.
func signatureFixtures() map[string]func(t *testing.T, path string) {
	run := func(t *testing.T, name string, args ...string) {
		t.Helper()
		cmd := exec.Command(needTool(t, name), args...)
		cmd.Stdin = strings.NewReader("passphrase-for-test\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
	}
	return map[string]func(t *testing.T, path string){
		"ext4": func(t *testing.T, p string) { run(t, "mkfs.ext4", "-q", "-F", p) },
		"xfs":  func(t *testing.T, p string) { run(t, "mkfs.xfs", "-q", "-f", p) },
		"swap": func(t *testing.T, p string) { run(t, "mkswap", p) },
		"luks2": func(t *testing.T, p string) {
			run(t, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-", p)
		},
		"luks1": func(t *testing.T, p string) {
			run(t, "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file", "-", p)
		},
		// A DOS partition table with one Linux partition (what sfdisk writes).
		"dos": func(t *testing.T, p string) {
			mbr := make([]byte, 512)
			binary.LittleEndian.PutUint32(mbr[440:], 0x12345678)
			e := mbr[446:]
			e[4] = 0x83
			binary.LittleEndian.PutUint32(e[8:], 2048)
			binary.LittleEndian.PutUint32(e[12:], 4096)
			mbr[510], mbr[511] = 0x55, 0xaa
			writeAt(t, p, mbr, 0)
		},
		// Only the backup GPT header at the last sector survives (the
		// primary was overwritten): blkid -p still reports a partition
		// table? Not necessarily; IsBlank must just not call it blank.
		"data-at-end": func(t *testing.T, p string) {
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			writeAt(t, p, []byte("EFI PART"), st.Size()-512)
		},
	}
}

func writeAt(t *testing.T, path string, b []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func blkidExport(t *testing.T, path string) string {
	t.Helper()
	out, _ := exec.Command(needTool(t, "blkid"), "-p", "-o", "export", path).Output()
	return string(out)
}

// TestFormatAndMountKeepsData formats and "mounts" (fake mount table,
// real blkid, mkfs and fsck) files that hold real signatures: none may be
// formatted over, none may be called blank; a blank one is formatted
// without blkid.
func TestFormatAndMountKeepsData(t *testing.T) {
	needTool(t, "blkid")
	for name, make := range signatureFixtures() {
		t.Run(name, func(t *testing.T) {
			size := int64(64 << 20)
			if name == "xfs" {
				size = 300 << 20 // mkfs.xfs's minimum
			}
			path := zeroFile(t, size)
			make(t, path)
			before := blkidExport(t, path)
			if name != "data-at-end" && !strings.Contains(before, "TYPE=") {
				t.Fatalf("fixture not recognised by blkid: %q", before)
			}
			if blank, err := IsBlank(path); err != nil || blank {
				t.Fatalf("IsBlank = %v, %v; want false", blank, err)
			}
			sum := fileDigest(t, path)
			m := &NodeMounter{SafeFormatAndMount: mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: utilexec.New()}}
			err := m.FormatAndMount(path, t.TempDir(), FSExt4, nil, nil)
			if name == "data-at-end" {
				// blkid finds nothing it knows: mount-utils formats, as
				// it always did (the shortcut did not decide this).
				return
			}
			_ = err // a foreign filesystem may fail to "mount"; what matters is the data
			if got := blkidExport(t, path); got != before {
				t.Errorf("blkid after FormatAndMount:\n%s\nwant (before):\n%s", got, before)
			}
			if name != "ext4" && fileDigest(t, path) != sum {
				t.Errorf("the file changed")
			}
		})
	}
}

func fileDigest(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("sha256sum", path).Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(out))[0]
}

// TestFormatAndMountBlankShortcut: a blank device is formatted with the
// arguments mount-utils uses and mounted, with no blkid; a device with one
// byte where blkid looks goes to blkid first; a read-only one too.
func TestFormatAndMountBlankShortcut(t *testing.T) {
	type call struct {
		cmd  string
		args []string
	}
	newMounter := func(t *testing.T, script []call) (*NodeMounter, *mount.FakeMounter, *testingexec.FakeExec) {
		fe := &testingexec.FakeExec{ExactOrder: true}
		for _, c := range script {
			fe.CommandScript = append(fe.CommandScript, func(cmd string, args ...string) utilexec.Cmd {
				if cmd != c.cmd || fmt.Sprint(args) != fmt.Sprint(c.args) {
					t.Errorf("ran %s %v, want %s %v", cmd, args, c.cmd, c.args)
				}
				out := []byte{}
				var err error
				if c.cmd == "blkid" {
					out = []byte("DEVNAME=x\nTYPE=ext4\n")
				}
				fc := &testingexec.FakeCmd{CombinedOutputScript: []testingexec.FakeAction{func() ([]byte, []byte, error) { return out, nil, err }}}
				return testingexec.InitFakeCmd(fc, cmd, args...)
			})
		}
		fm := mount.NewFakeMounter(nil)
		return &NodeMounter{SafeFormatAndMount: mount.SafeFormatAndMount{Interface: fm, Exec: fe}}, fm, fe
	}
	t.Run("blank", func(t *testing.T) {
		path, target := zeroFile(t, 1<<30), t.TempDir()
		m, fm, fe := newMounter(t, []call{{"mkfs.ext4", []string{"-E", "nodiscard", "-F", "-m0", path}}})
		if err := m.FormatAndMount(path, target, FSExt4, []string{"noatime"}, []string{"-E", "nodiscard"}); err != nil {
			t.Fatal(err)
		}
		if fe.CommandCalls != 1 {
			t.Errorf("%d commands, want mkfs only", fe.CommandCalls)
		}
		mps, _ := fm.List()
		if len(mps) != 1 || mps[0].Device != path || mps[0].Type != FSExt4 || fmt.Sprint(mps[0].Opts) != "[noatime defaults]" {
			t.Errorf("mounts %+v", mps)
		}
	})
	t.Run("xfs", func(t *testing.T) {
		path := zeroFile(t, 1<<30)
		m, _, _ := newMounter(t, []call{{"mkfs.xfs", []string{"-f", path}}})
		if err := m.FormatAndMount(path, t.TempDir(), FSXFS, nil, nil); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("one byte", func(t *testing.T) {
		path := zeroFile(t, 1<<30)
		writeAt(t, path, []byte{1}, 1<<30-512)
		m, _, fe := newMounter(t, []call{
			{"blkid", []string{"-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", path}},
			{"fsck", []string{"-a", path}},
		})
		if err := m.FormatAndMount(path, t.TempDir(), FSExt4, nil, nil); err != nil {
			t.Fatal(err)
		}
		if fe.CommandCalls != 2 {
			t.Errorf("%d commands, want blkid and fsck", fe.CommandCalls)
		}
	})
	t.Run("read-only", func(t *testing.T) {
		path := zeroFile(t, 1<<30)
		m, _, _ := newMounter(t, []call{{"blkid", []string{"-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", path}}})
		if err := m.FormatAndMount(path, t.TempDir(), FSExt4, []string{"ro"}, nil); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("unreadable", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "missing")
		m, _, _ := newMounter(t, []call{
			{"blkid", []string{"-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", path}},
			{"fsck", []string{"-a", path}},
		})
		_ = m.FormatAndMount(path, t.TempDir(), FSExt4, nil, nil)
	})
}

func TestKernelMountArgs(t *testing.T) {
	for _, c := range []struct {
		fstype  string
		options []string
		flags   uintptr
		data    string
		ok      bool
	}{
		{FSExt4, []string{"defaults"}, 0, "", true},
		{FSExt4, []string{"noatime", "nodev", "defaults"}, unix.MS_NOATIME | unix.MS_NODEV, "", true},
		{FSExt4, []string{"ro", "defaults"}, unix.MS_RDONLY, "", true},
		{FSExt4, []string{"ro", "rw"}, 0, "", true},
		{FSExt4, []string{"rw", "ro"}, unix.MS_RDONLY, "", true},
		{FSExt4, []string{"noexec", "exec", "nosuid"}, unix.MS_NOSUID, "", true},
		{FSExt4, []string{"discard", "defaults"}, 0, "discard", true},
		{FSXFS, []string{"nouuid", "defaults"}, 0, "nouuid", true},
		{FSXFS, []string{"ro", "nouuid", "discard", "defaults"}, unix.MS_RDONLY, "nouuid,discard", true},
		// What only mount(8) knows: it runs.
		{FSExt4, []string{"nouuid"}, 0, "", false},
		{FSExt4, []string{"data=journal"}, 0, "", false},
		{FSExt4, []string{"errors=remount-ro"}, 0, "", false},
		{FSExt4, []string{"context=system_u:object_r:container_file_t:s0"}, 0, "", false},
		{FSExt4, []string{"_netdev"}, 0, "", false},
		{FSExt4, []string{"bind"}, 0, "", false},
		{"", []string{"bind"}, 0, "", false},
		{"btrfs", []string{"defaults"}, 0, "", false},
		{"ext3", []string{"defaults"}, 0, "", false},
	} {
		flags, data, ok := kernelMountArgs(c.fstype, c.options)
		if flags != c.flags || data != c.data || ok != c.ok {
			t.Errorf("kernelMountArgs(%q, %q) = %#x, %q, %v; want %#x, %q, %v", c.fstype, c.options, flags, data, ok, c.flags, c.data, c.ok)
		}
	}
}

// TestSyscallMounterFallsBack: what mount(2) cannot take (unknown options,
// sensitive options, a refusal) goes to the wrapped mounter unchanged.
func TestSyscallMounterFallsBack(t *testing.T) {
	fm := mount.NewFakeMounter(nil)
	m := syscallMounter{fm}
	target := t.TempDir()
	// A missing source: mount(2) refuses, mount(8) (the fake) is asked.
	if err := m.Mount(filepath.Join(target, "missing"), target, FSExt4, []string{"defaults"}); err != nil {
		t.Fatal(err)
	}
	if err := m.Mount("/dev/x", target, FSExt4, []string{"data=journal"}); err != nil {
		t.Fatal(err)
	}
	if err := m.MountSensitive("/dev/y", target, FSExt4, []string{"defaults"}, []string{"secret"}); err != nil {
		t.Fatal(err)
	}
	log := fm.GetLog()
	if len(log) != 3 || log[1].Source != "/dev/x" || log[2].Source != "/dev/y" {
		t.Errorf("wrapped mounter saw %+v", log)
	}
}

// TestMkfsPatternsCompile: the option patterns are compiled at first use,
// so a broken one would panic in a request; compile each here.
func TestMkfsPatternsCompile(t *testing.T) {
	if len(mkfsPatterns) < 10 {
		t.Fatalf("only %d patterns registered", len(mkfsPatterns))
	}
	for _, p := range mkfsPatterns {
		if _, err := regexp.Compile(p); err != nil {
			t.Errorf("pattern %q: %v", p, err)
		}
	}
}
