// SPDX-License-Identifier: Apache-2.0

package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
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

// TestCIRunInstallsThenTests runs .ci/run in a scratch repository with
// stub programs: as a non-root user it must install the packages of the
// groups "test" and "e2e-vm" through sudo and hack/install-deps.sh (the
// same step make test and the vm provider run), then run make test, then
// the cluster smoke (make e2e-smoke) as root with the PATH that found go;
// it stops at the first step that fails.
func TestCIRunInstallsThenTests(t *testing.T) {
	src, err := os.ReadFile(filepath.Join(repoRoot(t), ".ci/run"))
	if err != nil {
		t.Fatal(err)
	}
	install := "sudo hack/install-deps.sh test e2e-vm\ninstall-deps test e2e-vm uid=0\n"
	for _, tc := range []struct {
		name, fails, want string
	}{
		{"all pass", "", install + "go version\nmake test\nsudo env PATH=@STUBS@:/usr/bin:/bin make e2e-smoke\nmake e2e-smoke\n"},
		{"install fails", "install-deps", install},
		{"make test fails", "make test", install + "go version\nmake test\n"},
		{"smoke fails", "make e2e-smoke", install + "go version\nmake test\nsudo env PATH=@STUBS@:/usr/bin:/bin make e2e-smoke\nmake e2e-smoke\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			repo, stubs := t.TempDir(), t.TempDir()
			calls := filepath.Join(repo, "calls")
			// Each stub records its call, then fails when it is the step
			// this case makes fail.
			record := func(name string) string {
				return "#!/bin/bash\nc=\"" + name + " $*\"\necho \"$c\" >> " + calls + "\n[ \"$c\" != \"" + tc.fails + "\" ] && [ \"" + name + "\" != \"" + tc.fails + "\" ]\n"
			}
			for path, body := range map[string]string{
				filepath.Join(repo, ".ci/run"):              string(src),
				filepath.Join(repo, "hack/install-deps.sh"): "#!/bin/bash\necho \"install-deps $* uid=$(id -u)\" >> " + calls + "\n[ install-deps != \"" + tc.fails + "\" ]\n",
				filepath.Join(stubs, "sudo"):                "#!/bin/bash\necho \"sudo $*\" >> " + calls + "\nFAKE_UID=0 exec \"$@\"\n",
				filepath.Join(stubs, "id"):                  "#!/bin/bash\necho ${FAKE_UID:-1000}\n",
				filepath.Join(stubs, "go"):                  record("go"),
				filepath.Join(stubs, "make"):                record("make"),
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
			out, err := cmd.CombinedOutput()
			got, _ := os.ReadFile(calls)
			switch {
			case tc.fails != "" && err == nil:
				t.Errorf(".ci/run succeeded although %s failed:\n%s", tc.fails, out)
			case tc.fails == "" && err != nil:
				t.Errorf(".ci/run: %v\n%s", err, out)
			}
			if want := strings.ReplaceAll(tc.want, "@STUBS@", stubs); string(got) != want {
				t.Errorf(".ci/run ran:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}
