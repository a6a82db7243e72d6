// SPDX-License-Identifier: Apache-2.0

package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// procStat returns the process group and session of pid ("self" for this
// process), from /proc/PID/stat; ok is false once the process is gone.
func procStat(pid string) (pgrp, sid string, ok bool) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return "", "", false
	}
	// pid (comm) state ppid pgrp session ...; comm may hold spaces.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 4 || f[0] == "Z" {
		return "", "", false
	}
	return f[2], f[3], true
}

// groupAlive reports a process of process group pgrp still there (not a
// zombie), with its command line.
func groupAlive(pgrp string) (string, bool) {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		if g, _, ok := procStat(filepath.Base(d)); ok && g == pgrp {
			cmd, _ := os.ReadFile(d + "/cmdline")
			return strings.ReplaceAll(string(cmd), "\x00", " "), true
		}
	}
	return "", false
}

// TestCIRunInstallsThenTests runs .ci/run in a scratch repository with stub
// programs. As a non-root user it must install the packages of the groups
// "test" and "e2e-vm" through sudo and hack/install-deps.sh (the step make
// test and the vm provider run), then start the smoke's one-time builds
// beside make test — cluster.sh prebuild as the user, cluster.sh rootfs as
// root through sudo -n with the PATH that found go — at nice 19, first for
// the OOM killer, in .ci/run's own session (a new session is a scheduler
// autogroup of its own, where nice ranks against nothing), then run make
// test, then the cluster smoke (make e2e-smoke) as root with that PATH. A
// failed build only warns (the smoke builds what is missing); a failed
// install or make test, or a cancel (SIGTERM to the process group, as CI
// does), stops the run, and no build outlives it. The stub of make test
// waits for both builds to have started: run one after the other, they
// never meet and it fails.
func TestCIRunInstallsThenTests(t *testing.T) {
	src, err := os.ReadFile(filepath.Join(repoRoot(t), ".ci/run"))
	if err != nil {
		t.Fatal(err)
	}
	_, ownSID, _ := procStat("self")
	install := []string{"sudo hack/install-deps.sh test e2e-vm", "install-deps test e2e-vm uid=0", "go version"}
	beside := []string{
		"cluster.sh prebuild uid=1000 nice=19 oom=1000 sid=same",
		"sudo -n env PATH=@STUBS@:/usr/bin:/bin nice -n 19 choom -n 1000 -- test/e2e/vm/cluster.sh rootfs",
		"cluster.sh rootfs uid=0 nice=19 oom=1000 sid=same",
		"make test",
	}
	smoke := []string{"sudo env PATH=@STUBS@:/usr/bin:/bin make e2e-smoke", "make e2e-smoke"}
	stopped := []string{"sudo -n kill -TERM -- -PID", "sudo -n kill -TERM -- -PID"}
	for _, tc := range []struct {
		name  string
		root  bool
		fails string // the step that fails: install-deps, make test, prebuild, rootfs, make e2e-smoke or cancel
		first []string
		// then in any order: beside; then, in this order: after.
		beside, after []string
		warns         string
	}{
		{name: "all pass", first: install, beside: beside, after: smoke},
		{name: "as root", root: true, first: []string{"install-deps test e2e-vm uid=0", "go version"},
			beside: []string{"cluster.sh prebuild uid=0 nice=19 oom=1000 sid=same", "cluster.sh rootfs uid=0 nice=19 oom=1000 sid=same", "make test"},
			after:  []string{"make e2e-smoke"}},
		{name: "install fails", fails: "install-deps", first: install[:2]},
		{name: "make test fails", fails: "make test", first: install, beside: beside, after: stopped},
		{name: "cancelled", fails: "cancel", first: install, beside: beside, after: stopped},
		{name: "prebuild fails", fails: "prebuild", first: install, beside: beside, after: smoke, warns: "prebuild"},
		{name: "rootfs fails", fails: "rootfs", first: install, beside: beside, after: smoke, warns: "rootfs"},
		{name: "smoke fails", fails: "make e2e-smoke", first: install, beside: beside, after: smoke},
	} {
		t.Run(tc.name, func(t *testing.T) {
			repo, stubs := t.TempDir(), t.TempDir()
			calls, marks := filepath.Join(repo, "calls"), t.TempDir()
			// record NAME: the stub's call goes to calls; it fails when it
			// is the step this case makes fail.
			record := "c=\"$(basename \"$0\") $*\"\necho \"$c\" >> " + calls + "\n"
			failIf := func(step string) string { return "[ \"" + step + "\" != \"" + tc.fails + "\" ]\n" }
			makeStub := "#!/bin/bash\n" + record + `
if [ "$1" = test ]; then
	# make test waits for both builds to be running beside it.
	for i in $(seq 150); do
		[ -e ` + marks + `/prebuild.started ] && [ -e ` + marks + `/rootfs.started ] && break
		sleep 0.1
	done
	[ -e ` + marks + `/prebuild.started ] && [ -e ` + marks + `/rootfs.started ] ||
		{ echo "make test stub: the builds did not start beside make test" >&2; exit 1; }
	[ "` + tc.fails + `" != cancel ] || { touch ` + marks + `/make.waiting; sleep 60; }
	[ "` + tc.fails + `" = "make test" ] || touch ` + marks + `/release
fi
[ "$c" != "` + tc.fails + `" ]
`
			// cluster.sh prebuild|rootfs: records who runs it and how,
			// says it is running, then waits until make test is done
			// (release) before it ends.
			clusterStub := "#!/bin/bash\nst=($(sed 's/.*) //' /proc/$$/stat))\n" +
				"echo \"cluster.sh $1 uid=$(id -u) nice=$(nice) oom=$(cat /proc/self/oom_score_adj) sid=${st[3]}\" >> " + calls + "\n" +
				"echo ${st[2]} > " + marks + "/$1.pgrp\ntouch " + marks + "/$1.started\necho \"$1 is building\"\n" +
				"for i in $(seq 600); do [ -e " + marks + "/release ] && break; sleep 0.1; done\n" +
				"[ \"$1\" != \"" + tc.fails + "\" ] || { echo \"$1 broke here\"; exit 1; }\n"
			for path, body := range map[string]string{
				filepath.Join(repo, ".ci/run"):                string(src),
				filepath.Join(repo, "hack/install-deps.sh"):   "#!/bin/bash\necho \"install-deps $* uid=$(id -u)\" >> " + calls + "\n" + failIf("install-deps"),
				filepath.Join(repo, "test/e2e/vm/cluster.sh"): clusterStub,
				filepath.Join(stubs, "sudo"):                  "#!/bin/bash\necho \"sudo $*\" >> " + calls + "\n[ \"$1\" != -n ] || shift\nFAKE_UID=0 exec \"$@\"\n",
				filepath.Join(stubs, "id"):                    "#!/bin/bash\necho ${FAKE_UID:-1000}\n",
				filepath.Join(stubs, "go"):                    "#!/bin/bash\n" + record,
				filepath.Join(stubs, "make"):                  makeStub,
			} {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			cmd := exec.Command("/bin/bash", filepath.Join(repo, ".ci/run"))
			cmd.Env = []string{"PATH=" + stubs + ":/usr/bin:/bin", "HOME=" + repo}
			if tc.root {
				cmd.Env = append(cmd.Env, "FAKE_UID=0")
			}
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
			if tc.fails == "cancel" {
				// CI cancels a run with SIGTERM to its process group; the
				// builds sit in process groups of their own.
				for i := 0; i < 200; i++ {
					if _, err := os.Stat(filepath.Join(marks, "make.waiting")); err == nil {
						break
					}
					time.Sleep(50 * time.Millisecond)
				}
				if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
			}
			err := cmd.Wait()
			// A failed build only warns; any other failure fails the run.
			if passes := tc.fails == "" || tc.warns != ""; passes != (err == nil) {
				t.Errorf(".ci/run: %v (it should pass: %v)\n%s", err, passes, out.String())
			}
			// No build outlives .ci/run: not the build, not its children.
			for _, name := range []string{"prebuild", "rootfs"} {
				pg, err := os.ReadFile(filepath.Join(marks, name+".pgrp"))
				if err != nil {
					continue
				}
				if cmdline, alive := groupAlive(strings.TrimSpace(string(pg))); alive {
					t.Errorf("cluster.sh %s (process group %s: %s) still runs after .ci/run ended", name, strings.TrimSpace(string(pg)), cmdline)
					if n, err := strconv.Atoi(strings.TrimSpace(string(pg))); err == nil && n > 1 {
						_ = syscall.Kill(-n, syscall.SIGKILL)
					}
				}
			}
			if tc.warns != "" && (!strings.Contains(out.String(), "WARNING: cluster.sh "+tc.warns) || !strings.Contains(out.String(), tc.warns+" broke here")) {
				t.Errorf(".ci/run did not warn with the log of the failed %s build:\n%s", tc.warns, out.String())
			}
			b, _ := os.ReadFile(calls)
			got := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
			kill := regexp.MustCompile(`kill -(TERM|KILL) -- -[0-9]+`)
			for i, g := range got {
				g = kill.ReplaceAllString(g, "kill -$1 -- -PID")
				if strings.HasSuffix(g, " sid="+ownSID) {
					g = strings.TrimSuffix(g, ownSID) + "same"
				}
				got[i] = g
			}
			fix := func(l []string) []string {
				r := make([]string, len(l))
				for i, s := range l {
					r[i] = strings.ReplaceAll(s, "@STUBS@", stubs)
				}
				return r
			}
			first, beside, after := fix(tc.first), fix(tc.beside), fix(tc.after)
			ok := len(got) == len(first)+len(beside)+len(after) &&
				slices.Equal(got[:len(first)], first) &&
				slices.Equal(got[len(first)+len(beside):], after)
			if ok {
				mid := slices.Clone(got[len(first) : len(first)+len(beside)])
				slices.Sort(mid)
				want := slices.Clone(beside)
				slices.Sort(want)
				ok = slices.Equal(mid, want)
			}
			if !ok {
				t.Errorf(".ci/run ran:\n%s\nwant first:\n%s\nthen in any order:\n%s\nthen:\n%s\n.ci/run printed:\n%s",
					strings.Join(got, "\n"), strings.Join(first, "\n"), strings.Join(beside, "\n"), strings.Join(after, "\n"), out.String())
			}
		})
	}
}
