// SPDX-License-Identifier: Apache-2.0

package chart

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// promtool returns a promtool binary (hack/promtool.sh builds the pinned
// version from the Go module proxy).
func promtool(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(root, "hack/promtool.sh"))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		if os.Getenv("NBDCSI_REQUIRE_SERVERS") == "1" {
			t.Fatalf("no promtool: %v", err)
		}
		t.Skipf("no promtool: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// TestPrometheusRules checks what the chart ships for Prometheus with
// Prometheus' own tool: the PrometheusRule's groups pass `promtool check
// rules` and the alert unit tests in testdata/alerts-test.yaml (each alert
// fires on what it is for, after its "for", and not on what it is not
// for), and every query of the Grafana dashboard parses (as a recording
// rule, with its variables filled in).
func TestPrometheusRules(t *testing.T) {
	objs := render(t, "production.yaml")
	bin := promtool(t)
	dir := t.TempDir()
	write := func(name string, v any) string {
		t.Helper()
		b, err := yaml.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	run := func(args ...string) {
		t.Helper()
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}

	rule, ok := objs["PrometheusRule/nbd-csi"]
	if !ok {
		t.Fatal("production.yaml renders no PrometheusRule/nbd-csi")
	}
	alerts := write("alerts.yaml", map[string]any{"groups": get(rule, "spec", "groups")})
	run("check", "rules", alerts)
	tests, err := os.ReadFile(filepath.Join("testdata", "alerts-test.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "alerts-test.yaml"), tests, 0o644); err != nil {
		t.Fatal(err)
	}
	run("test", "rules", filepath.Join(dir, "alerts-test.yaml"))

	// Every alert has a unit test.
	for _, r := range get(rule, "spec", "groups", 0, "rules").([]any) {
		name := r.(map[string]any)["alert"].(string)
		if !strings.Contains(string(tests), "alertname: "+name+"\n") {
			t.Errorf("alert %s has no unit test in testdata/alerts-test.yaml", name)
		}
	}

	var d struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal([]byte(get(objs["ConfigMap/nbd-csi-dashboard"], "data", "nbd-csi.json").(string)), &d); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	vars := strings.NewReplacer("$__rate_interval", "5m", "$namespace", "kube-system")
	var rules []map[string]string
	for _, p := range d.Panels {
		for i, tg := range p.Targets {
			if strings.Contains(vars.Replace(tg.Expr), "$") {
				t.Errorf("panel %q: a variable the test does not know in %q", p.Title, tg.Expr)
			}
			rules = append(rules, map[string]string{"record": fmt.Sprintf("dashboard:panel%d_%d", len(rules), i), "expr": vars.Replace(tg.Expr)})
		}
	}
	if len(rules) == 0 {
		t.Fatal("the dashboard has no queries")
	}
	run("check", "rules", write("dashboard.yaml", map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}}))
}
