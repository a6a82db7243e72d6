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
// process), from /proc/PID/stat; ok is false once the process is gone or a
// zombie.
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

// groupAlive returns the command line of a live process of process group
// pgrp, if there is one.
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

// fileText reads a file whenever it is printed.
type fileText string

func (f fileText) String() string { b, _ := os.ReadFile(string(f)); return string(b) }

// waitFor polls for path up to d.
func waitFor(path string, d time.Duration) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return true
		}
	}
	return false
}

// cirunCase is one run of .ci/run with stubs.
type cirunCase struct {
	name string
	root bool
	// fails: the step that fails (install-deps, make test, prebuild,
	// rootfs, make e2e-smoke), or how the run is cut short: cancel
	// (SIGTERM to its process group, as CI does), cancel pid (SIGTERM to
	// .ci/run alone), cancel twice (then SIGTERM again while it cleans
	// up), kill (SIGKILL to .ci/run alone), kill unreaped (the same, and
	// .ci/run stays a zombie while the test looks).
	fails string
	// build: how the prebuild stub behaves: "" (ends when make test is
	// done), "ignores TERM", "stops" (SIGSTOP to itself), "lingers" (a
	// child that takes 1 s to end after TERM).
	build string
	// The stubs' calls: first these, then beside in any order, then after.
	first, beside, after []string
	// passes: .ci/run exits 0; warns: its output names this failed build.
	passes bool
	warns  string
	// ignoreIntQuit: .ci/run starts with SIGINT and SIGQUIT ignored.
	ignoreIntQuit bool
}

// TestCIRunInstallsThenTests runs .ci/run in a scratch repository with stub
// programs. It must install the packages of the groups "test" and "e2e-vm"
// (through sudo when not root) with hack/install-deps.sh, then start the
// smoke's one-time builds beside make test — cluster.sh prebuild, and
// cluster.sh rootfs when root — at nice 19, first for the OOM killer, each
// in a process group of its own within .ci/run's session (a new session is
// a scheduler autogroup of its own, where nice ranks against nothing), then
// run make test, then the cluster smoke (make e2e-smoke) as root with the
// PATH that found go. A failed build only warns (the smoke builds what is
// missing); a failed install or make test, or a cancel, stops the run, and
// no process of make test or of a build outlives it: not a child slow to
// end, not a stopped one, not one that ignores TERM (KILL after 20 s), not
// after a second cancel, not when .ci/run itself is SIGKILLed. The stub of
// make test waits for the builds to have started: run one after the other,
// they never meet and it fails.
func TestCIRunInstallsThenTests(t *testing.T) {
	src, err := os.ReadFile(filepath.Join(repoRoot(t), ".ci/run"))
	if err != nil {
		t.Fatal(err)
	}
	user := []string{"sudo hack/install-deps.sh test e2e-vm", "install-deps test e2e-vm uid=0", "go version"}
	root := []string{"install-deps test e2e-vm uid=0", "go version"}
	prebuild := "cluster.sh prebuild uid=1000 nice=19 oom=1000 session=same pgrp=own intquit=same"
	rootBuilds := []string{"cluster.sh prebuild uid=0 nice=19 oom=1000 session=same pgrp=own intquit=same", "cluster.sh rootfs uid=0 nice=19 oom=1000 session=same pgrp=own intquit=same", "make test"}
	userSmoke := []string{"sudo env PATH=@STUBS@:/usr/bin:/bin make e2e-smoke", "make e2e-smoke"}
	rootSmoke := []string{"make e2e-smoke"}
	for _, tc := range []cirunCase{
		{name: "all pass", first: user, beside: []string{prebuild, "make test"}, after: userSmoke, passes: true},
		{name: "as root", root: true, first: root, beside: rootBuilds, after: rootSmoke, passes: true},
		{name: "INT and QUIT ignored", root: true, ignoreIntQuit: true, first: root, beside: rootBuilds, after: rootSmoke, passes: true},
		{name: "install fails", fails: "install-deps", first: user[:2]},
		{name: "make test fails", fails: "make test", first: user, beside: []string{prebuild, "make test"}},
		{name: "make test fails as root", root: true, fails: "make test", first: root, beside: rootBuilds},
		{name: "cancelled", root: true, fails: "cancel", first: root, beside: rootBuilds},
		{name: "cancelled, .ci/run alone", root: true, fails: "cancel pid", first: root, beside: rootBuilds},
		{name: "cancelled twice", root: true, fails: "cancel twice", build: "lingers", first: root, beside: rootBuilds},
		{name: "killed", root: true, fails: "kill", first: root, beside: rootBuilds},
		{name: "killed, not reaped", root: true, fails: "kill unreaped", first: root, beside: rootBuilds},
		{name: "killed, build ignores TERM", root: true, fails: "kill", build: "ignores TERM", first: root, beside: rootBuilds},
		{name: "build lingers", root: true, fails: "make test", build: "lingers", first: root, beside: rootBuilds},
		{name: "build stopped", root: true, fails: "make test", build: "stops", first: root, beside: rootBuilds},
		{name: "build ignores TERM", root: true, fails: "make test", build: "ignores TERM", first: root, beside: rootBuilds},
		{name: "prebuild fails", root: true, fails: "prebuild", first: root, beside: rootBuilds, after: rootSmoke, passes: true, warns: "prebuild"},
		{name: "rootfs fails", root: true, fails: "rootfs", first: root, beside: rootBuilds, after: rootSmoke, passes: true, warns: "rootfs"},
		{name: "smoke fails", fails: "make e2e-smoke", first: user, beside: []string{prebuild, "make test"}, after: userSmoke},
	} {
		t.Run(tc.name, func(t *testing.T) { runCIRun(t, string(src), tc) })
	}
}

