// SPDX-License-Identifier: Apache-2.0

package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// TestKubeBuildOneAtATime runs two hack/kube-build.sh kube-apiserver side
// by side (make test's kube step and the e2e's build can) with a stub go
// whose module preparation and build take a while: the command must be
// built once, by one of them, and the other must wait and print the same
// binary. Without the lock both prepared the generated module (rm -rf and
// rewrite) and both built, one inside a directory the other was deleting.
func TestKubeBuildOneAtATime(t *testing.T) {
	root := repoRoot(t)
	repo, stubs := t.TempDir(), t.TempDir()
	calls := filepath.Join(repo, "calls")
	for _, f := range []string{"hack/kube-build.sh", "hack/kube/go.mod.in", "hack/kube/tools.go.in"} {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(repo, f)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(repo, f), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("git", "-C", repo, "init", "-q").CombinedOutput(); err != nil {
		t.Fatalf("git init: %v\n%s", err, out)
	}
	gomod := filepath.Join(stubs, "kubernetes.mod")
	if err := os.WriteFile(gomod, []byte("module k8s.io/kubernetes\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n)\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The stub go: "mod download" names the module's go.mod, "mod tidy"
	// and "build" take a second each; build fails when its module
	// directory vanished meanwhile (another run's prepare) and records
	// when it started and ended.
	writeStub(t, stubs, "go", `
case "$1 $2" in
"mod download") printf '{\n\t"GoMod": "%s",\n\t"Version": "v1.34.4"\n}\n' "`+gomod+`" ;;
"mod tidy") sleep 1; touch go.sum ;;
build*)
	echo "build start $$" >> `+calls+`
	sleep 1
	[ -f go.mod ] || { echo "module directory gone under the build" >&2; exit 1; }
	out=""; while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
	echo binary > "$out"; chmod +x "$out"
	echo "build end $$" >> `+calls+`
	;;
*) echo "stub go: unexpected $*" >&2; exit 1 ;;
esac
`)
	var wg sync.WaitGroup
	outs := make([]string, 2)
	errs := make([]error, 2)
	for i := range outs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command("bash", filepath.Join(repo, "hack/kube-build.sh"), "kube-apiserver")
			cmd.Dir = repo
			cmd.Env = []string{"PATH=" + stubs + ":/usr/bin:/bin", "HOME=" + repo}
			b, err := cmd.CombinedOutput()
			outs[i], errs[i] = string(b), err
		}()
	}
	wg.Wait()
	want := filepath.Join(repo, ".cache/kube/bin/kube-apiserver")
	for i := range outs {
		if errs[i] != nil {
			t.Errorf("run %d: %v\n%s", i, errs[i], outs[i])
		} else if !strings.HasSuffix(strings.TrimSpace(outs[i]), want) {
			t.Errorf("run %d printed %q, want the binary %s last", i, outs[i], want)
		}
	}
	got, _ := os.ReadFile(calls)
	if n := strings.Count(string(got), "build start"); n != 1 {
		t.Errorf("kube-apiserver built %d times, want once:\n%s", n, got)
	}
}
