// SPDX-License-Identifier: Apache-2.0

package scripts

import (
	"os"
	"os/exec"
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