func runCIRun(t *testing.T, src string, tc cirunCase) {
	repo, stubs, marks := t.TempDir(), t.TempDir(), t.TempDir()
	calls := filepath.Join(repo, "calls")
	_, ownSID, _ := procStat("self")
	// Whether this test ignores SIGINT and SIGQUIT (bits 2 and 3 of
	// SigIgn): the builds get them as .ci/run got them, not ignored the way
	// bash ignores them for background commands.
	ownIntQuit := "0"
	if st, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, l := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(l, "SigIgn:"); ok {
				if n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil {
					ownIntQuit = strconv.FormatUint(n&6, 10)
				}
			}
		}
	}
	// Each stub records its call in calls, and the process group it runs
	// in as marks/NAME.pgrp.
	record := "c=\"$(basename \"$0\") $*\"\necho \"$c\" >> " + calls + "\n"
	pgrp := "st=($(sed 's/.*) //' /proc/$$/stat))\n"
	makeStub := "#!/bin/bash\n" + record + pgrp + `
if [ "$1" = test ]; then
	echo ${st[2]} > ` + marks + `/make.pgrp
	# make test waits for the builds to be running beside it.
	builds="prebuild"; [ -z "$FAKE_UID" ] || builds="prebuild rootfs"
	for b in $builds; do
		for i in $(seq 150); do [ -e ` + marks + `/$b.started ] && break; sleep 0.1; done
		[ -e ` + marks + `/$b.started ] || { echo "make test stub: $b did not start beside make test" >&2; exit 1; }
	done
	case "` + tc.fails + `" in
	cancel*|kill*) touch ` + marks + `/make.waiting; sleep 60 ;;
	"make test") touch ` + marks + `/make.failed; exit 1 ;;
	esac
	touch ` + marks + `/release
fi
[ "$c" != "make ` + strings.TrimPrefix(tc.fails, "make ") + `" ]
`
	// cluster.sh prebuild|rootfs: records who runs it and how, says it is
	// running, then waits until make test is done (release).
	behave := map[string]string{
		"ignores TERM": "trap '' TERM\n",
		"stops":        "trap 'exit 143' TERM\ntouch " + marks + "/prebuild.started\nkill -STOP $$\n", // acts on TERM only when continued
		"lingers": "( trap 'sleep 1; exit 0' TERM; touch " + marks + "/child; while :; do sleep 0.1; done ) &\n" +
			"until [ -e " + marks + "/child ]; do sleep 0.05; done\n",
	}[tc.build]
	wantIntQuit := ownIntQuit
	if tc.ignoreIntQuit {
		wantIntQuit = "6"
	}
	clusterStub := "#!/bin/bash\n" + pgrp +
		"[ \"${st[2]}\" = \"$(cat " + marks + "/cirun.pgrp)\" ] && g=cirun || g=own\n" +
		"[ \"${st[3]}\" = " + ownSID + " ] && s=same || s=${st[3]}\n" +
		// What a command the build runs gets (bash itself ignores QUIT).
		"ign=$(awk '/^SigIgn/ {print $2}' /proc/self/status)\n" +
		"[ $((0x$ign & 6)) = " + wantIntQuit + " ] && iq=same || iq=$((0x$ign & 6))\n" +
		"echo \"cluster.sh $1 uid=$(id -u) nice=$(nice) oom=$(cat /proc/self/oom_score_adj) session=$s pgrp=$g intquit=$iq\" >> " + calls + "\n" +
		"echo ${st[2]} > " + marks + "/$1.pgrp\necho \"$1 is building\"\n" +
		// The behaviour is in place before make test's stub sees started.
		"[ \"$1\" != prebuild ] || {\n:\n" + behave + "}\ntouch " + marks + "/$1.started\n" +
		"for i in $(seq 600); do [ -e " + marks + "/release ] && break; sleep 0.1; done\n" +
		"[ \"$1\" != \"" + tc.fails + "\" ] || { echo \"$1 broke here\"; exit 1; }\n"
	for path, body := range map[string]string{
		filepath.Join(repo, ".ci/run"):                src,
		filepath.Join(repo, "hack/install-deps.sh"):   "#!/bin/bash\necho \"install-deps $* uid=$(id -u)\" >> " + calls + "\n[ install-deps != \"" + tc.fails + "\" ]\n",
		filepath.Join(repo, "test/e2e/vm/cluster.sh"): clusterStub,
		filepath.Join(stubs, "sudo"):                  "#!/bin/bash\necho \"sudo $*\" >> " + calls + "\nFAKE_UID=0 exec \"$@\"\n",
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
	if tc.ignoreIntQuit {
		// Started with SIGINT and SIGQUIT ignored, as by a shell's
		// background command (many CI runners): so are its jobs.
		cmd = exec.Command("/bin/bash", "-c", `trap '' INT QUIT; exec /bin/bash "$0"`, filepath.Join(repo, ".ci/run"))
	}
	cmd.Env = []string{"PATH=" + stubs + ":/usr/bin:/bin", "HOME=" + repo}
	if tc.root {
		cmd.Env = append(cmd.Env, "FAKE_UID=0")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// A file, not a pipe: Wait must return when .ci/run ends, not when the
	// last process holding its output does.
	outFile, err := os.Create(filepath.Join(marks, "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer outFile.Close()
	out := fileText(outFile.Name())
	cmd.Stdout, cmd.Stderr = outFile, outFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	if err := os.WriteFile(filepath.Join(marks, "cirun.pgrp"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	wait := func() { done <- cmd.Wait() }
	if tc.fails != "kill unreaped" {
		go wait()
	}
	// No process of make test or of a build outlives .ci/run; killed, it
	// leaves them to their watchdogs (every 2 s; KILL 20 s after TERM).
	survivors := func() {
		grace := time.Duration(0)
		if strings.HasPrefix(tc.fails, "kill") {
			grace = 10 * time.Second
			if tc.build == "ignores TERM" {
				grace = 30 * time.Second
			}
		}
		for _, name := range []string{"make", "prebuild", "rootfs"} {
			b, err := os.ReadFile(filepath.Join(marks, name+".pgrp"))
			if err != nil {
				continue
			}
			pg := strings.TrimSpace(string(b))
			cmdline, alive := groupAlive(pg)
			for end := time.Now().Add(grace); alive && time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
				cmdline, alive = groupAlive(pg)
			}
			if alive {
				t.Errorf("%s (process group %s: %s) still runs after .ci/run ended", name, pg, cmdline)
				if n, err := strconv.Atoi(pg); err == nil && n > 1 {
					_ = syscall.Kill(-n, syscall.SIGKILL)
				}
			}
		}
	}
	switch {
	case strings.HasPrefix(tc.fails, "cancel") || strings.HasPrefix(tc.fails, "kill"):
		if !waitFor(filepath.Join(marks, "make.waiting"), 30*time.Second) {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			t.Fatalf("make test's stub never got to wait for the cancel:\n%s", out.String())
		}
		sig, target := syscall.SIGTERM, -pid
		switch tc.fails {
		case "kill", "kill unreaped":
			sig, target = syscall.SIGKILL, pid
		case "cancel pid":
			target = pid
		}
		if err := syscall.Kill(target, sig); err != nil {
			t.Fatal(err)
		}
		if tc.fails == "cancel twice" {
			time.Sleep(300 * time.Millisecond)
			_ = syscall.Kill(pid, syscall.SIGTERM)
		}
	}
	if tc.fails == "kill unreaped" {
		// Killed and not yet reaped (a zombie): kill -0 still finds it;
		// its jobs' watchdogs must not be fooled.
		survivors()
		go wait()
	}
	err = <-done
	ended := time.Now()
	if tc.passes != (err == nil) {
		t.Errorf(".ci/run: %v (should pass: %v)\n%s", err, tc.passes, out.String())
	}
	if tc.fails != "kill unreaped" {
		survivors()
	}
	if tc.build == "ignores TERM" && !strings.HasPrefix(tc.fails, "kill") &&
		(!strings.Contains(out.String(), "still running 20 s after TERM, now KILLed") ||
			!regexp.MustCompile(`(?m)^\s*[0-9]+\s+[0-9]+\s+\S+.*cluster\.sh prebuild`).MatchString(out.String())) {
		t.Errorf(".ci/run did not say, with ps, which build it had to KILL:\n%s", out.String())
	}
	// .ci/run ends soon after make test failed: its jobs stopped, not
	// waited for (the builds' stubs run a minute unless stopped).
	if st, err := os.Stat(filepath.Join(marks, "make.failed")); err == nil && tc.build != "ignores TERM" {
		if took := ended.Sub(st.ModTime()); took > 10*time.Second {
			t.Errorf(".ci/run took %s to stop its jobs after make test failed", took)
		}
	}
	if tc.warns == "" && strings.Contains(out.String(), "WARNING: cluster.sh") {
		t.Errorf(".ci/run warned of a failed build:\n%s", out.String())
	}
	if tc.warns != "" && (!strings.Contains(out.String(), "WARNING: cluster.sh "+tc.warns) || !strings.Contains(out.String(), tc.warns+" broke here")) {
		t.Errorf(".ci/run did not warn with the log of the failed %s build:\n%s", tc.warns, out.String())
	}
	b, _ := os.ReadFile(calls)
	got := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
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
}
