// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// cpioRecord is one parsed newc record.
type cpioRecord struct {
	name  string
	mode  uint32
	data  string
	major uint32
	minor uint32
}

// readNewc parses a newc archive, stopping at the trailer.
func readNewc(t *testing.T, data []byte) []cpioRecord {
	t.Helper()
	var recs []cpioRecord
	off := 0
	field := func(i int) uint32 {
		v, err := strconv.ParseUint(string(data[off+6+8*i:off+14+8*i]), 16, 32)
		if err != nil {
			t.Fatalf("header field %d at %d: %v", i, off, err)
		}
		return uint32(v)
	}
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if string(data[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d: %q", off, data[off:off+6])
		}
		mode, size, major, minor, nameLen := field(1), field(6), field(9), field(10), field(11)
		nameStart := off + 110
		name := string(data[nameStart : nameStart+int(nameLen)-1])
		bodyStart := align(nameStart + int(nameLen))
		body := string(data[bodyStart : bodyStart+int(size)])
		off = align(bodyStart + int(size))
		if name == "TRAILER!!!" {
			if len(data)%512 != 0 {
				t.Errorf("archive length %d is not a multiple of 512", len(data))
			}
			return recs
		}
		recs = append(recs, cpioRecord{name: name, mode: mode, data: body, major: major, minor: minor})
	}
}

