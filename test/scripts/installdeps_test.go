// SPDX-License-Identifier: Apache-2.0

package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// repoRoot is the repository's top directory.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// writeStub writes an executable shell script name into dir.
func writeStub(t *testing.T, dir, name, body string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/bash\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
}

// debianStubs writes dpkg-query, apt-get and id stubs. dpkg-query models
// the real one: for `-W -f=FORMAT PKG...` it prints FORMAT for each package
// it knows (installed ones and those removed but with configuration files
// left, "deinstall ok config-files"), says "no packages found matching" on
// stderr for the others and then exits 1. apt-get records its arguments and
// DEBIAN_FRONTEND in $log. id -u prints uid.
func debianStubs(t *testing.T, installed, configFiles []string, uid string) (dir, log string) {
	t.Helper()
	dir = t.TempDir()
	log = filepath.Join(dir, "apt.log")
	writeStub(t, dir, "dpkg-query", `
[ "$1" = -W ] || { echo "dpkg-query stub: want -W, got $1" >&2; exit 2; }
case $2 in -f=*) fmt=${2#-f=} ;; *) echo "dpkg-query stub: want -f=FORMAT" >&2; exit 2 ;; esac
shift 2
installed=" `+strings.Join(installed, " ")+` "
config=" `+strings.Join(configFiles, " ")+` "
rc=0
for p in "$@"; do
	if [[ $installed == *" $p "* ]]; then status="install ok installed"
	elif [[ $config == *" $p "* ]]; then status="deinstall ok config-files"
	else echo "dpkg-query: no packages found matching $p" >&2; rc=1; continue
	fi
	out=${fmt//'${Package}'/$p}
	out=${out//'${Status}'/$status}
	printf "$out"
done
exit $rc
`)
	writeStub(t, dir, "apt-get", `echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> `+log+"\n")
	writeStub(t, dir, "id", `[ "$1" = -u ] && { echo `+uid+`; exit 0; }; exec /usr/bin/id "$@"`+"\n")
	return dir, log
}

// runDeps runs hack/install-deps.sh with args and PATH=path.
func runDeps(t *testing.T, path string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command("/bin/bash", append([]string{filepath.Join(repoRoot(t), "hack/install-deps.sh")}, args...)...)
	cmd.Env = []string{"PATH=" + path, "HOME=" + t.TempDir()}
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code = 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

// groupPackages returns the package list of groups, as the script reports
// them missing on a system where nothing is installed.
func groupPackages(t *testing.T, groups ...string) []string {
	t.Helper()
	dir, _ := debianStubs(t, nil, nil, "1000")
	_, stderr, code := runDeps(t, dir+":/usr/bin:/bin", groups...)
	if code != 1 {
		t.Fatalf("install-deps %v with nothing installed: exit %d, want 1; stderr:\n%s", groups, code, stderr)
	}
	for _, l := range strings.Split(stderr, "\n") {
		if v, ok := strings.CutPrefix(l, "install-deps: missing Debian packages: "); ok {
			return strings.Fields(v)
		}
	}
	t.Fatalf("no package list in:\n%s", stderr)
	return nil
}

func readLog(t *testing.T, log string) []string {
	t.Helper()
	data, err := os.ReadFile(log)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(data)), "\n")
}

// TestInstallDepsGroups pins what each make target gets: the packages the
// Makefile, .ci/run and the e2e vm provider rely on are in their groups.
func TestInstallDepsGroups(t *testing.T) {
	for group, must := range map[string][]string{
		"vm":     {"qemu-system-x86", "busybox-static", "cpio", "kmod", "nbdkit", "nbd-client", "nbd-server", "libnbd-bin", "qemu-utils", "xfsprogs", "e2fsprogs"},
		"demo":   {"nbdkit", "qemu-system-x86", "busybox-static"},
		"test":   {"nbdkit", "qemu-utils", "nbd-server", "nbd-client", "libnbd-bin", "etcd-server", "openssl", "gcc", "git", "make", "procps"},
		"e2e-vm": {"debootstrap", "qemu-system-x86", "qemu-utils", "etcd-server", "openssl", "socat", "iproute2", "python3", "curl", "xz-utils", "busybox-static", "cpio", "nbdkit", "libnbd-bin", "dnsmasq-base", "procps"},
	} {
		got := groupPackages(t, group)
		for _, p := range must {
			if !slices.Contains(got, p) {
				t.Errorf("group %s lacks %s: %v", group, p, got)
			}
		}
		seen := map[string]bool{}
		for _, p := range got {
			if seen[p] {
				t.Errorf("group %s lists %s twice: %v", group, p, got)
			}
			seen[p] = true
		}
	}
	got := groupPackages(t, "test", "e2e-vm")
	for _, p := range []string{"etcd-server", "procps"} {
		if n := len(slices.DeleteFunc(slices.Clone(got), func(q string) bool { return q != p })); n != 1 {
			t.Errorf("groups test and e2e-vm: %s listed %d times: %v", p, n, got)
		}
	}
}

