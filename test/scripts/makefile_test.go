// SPDX-License-Identifier: Apache-2.0

package scripts

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// TestMakeTestContract checks what `make test` does before any test runs:
// it installs the packages of the group "test" first, then runs the tiers
// with NBDCSI_REQUIRE_SERVERS, NBDCSI_REQUIRE_VM and NBDCSI_REQUIRE_KUBE set
// to 1, so that no tier can pass by skipping. DEPS and MAKE are replaced by
// commands that report instead of acting.
func TestMakeTestContract(t *testing.T) {
	cmd := exec.Command("make", "-s", "-C", repoRoot(t), "test", "DEPS=echo deps",
		"MAKE=printenv NBDCSI_REQUIRE_SERVERS NBDCSI_REQUIRE_VM NBDCSI_REQUIRE_KUBE; echo then")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NBDCSI_REQUIRE_") && !strings.HasPrefix(kv, "MAKEFLAGS=") && !strings.HasPrefix(kv, "MFLAGS=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make test: %v\n%s", err, out)
	}
	want := "deps test\n1\n1\n1\nthen verify kube unit fuzz vm-test\n"
	if string(out) != want {
		t.Errorf("make test ran:\n%s\nwant:\n%s", out, want)
	}
}

// TestMakeDemoInstallsFirst: make demo installs the demo group before
// hack/demo.sh runs (make -n prints the recipe without running it).
func TestMakeDemoInstallsFirst(t *testing.T) {
	out, err := exec.Command("make", "-n", "-C", repoRoot(t), "demo").CombinedOutput()
	if err != nil {
		t.Fatalf("make -n demo: %v\n%s", err, out)
	}
	s := string(out)
	deps, demo := strings.Index(s, "hack/install-deps.sh demo\n"), strings.Index(s, "hack/demo.sh\n")
	if deps < 0 || demo < 0 || deps > demo {
		t.Errorf("make demo does not run hack/install-deps.sh demo before hack/demo.sh:\n%s", s)
	}
}

// TestMakeTargetsNamedExist: every make target the project tells a reader
// to run — "`make X`" in the docs, "run make X" or "or make X" in messages
// and scripts — is a target of the Makefile (a kubetest error once sent
// readers to a "make kube-test" that never existed).
func TestMakeTargetsNamedExist(t *testing.T) {
	root := repoRoot(t)
	mk, err := os.ReadFile(root + "/Makefile")
	if err != nil {
		t.Fatal(err)
	}
	targets := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^([a-z][a-z0-9-]*):`).FindAllStringSubmatch(string(mk), -1) {
		targets[m[1]] = true
	}
	files, err := exec.Command("git", "-C", root, "ls-files", "*.go", "*.md", "*.sh", "*.txt", "*.yaml", ".ci/run").Output()
	if err != nil {
		t.Fatal(err)
	}
	named := regexp.MustCompile("(?:run |or |`)make ([a-z][a-z0-9-]+)")
	for _, f := range strings.Fields(string(files)) {
		if strings.Contains(f, "third_party/") {
			continue
		}
		b, err := os.ReadFile(root + "/" + f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range named.FindAllStringSubmatch(string(b), -1) {
			if !targets[m[1]] {
				t.Errorf("%s names `make %s`, which the Makefile does not have", f, m[1])
			}
		}
	}
}