func TestTreeLayoutAndCPIO(t *testing.T) {
	host := filepath.Join(t.TempDir(), "payload")
	if err := os.WriteFile(host, []byte("hello, guest\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	tr := newTree()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(tr.addSymlink("/bin", "usr/bin"))
	must(tr.addFile("/bin/tool", host, 0o755))         // lands in usr/bin
	must(tr.addData("/etc/motd", []byte("hi"), 0o644)) // parents created
	must(tr.addCharDev("/dev/console", 0o600, 5, 1))
	must(tr.mkdir("/tmp", 0o777|os.ModeSticky))
	if err := tr.addSymlink("/etc/motd", "x"); err == nil {
		t.Error("replacing a file by a symlink succeeded, want an error")
	}
	if !tr.exists("/usr/bin/tool") || !tr.exists("/bin/tool") {
		t.Error("tool not found through both paths")
	}
	var buf bytes.Buffer
	must(tr.writeCPIO(&buf))
	recs := readNewc(t, buf.Bytes())
	var names []string
	byName := map[string]cpioRecord{}
	for _, r := range recs {
		names = append(names, r.name)
		byName[r.name] = r
	}
	want := "bin dev dev/console etc etc/motd tmp usr usr/bin usr/bin/tool"
	if got := strings.Join(names, " "); got != want {
		t.Errorf("archive entries:\n got %s\nwant %s", got, want)
	}
	for name, check := range map[string]struct {
		mode uint32
		data string
	}{
		"bin":          {cpioSymlink | 0o777, "usr/bin"},
		"usr/bin/tool": {cpioFile | 0o755, "hello, guest\n"},
		"etc/motd":     {cpioFile | 0o644, "hi"},
		"tmp":          {cpioDir | 0o1777, ""},
		"dev/console":  {cpioCharDev | 0o600, ""},
	} {
		r := byName[name]
		if r.mode != check.mode || r.data != check.data {
			t.Errorf("%s: mode %o data %q, want mode %o data %q", name, r.mode, r.data, check.mode, check.data)
		}
	}
	if r := byName["dev/console"]; r.major != 5 || r.minor != 1 {
		t.Errorf("dev/console: device %d:%d, want 5:1", r.major, r.minor)
	}
}

func TestPerRunTreeSkipsInherited(t *testing.T) {
	tr := newTree()
	tr.nodes["bin"] = &entry{kind: kindSymlink, target: "usr/bin", inherited: true}
	tr.nodes["usr"] = &entry{kind: kindDir, perm: 0o755, inherited: true}
	tr.nodes["usr/bin"] = &entry{kind: kindDir, perm: 0o755, inherited: true}
	tr.nodes["usr/bin/mount"] = &entry{kind: kindSymlink, target: "/usr/bin/busybox", inherited: true}
	if err := tr.addData("/bin/x.test", []byte("x"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A per-run file may replace a base symlink: the kernel unlinks it.
	if err := tr.addData("/bin/mount", []byte("m"), 0o755); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := tr.writeCPIO(&buf); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range readNewc(t, buf.Bytes()) {
		names = append(names, r.name)
	}
	if got, want := strings.Join(names, " "), "usr/bin/mount usr/bin/x.test"; got != want {
		t.Errorf("per-run entries %q, want %q", got, want)
	}
}

func TestParseLDD(t *testing.T) {
	out := "/usr/bin/a:\n" +
		"\tlinux-vdso.so.1 (0x00007ffd)\n" +
		"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n" +
		"\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n" +
		"/usr/bin/b:\n" +
		"\tstatically linked\n"
	libs, err := parseLDD([]byte(out), []string{"/usr/bin/a", "/usr/bin/b"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(libs, " "), "/lib/x86_64-linux-gnu/libc.so.6 /lib64/ld-linux-x86-64.so.2"; got != want {
		t.Errorf("libs %q, want %q", got, want)
	}
	_, err = parseLDD([]byte("/usr/bin/a:\n\tlibgone.so.1 => not found\n/usr/bin/b:\n"), []string{"/usr/bin/a", "/usr/bin/b"})
	if err == nil || !strings.Contains(err.Error(), "/usr/bin/a needs libgone.so.1") {
		t.Errorf("missing library: error %v, want one naming /usr/bin/a and libgone.so.1", err)
	}
}

func TestConsoleMarkers(t *testing.T) {
	var out bytes.Buffer
	c := newConsole(&out, "abc")
	chunks := []string{
		"[    0.1] booting\r\n", "VMRUN-BOOT uptime=2.50 run=abc\r", "\n",
		"VMRUN-EXIT=7 run=forged\r\n", // output of the script cannot fake the marker
		"[  5.0] nbd: msg VMRUN-EXIT=", "3 run=abc\r\n",
	}
	for _, ch := range chunks {
		if _, err := io.WriteString(c, ch); err != nil {
			t.Fatal(err)
		}
	}
	st := c.state()
	if st.exitCode != 3 {
		t.Errorf("exit code %d, want 3", st.exitCode)
	}
	if st.guestBoot.Seconds() != 2.5 || st.bootAt.IsZero() {
		t.Errorf("boot marker: guestBoot %v bootAt %v", st.guestBoot, st.bootAt)
	}
	select {
	case <-c.exited:
	default:
		t.Error("exited channel not closed")
	}
	if strings.Contains(out.String(), "\r") {
		t.Errorf("console output still has CR: %q", out.String())
	}
	if len(st.tail) != 4 {
		t.Errorf("tail has %d lines, want 4: %q", len(st.tail), st.tail)
	}
}

func TestEnvFileAndGuestPaths(t *testing.T) {
	got := envFile([]string{"B=it's", "A=x y"})
	want := "export A='x y'\nexport B='it'\\''s'\nexport NBDCSI_IN_VM='1'\n"
	if got != want {
		t.Errorf("envFile:\n got %q\nwant %q", got, want)
	}
	for p, ok := range map[string]bool{
		"/bin/x.test": true, "/opt/data": true, "/tmp/x": false, "/run": false,
		"relative": false, "/init": false, "/vmrun/script.sh": false,
	} {
		if err := checkGuestPath(p); (err == nil) != ok {
			t.Errorf("checkGuestPath(%q) = %v, want ok=%v", p, err, ok)
		}
	}
	for s, ok := range map[string]bool{"A": true, "_x9": true, "9x": false, "A-B": false, "": false} {
		if isShellName(s) != ok {
			t.Errorf("isShellName(%q) = %v", s, !ok)
		}
	}
}

func TestModuleNames(t *testing.T) {
	if got := strings.Join(modulesKey([]string{"dm-mod", "nbd", "dm_mod", "crc32c-intel"}), ","); got != "crc32c_intel,dm_mod,nbd" {
		t.Errorf("modulesKey = %s", got)
	}
	for in, want := range map[string]string{
		"kernel/drivers/md/dm-mod.ko": "dm_mod", "kernel/fs/xfs/xfs.ko.xz": "xfs",
	} {
		if got := moduleName(in); got != want {
			t.Errorf("moduleName(%s) = %s, want %s", in, got, want)
		}
	}
}
