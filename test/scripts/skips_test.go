// SPDX-License-Identifier: Apache-2.0

package scripts

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// allowedSkips lists every place in a _test.go file that can skip a test
// (file: the trimmed line), with why it cannot make `make test` pass by
// skipping. A new skip must be added here with its reason: either it is
// turned into a failure by NBDCSI_REQUIRE_SERVERS, NBDCSI_REQUIRE_VM or
// NBDCSI_REQUIRE_KUBE (which make test sets) or by NBDCSI_IN_VM (set in the
// VM rig), or the test does not apply where it is skipped and make test runs
// it elsewhere.
var allowedSkips = map[string]string{
	// The rules themselves.
	`internal/servers/servers.go: t.Skipf("%s not installed: %v", name, err)`:                                                   "NBDCSI_REQUIRE_SERVERS=1 turns it into t.Fatalf",
	`internal/kubetest/kubetest.go: t.Skip("no Kubernetes API server: " + skipReason)`:                                          "NBDCSI_REQUIRE_KUBE=1 turns it into a failure",
	`internal/kubetest/kubetest_test.go: t.Skip(err)`:                                                                           "guarded by os.Getenv(RequireEnv) != \"1\" (NBDCSI_REQUIRE_KUBE)",
	`test/chart/chart_test.go: t.Skipf("no helm: %v", err)`:                                                                     "NBDCSI_REQUIRE_SERVERS=1 turns it into t.Fatalf",
	`test/chart/prometheus_test.go: t.Skipf("no promtool: %v", err)`:                                                            "NBDCSI_REQUIRE_SERVERS=1 turns it into t.Fatalf",
	`pkg/driver/blank_test.go: t.Skipf("%s is not installed: %v", name, err)`:                                                   "NBDCSI_REQUIRE_SERVERS=1 turns it into t.Fatalf",
	`test/kernel/bench_breakdown_test.go: t.Skip("benchmark: set NBDCSI_BENCH=1 (bench/kernel.sh does)")`:                       "a benchmark (make bench), not a test",
	`test/vm/vm_test.go: t.Skip(err)`:                                                                                           "rig unavailable: NBDCSI_REQUIRE_VM=1 turns it into t.Fatalf",
	`test/vm/accel_test.go: t.Skip(err)`:                                                                                        "rig unavailable: NBDCSI_REQUIRE_VM=1 turns it into t.Fatalf",
	`cmd/nbd-csi/owner_test.go: t.Skip("needs root for tmpfs mounts")`:                                                          "NBDCSI_REQUIRE_SERVERS=1 turns it into t.Fatal",
	`pkg/crypt/crypt_test.go: t.Skip("cryptsetup is not installed (Debian: cryptsetup-bin); the VM kernel tests cover it too")`: "NBDCSI_REQUIRE_SERVERS=1 turns it into t.Fatal",
	`test/chart/apiserver_test.go: t.Skip(err)`:                                                                                 "guarded by os.Getenv(kubetest.RequireEnv) != \"1\" (NBDCSI_REQUIRE_KUBE)",
	// Not applicable where reached; make test runs them elsewhere.
	`test/kernel/bench_encrypt_test.go: t.Skip("benchmark: set NBDCSI_BENCH=1 (bench/kernel.sh does)")`:         "a benchmark (make bench), not a test",
	`test/vm/accel_test.go: t.Skip("boots a VM; skipped in -short mode")`:                                       "make unit runs -short; make vm-test runs ^TestVM without it",
	`test/vm/vm_test.go: t.Skip("boots a VM; skipped in -short mode")`:                                          "make unit runs -short; make vm-test runs ^TestVM without it",
	`test/vm/vm_test.go: t.Skip("already inside the VM")`:                                                       "a VM-booting test inside the VM",
	`test/vm/vm_test.go: t.Skipf("runs inside the VM rig only (%s=1); TestVMGoTest runs it there", vm.EnvInVM)`: "TestVMGoTest runs it in the VM and fails unless it passed there",
	`test/kernel/env_test.go: t.Skipf("kernel test: %s (make vm-test runs these in a VM)", why)`:                "host without nbd; in the VM (NBDCSI_IN_VM=1) it is t.Fatalf",
	`pkg/device/kernel_helpers_linux_test.go: skip := t.Skipf`:                                                  "host without nbd; in the VM (NBDCSI_IN_VM=1) it is t.Fatalf",
	`test/kernel/plugin_test.go: t.Skip("NBDCSI_BIN not set: build bin/nbd-csi and point NBDCSI_BIN at it")`:    "in the VM (NBDCSI_IN_VM=1) it is t.Fatal; hack/vm-test.sh sets NBDCSI_BIN",
	`test/sanity/sanity_test.go: t.Skip("needs NBDCSI_BIN and a kernel with nbd (make vm-test)")`:               "in the VM (NBDCSI_IN_VM=1) it is t.Fatal; hack/vm-test.sh runs it",
	`test/kernel/bench_stage_test.go: t.Skip("benchmark: set NBDCSI_BENCH=1 (bench/kernel.sh does)")`:           "a benchmark (make bench), not a test",
	`pkg/store/kubestore/kubestore_test.go: b.Skip("no Kubernetes API server")`:                                 "a benchmark (make bench); TestMain fails without the API server under NBDCSI_REQUIRE_KUBE=1",
	`internal/servers/servers_test.go: t.Skip("only run as a child of TestServersDieWithTestBinary")`:           "the child half of a test that runs it as a process",
	// The cluster suite (own module, make e2e; tests.sh sets NBDCSI_REQUIRE_E2E=1).
	`test/e2e/e2e_test.go: t.Skip("no cluster (KUBECONFIG)")`:                                                 "not part of make test; NBDCSI_REQUIRE_E2E=1 under make e2e",
	`test/e2e/e2e_test.go: t.Skip("the nodes have no nbd (E2E_EXPECT_NO_NBD=1)")`:                             "kind provider on hosts without nbd: the other test checks the refusal",
	`test/e2e/e2e_test.go: t.Skip("for clusters whose nodes have no nbd (E2E_EXPECT_NO_NBD=1)")`:              "the refusal test, on clusters with nbd",
	`test/e2e/e2e_test.go: t.Skip("E2E_SERVER_RESTART_CMD not set")`:                                          "provider without a server restart hook",
	`test/e2e/e2e_test.go: t.Skipf("needs two schedulable nodes, the cluster has %d", len(ns))`:               "one-node clusters",
	`test/e2e/expand_test.go: t.Skip("E2E_GROW_EXPORT_CMD not set")`:                                          "provider without a grow hook",
	`test/e2e/topology_test.go: t.Skip("E2E_NODE_WITHOUT_NBD not set (no node without nbd in this cluster)")`: "clusters without such a node (the smoke); make e2e on the vm provider sets it and requires a pass (E2E_REQUIRE_PASS)",
}

// skipCall matches the ways a test can skip itself.
var skipCall = regexp.MustCompile(`\b\w+\.Skip(f|Now)?(\(|$)`)

// TestEverySkipIsAccounted finds every skip in the repository's Go files
// and checks it against allowedSkips, so that no test can start passing by
// skipping under make test unnoticed.
func TestEverySkipIsAccounted(t *testing.T) {
	root := repoRoot(t)
	var found []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); p != root && (strings.HasPrefix(n, ".") || n == "vendor" || n == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "test/scripts/skips_test.go" { // the list itself
			return nil
		}
		for _, line := range strings.Split(string(data), "\n") {
			line = strings.TrimSpace(line)
			if strings.HasPrefix(line, "//") || !skipCall.MatchString(line) {
				continue
			}
			found = append(found, rel+": "+line)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		if _, ok := allowedSkips[f]; !ok {
			t.Errorf("unaccounted skip (add it to allowedSkips with why make test cannot pass by it, or gate it with an NBDCSI_REQUIRE_* variable):\n\t%s", f)
		}
	}
	for k := range allowedSkips {
		if !slices.Contains(found, k) {
			t.Errorf("allowedSkips lists a skip that no longer exists (remove it):\n\t%s", k)
		}
	}
}
