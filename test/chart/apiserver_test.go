// SPDX-License-Identifier: Apache-2.0

package chart

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/nbd-csi/nbd-csi/internal/kubetest"
)

// TestChartServerDryRun: what the chart renders for each values file is
// accepted by a real kube-apiserver (server-side dry run: the API's own
// validation of every field, e.g. StorageClass allowedTopologies, PDB,
// probes on named ports), the helm test pod included. The
// prometheus-operator kinds are left out: their CRDs are not installed.
func TestChartServerDryRun(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		if os.Getenv(kubetest.RequireEnv) == "1" {
			t.Fatal("kubectl not in PATH")
		}
		t.Skip("kubectl not in PATH")
	}
	c, err := kubetest.Start("../../charts/nbd-csi/crds")
	if errors.Is(err, kubetest.ErrMissing) && os.Getenv(kubetest.RequireEnv) != "1" {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := c.WriteKubeconfig(kubeconfig); err != nil {
		t.Fatal(err)
	}
	// The controller-manager (absent here) makes every namespace's default
	// ServiceAccount, which the helm test pod runs as.
	if out, err := exec.Command(kubectl, "--kubeconfig", kubeconfig, "-n", "kube-system", "create", "serviceaccount", "default").CombinedOutput(); err != nil {
		t.Fatalf("create the default ServiceAccount: %v\n%s", err, out)
	}
	for _, values := range [][]string{nil, {"production.yaml"}, {"hostpath.yaml"}, {"custom.yaml"}} {
		var docs bytes.Buffer
		enc := yaml.NewEncoder(&docs)
		for key, o := range render(t, values...) {
			if strings.HasPrefix(key, "ServiceMonitor/") || strings.HasPrefix(key, "PrometheusRule/") || strings.HasPrefix(key, "CustomResourceDefinition/") {
				continue
			}
			if err := enc.Encode(o); err != nil {
				t.Fatal(err)
			}
		}
		enc.Close()
		cmd := exec.Command(kubectl, "--kubeconfig", kubeconfig, "apply", "--dry-run=server", "-f", "-")
		cmd.Stdin = &docs
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("values %v: the API server refuses the chart's objects: %v\n%s", values, err, out)
		} else {
			t.Logf("values %v: %d objects accepted", values, strings.Count(string(out), "(server dry run)"))
		}
	}
}
