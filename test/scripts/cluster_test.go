// SPDX-License-Identifier: Apache-2.0

package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// clusterShell runs script in bash after sourcing test/e2e/vm/cluster.sh
// (which then only defines its functions), with its cache in a temporary
// directory and stubs first on PATH. It returns the combined output, the
// exit status, how long it took, and the run directory.
func clusterShell(t *testing.T, stubs, script string) (out string, code int, took time.Duration, run string) {
	t.Helper()
	cache := t.TempDir()
	run = filepath.Join(cache, "run")
	for _, d := range []string{"logs", "pids"} {
		if err := os.MkdirAll(filepath.Join(run, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Whatever the script started goes when the test ends.
	t.Cleanup(func() {
		pids, _ := filepath.Glob(filepath.Join(run, "pids", "*"))
		for _, p := range pids {
			data, _ := os.ReadFile(p)
			if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	cmd := exec.Command("bash", "-c", "source test/e2e/vm/cluster.sh && "+script)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "PATH="+stubs+":"+os.Getenv("PATH"), "E2E_CACHE="+cache, "E2E_NODES=2",
		"ACCEL_ARGS=-accel kvm -cpu host", "E2E_BRIDGE=nbdcsitest0")
	start := time.Now()
	b, err := cmd.CombinedOutput()
	took = time.Since(start)
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(b), code, took, run
}

// TestClusterQEMUExitsAtOnce: both node VMs' QEMU abort within a second,
// as on a host whose /dev/kvm opens but cannot run a guest. The run must
// stop at once with QEMU's own message on screen, not wait for the nodes
// or go on to a later, misleading error.
func TestClusterQEMUExitsAtOnce(t *testing.T) {
	stubs := t.TempDir()
	argsLog := filepath.Join(stubs, "qemu.args")
	writeStub(t, stubs, "qemu-system-x86_64", `echo "$*" >> `+argsLog+`
echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x2000000001c0000" >&2
echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3245: kvm_buf_set_msrs: Assertion failed." >&2
exit 134
`)
	out, code, took, _ := clusterShell(t, stubs, `echo /nonexistent/vmlinuz > "$RUN/vmlinuz"; start_nodes; echo "NODES STARTED"`)
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	// Either node's QEMU may be seen first: both exit at once, and under
	// load (make test beside .ci/run's builds) vmnode2's often is.
	if !regexp.MustCompile(`QEMU of vmnode[12] exited`).MatchString(out) {
		t.Errorf("output names no node whose QEMU exited:\n%s", out)
	}
	for _, want := range []string{"failed to set MSR 0x10a", "kvm_buf_set_msrs"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "NODES STARTED") || strings.Contains(out, "Ready after") {
		t.Errorf("the run went on after QEMU died:\n%s", out)
	}
	if took > 20*time.Second {
		t.Errorf("took %s to notice QEMU had exited", took)
	}
	args, err := os.ReadFile(argsLog)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(args), "-accel kvm -cpu host -display none") {
		t.Errorf("QEMU did not get the chosen accelerator's arguments: %s", args)
	}
}

// TestClusterControlPlaneExits: a control-plane process that exits while
// the nodes boot stops the run with its log, instead of a node that never
// becomes Ready 15 minutes later.
func TestClusterControlPlaneExits(t *testing.T) {
	stubs := t.TempDir()
	writeStub(t, stubs, "qemu-system-x86_64", "exec sleep 60\n")
	writeStub(t, stubs, "fake-scheduler", `echo "E1130 run.go:72] \"command failed\" err=\"listen tcp 127.0.0.1:10259: bind: address already in use\"" >&2
exit 1
`)
	out, code, took, _ := clusterShell(t, stubs, `echo /nonexistent/vmlinuz > "$RUN/vmlinuz"
start_bg kube-scheduler fake-scheduler; start_nodes; echo "NODES STARTED"`)
	if code != 1 || !strings.Contains(out, "kube-scheduler exited") || !strings.Contains(out, "bind: address already in use") {
		t.Errorf("exit %d, output:\n%s\nwant exit 1 naming kube-scheduler and its error", code, out)
	}
	if strings.Contains(out, "NODES STARTED") {
		t.Errorf("the run went on:\n%s", out)
	}
	if took > 20*time.Second {
		t.Errorf("took %s to notice", took)
	}
}

// TestClusterUpFailedStopsEverything: when up fails, what it started is
// stopped (unless E2E_KEEP=1).
func TestClusterUpFailedStopsEverything(t *testing.T) {
	stubs := t.TempDir()
	writeStub(t, stubs, "ip", "exit 0\n") // down removes the bridge: not here
	for _, keep := range []string{"", "1"} {
		out, code, _, _ := clusterShell(t, stubs, `start_bg etcd sleep 60; echo "PID=$(cat "$RUN/pids/etcd")"; E2E_KEEP=`+keep+` up_failed 1`)
		pid := 0
		for _, l := range strings.Split(out, "\n") {
			if v, ok := strings.CutPrefix(l, "PID="); ok {
				pid, _ = strconv.Atoi(v)
			}
		}
		if pid <= 1 {
			t.Fatalf("no pid in:\n%s", out)
		}
		// Reaped by init once killed: signal 0 fails for a gone process.
		alive := syscall.Kill(pid, 0) == nil
		if keep == "" {
			if code != 0 || alive {
				t.Errorf("E2E_KEEP unset: exit %d, etcd alive %v; want it stopped\n%s", code, alive, out)
			}
		} else if !alive || !strings.Contains(out, "E2E_KEEP=1 leaves the cluster running") {
			t.Errorf("E2E_KEEP=1: etcd alive %v; output:\n%s", alive, out)
		}
	}
}

// TestRunStopsWhenClusterUpFails runs test/e2e/run.sh in a scratch
// repository whose cluster.sh fails in up (as when the node VMs died): run.sh
// must stop with that failure and never reach helm, whose "Kubernetes
// cluster unreachable: Get http://localhost:8080" hid the cause before.
func TestRunStopsWhenClusterUpFails(t *testing.T) {
	repo := t.TempDir()
	if out, err := exec.Command("git", "init", "-q", repo).CombinedOutput(); err != nil {
		t.Fatalf("git init: %v\n%s", err, out)
	}
	src, err := os.ReadFile(filepath.Join(repoRoot(t), "test/e2e/run.sh"))
	if err != nil {
		t.Fatal(err)
	}
	calls := filepath.Join(repo, "calls")
	for name, body := range map[string]string{
		"test/e2e/run.sh": string(src),
		"hack/helm.sh":    "#!/bin/bash\necho " + filepath.Join(repo, "helm") + "\n",
		"helm":            "#!/bin/bash\necho \"helm $*\" >> " + calls + "\necho 'Error: INSTALLATION FAILED: Kubernetes cluster unreachable: Get \"http://localhost:8080/version\"' >&2\nexit 1\n",
		"test/e2e/vm/cluster.sh": "#!/bin/bash\necho \"cluster.sh $*\" >> " + calls + `
case $1 in
up) echo "[vm-cluster] QEMU of vmnode1 exited" >&2
    echo "    qemu-system-x86_64: error: failed to set MSR 0x10a" >&2
    exit 1 ;;
esac
exit 0
`,
		"test/e2e/vm/nbd-server.sh": "#!/bin/bash\necho \"nbd-server.sh $*\" >> " + calls + "\n",
		"test/e2e/tests.sh":         "#!/bin/bash\necho \"tests.sh\" >> " + calls + "\n",
	} {
		p := filepath.Join(repo, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("bash", "test/e2e/run.sh")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "E2E_PROVIDER=vm")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Errorf("run.sh succeeded although cluster.sh up failed:\n%s", out)
	}
	if !strings.Contains(string(out), "failed to set MSR 0x10a") {
		t.Errorf("the cause is not on screen:\n%s", out)
	}
	if strings.Contains(string(out), "cluster up in") {
		t.Errorf("run.sh reported the cluster up:\n%s", out)
	}
	got, _ := os.ReadFile(calls)
	if want := "cluster.sh build\ncluster.sh up\n"; string(got) != want {
		t.Errorf("run.sh ran:\n%s\nwant only:\n%s", got, want)
	}
}