func TestInstallDepsAllPresent(t *testing.T) {
	all := groupPackages(t, "test", "e2e-vm")
	for _, uid := range []string{"0", "1000"} {
		dir, log := debianStubs(t, all, nil, uid)
		stdout, stderr, code := runDeps(t, dir+":/usr/bin:/bin", "test", "e2e-vm")
		if code != 0 || stdout != "" || stderr != "" {
			t.Errorf("uid %s, all installed: exit %d, stdout %q, stderr %q; want 0 and silence", uid, code, stdout, stderr)
		}
		if calls := readLog(t, log); calls != nil {
			t.Errorf("uid %s, all installed: apt-get ran: %q", uid, calls)
		}
	}
}

func TestInstallDepsRootInstallsOnlyMissing(t *testing.T) {
	all := groupPackages(t, "test")
	missing := []string{"nbdkit", "etcd-server", "gcc"}
	var present []string
	for _, p := range all {
		if !slices.Contains(missing, p) {
			present = append(present, p)
		}
	}
	// gcc was removed but left its configuration files: still missing.
	present = slices.DeleteFunc(present, func(p string) bool { return p == "gcc" })
	dir, log := debianStubs(t, present, []string{"gcc"}, "0")
	_, stderr, code := runDeps(t, dir+":/usr/bin:/bin", "test")
	if code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, stderr)
	}
	var wantPkgs []string
	for _, p := range all { // in list order
		if slices.Contains(missing, p) {
			wantPkgs = append(wantPkgs, p)
		}
	}
	want := []string{
		"DEBIAN_FRONTEND=noninteractive update -qq",
		"DEBIAN_FRONTEND=noninteractive install -y -qq --no-install-recommends " + strings.Join(wantPkgs, " "),
	}
	if got := readLog(t, log); !slices.Equal(got, want) {
		t.Errorf("apt-get calls:\n got %q\nwant %q", got, want)
	}
}

func TestInstallDepsNotRootPrintsCommand(t *testing.T) {
	all := groupPackages(t, "demo")
	present := slices.DeleteFunc(slices.Clone(all), func(p string) bool { return p == "nbdkit" || p == "busybox-static" })
	dir, log := debianStubs(t, present, nil, "1000")
	_, stderr, code := runDeps(t, dir+":/usr/bin:/bin", "demo")
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	var want string
	for _, p := range all {
		if p == "nbdkit" || p == "busybox-static" {
			want += " " + p
		}
	}
	if cmd := "sudo apt-get update && sudo apt-get install -y --no-install-recommends" + want + "\n"; !strings.Contains(stderr, cmd) {
		t.Errorf("stderr does not give the command %q:\n%s", cmd, stderr)
	}
	if calls := readLog(t, log); calls != nil {
		t.Errorf("not root: apt-get ran: %q", calls)
	}
}

func TestInstallDepsUsage(t *testing.T) {
	dir, log := debianStubs(t, nil, nil, "0")
	for _, args := range [][]string{nil, {"tset"}, {"test", "nope"}} {
		_, stderr, code := runDeps(t, dir+":/usr/bin:/bin", args...)
		if code != 2 {
			t.Errorf("install-deps %q: exit %d, want 2; stderr %s", args, code, stderr)
		}
	}
	if calls := readLog(t, log); calls != nil {
		t.Errorf("usage errors: apt-get ran: %q", calls)
	}
}

// TestInstallDepsNotDebian: without dpkg-query the script names the
// packages and fails, rather than guessing another package manager.
func TestInstallDepsNotDebian(t *testing.T) {
	dir := t.TempDir()
	writeStub(t, dir, "id", "echo 0\n")
	_, stderr, code := runDeps(t, dir, "demo")
	if code != 1 || !strings.Contains(stderr, "not a Debian-family system") || !strings.Contains(stderr, "nbdkit") {
		t.Errorf("exit %d, stderr %q; want 1 and the package names", code, stderr)
	}
}

// TestInstallDepsReal runs the script on this machine with the real
// dpkg-query (apt-get is a stub that refuses, so a test never installs
// anything): under make test, which installed the packages first, it must be
// a no-op; elsewhere it either is one or names what is missing.
func TestInstallDepsReal(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "apt.log")
	writeStub(t, dir, "apt-get", `echo "$*" >> `+log+"\nexit 100\n")
	_, stderr, code := runDeps(t, dir+":"+os.Getenv("PATH"), "test")
	if os.Getenv("NBDCSI_REQUIRE_SERVERS") == "1" && (code != 0 || readLog(t, log) != nil) {
		t.Fatalf("make test installed the packages first, yet install-deps test: exit %d, apt-get calls %q: %s", code, readLog(t, log), stderr)
	}
	if code != 0 && !strings.Contains(stderr, "missing Debian packages") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}
