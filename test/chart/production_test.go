// SPDX-License-Identifier: Apache-2.0

package chart

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/metrics"
)

// podSpecs returns the pod specs of the chart's workloads (and its test pod)
// by "Kind/name".
func podSpecs(objs map[string]object) map[string]map[string]any {
	out := map[string]map[string]any{}
	for key, o := range objs {
		switch {
		case strings.HasPrefix(key, "Deployment/"), strings.HasPrefix(key, "DaemonSet/"):
			out[key] = get(o, "spec", "template", "spec").(map[string]any)
		case strings.HasPrefix(key, "Pod/"):
			out[key] = get(o, "spec").(map[string]any)
		}
	}
	return out
}

func containers(spec map[string]any) []map[string]any {
	var out []map[string]any
	for _, k := range []string{"initContainers", "containers"} {
		if l, ok := spec[k].([]any); ok {
			for _, c := range l {
				out = append(out, c.(map[string]any))
			}
		}
	}
	return out
}

// TestChartProductionDefaults: what an admin expects of the defaults.
func TestChartProductionDefaults(t *testing.T) {
	objs := render(t)
	specs := podSpecs(objs)
	for _, key := range []string{"Deployment/nbd-csi-controller", "DaemonSet/nbd-csi-node"} {
		spec := specs[key]
		if get(spec, "nodeSelector", "kubernetes.io/os") != "linux" {
			t.Errorf("%s nodeSelector %v, want kubernetes.io/os: linux", key, spec["nodeSelector"])
		}
		for _, c := range containers(spec) {
			if get(c, "resources", "requests", "memory") == nil {
				t.Errorf("%s container %s has no resource requests", key, c["name"])
			}
		}
	}
	if p := get(specs["Deployment/nbd-csi-controller"], "priorityClassName"); p != "system-cluster-critical" {
		t.Errorf("controller priorityClassName %v", p)
	}
	if get(objs["PodDisruptionBudget/nbd-csi-controller"], "spec", "maxUnavailable") != 1 {
		t.Errorf("controller PDB: %v", objs["PodDisruptionBudget/nbd-csi-controller"])
	}
	// Each sidecar serves metrics and leader-election health on its port.
	dep := objs["Deployment/nbd-csi-controller"]
	ports := map[string]bool{}
	for _, name := range []string{"csi-provisioner", "csi-attacher", "csi-resizer"} {
		c := container(t, dep, name)
		port := fmt.Sprint(get(c, "ports", 0, "containerPort"))
		if !slices.Contains(toStrings(c["args"]), "--http-endpoint=:"+port) || get(c, "livenessProbe", "httpGet", "path") != "/healthz/leader-election" {
			t.Errorf("%s: args %v, ports %v, liveness %v", name, c["args"], c["ports"], c["livenessProbe"])
		}
		ports[fmt.Sprint(get(c, "ports", 0, "name"))] = true
	}
	reg := container(t, objs["DaemonSet/nbd-csi-node"], "node-driver-registrar")
	if !slices.Contains(toStrings(reg["args"]), "--http-endpoint=:9810") || get(reg, "livenessProbe", "httpGet", "path") != "/healthz" {
		t.Errorf("registrar args %v, liveness %v", reg["args"], reg["livenessProbe"])
	}
	// The metrics Services name every metrics port; no prometheus-operator
	// object unless asked (its CRDs may be absent).
	var svcPorts []string
	for _, p := range get(objs["Service/nbd-csi-controller"], "spec", "ports").([]any) {
		svcPorts = append(svcPorts, fmt.Sprint(p.(map[string]any)["targetPort"]))
	}
	for p := range ports {
		if !slices.Contains(svcPorts, p) {
			t.Errorf("controller Service ports %v lack %s", svcPorts, p)
		}
	}
	if get(objs["Service/nbd-csi-node"], "spec", "ports", 0, "port") != 9809 {
		t.Errorf("node Service: %v", objs["Service/nbd-csi-node"])
	}
	for key := range objs {
		if strings.HasPrefix(key, "ServiceMonitor/") || strings.HasPrefix(key, "PrometheusRule/") || strings.HasPrefix(key, "ConfigMap/") {
			t.Errorf("default values create %s", key)
		}
	}
	// helm test: a hook pod asking every controller for /readyz (Probe).
	test := objs["Pod/nbd-csi-test-probe"]
	if get(test, "metadata", "annotations", "helm.sh/hook") != "test" ||
		!strings.Contains(fmt.Sprint(get(test, "spec", "containers", 0, "args")), "/readyz") {
		t.Errorf("helm test pod: %v", test)
	}
}

// TestChartProductionValues: registries, digests, pull secrets, scheduling
// and the monitoring objects.
func TestChartProductionValues(t *testing.T) {
	objs := render(t, "production.yaml")
	specs := podSpecs(objs)
	if len(specs) != 3 {
		t.Fatalf("pod specs %v, want controller, node and test pod", len(specs))
	}
	images := map[string]bool{}
	for key, spec := range specs {
		var secrets []string
		for _, s := range spec["imagePullSecrets"].([]any) {
			secrets = append(secrets, s.(map[string]any)["name"].(string))
		}
		if !slices.Equal(secrets, []string{"regcred", "other"}) {
			t.Errorf("%s imagePullSecrets %v, want regcred and other", key, secrets)
		}
		for _, c := range containers(spec) {
			img := c["image"].(string)
			images[img] = true
			if !strings.HasPrefix(img, "mirror.example.com:5000/") {
				t.Errorf("%s %s: image %s ignores global.imageRegistry", key, c["name"], img)
			}
		}
	}
	for _, want := range []string{
		"mirror.example.com:5000/nbd-csi/nbd-csi:0.1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		"mirror.example.com:5000/csi/provisioner:v6.4.0", // its own registry replaced
		"mirror.example.com:5000/sig-storage/csi-node-driver-registrar:v2.17.0",
	} {
		if !images[want] {
			t.Errorf("no container runs %s; images %v", want, images)
		}
	}
	ctrl, node := specs["Deployment/nbd-csi-controller"], specs["DaemonSet/nbd-csi-node"]
	if ctrl["priorityClassName"] != "high" || get(ctrl, "affinity", "nodeAffinity") == nil || get(ctrl, "affinity", "podAntiAffinity") != nil {
		t.Errorf("controller scheduling: priority %v, affinity %v", ctrl["priorityClassName"], ctrl["affinity"])
	}
	// Admins limit the DaemonSet with a nodeSelector (merged with the OS one).
	if get(node, "nodeSelector", "nbd.example.com/ready") != "yes" || get(node, "affinity", "nodeAffinity") == nil {
		t.Errorf("node scheduling: selector %v, affinity %v", node["nodeSelector"], node["affinity"])
	}
	if get(objs["PodDisruptionBudget/nbd-csi-controller"], "spec", "maxUnavailable") != 0 {
		t.Error("podDisruptionBudget.maxUnavailable not applied")
	}

	for _, c := range []string{"controller", "node"} {
		sm := objs["ServiceMonitor/nbd-csi-"+c]
		if get(sm, "metadata", "labels", "release") != "prom" || get(sm, "spec", "endpoints", 0, "interval") != "15s" ||
			get(sm, "spec", "selector", "matchLabels", "app") != "nbd-csi-"+c {
			t.Errorf("ServiceMonitor %s: %v", c, sm)
		}
	}
	// Every series the alerts and the dashboard use is one nbd-csi exports.
	rules := objs["PrometheusRule/nbd-csi"]
	var alerts []string
	var exprs []string
	for _, r := range get(rules, "spec", "groups", 0, "rules").([]any) {
		alerts = append(alerts, r.(map[string]any)["alert"].(string))
		exprs = append(exprs, r.(map[string]any)["expr"].(string))
	}
	for _, want := range []string{"NbdCsiVolumeDegraded", "NbdCsiReconnectStorm", "NbdCsiPoolExhausted", "NbdCsiControllerDown"} {
		if !slices.Contains(alerts, want) {
			t.Errorf("PrometheusRule lacks %s (has %v)", want, alerts)
		}
	}
	dash := get(objs["ConfigMap/nbd-csi-dashboard"], "data", "nbd-csi.json")
	if get(objs["ConfigMap/nbd-csi-dashboard"], "metadata", "labels", "grafana_dashboard") != "1" || dash == nil {
		t.Fatalf("dashboard ConfigMap: %v", objs["ConfigMap/nbd-csi-dashboard"])
	}
	var d map[string]any
	if err := json.Unmarshal([]byte(dash.(string)), &d); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	for _, p := range d["panels"].([]any) {
		for _, tg := range p.(map[string]any)["targets"].([]any) {
			exprs = append(exprs, tg.(map[string]any)["expr"].(string))
		}
	}
	known := exportedSeries(t)
	for _, e := range exprs {
		for _, s := range regexp.MustCompile(`\bnbdcsi_[a-z_]+`).FindAllString(e, -1) {
			if !known[s] {
				t.Errorf("%q uses %s, which nbd-csi does not export (it exports %v)", e, s, known)
			}
		}
	}

	// Numbers in StorageClass parameters become strings; binding waits for
	// the consumer unless asked; only nbd-capable nodes are allowed.
	sc := objs["StorageClass/numbers"]
	for k, want := range map[string]string{"connections": "4", "blockSize": "4096", "timeout": "30s"} {
		if got := get(sc, "parameters", k); got != want {
			t.Errorf("parameter %s = %#v, want %q", k, got, want)
		}
	}
	if sc["volumeBindingMode"] != "WaitForFirstConsumer" || objs["StorageClass/immediate"]["volumeBindingMode"] != "Immediate" {
		t.Errorf("volumeBindingMode: %v, %v", sc["volumeBindingMode"], objs["StorageClass/immediate"]["volumeBindingMode"])
	}
	term := get(sc, "allowedTopologies", 0, "matchLabelExpressions", 0)
	if get(term, "key") != driver.TopologyKeyCapable || fmt.Sprint(get(term, "values")) != "["+driver.TopologyCapable+"]" {
		t.Errorf("allowedTopologies %v, want %s in [%s]", sc["allowedTopologies"], driver.TopologyKeyCapable, driver.TopologyCapable)
	}
}

// exportedSeries lists the series names nbd-csi serves: the metrics
// package's own and the gauges cmd/nbd-csi registers, with the histogram
// suffixes.
func exportedSeries(t *testing.T) map[string]bool {
	t.Helper()
	known := map[string]bool{}
	var src []byte
	for _, glob := range []string{"../../pkg/metrics/metrics.go", "../../cmd/nbd-csi/*.go"} {
		files, _ := filepath.Glob(glob)
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			src = append(src, b...)
		}
	}
	for _, m := range regexp.MustCompile(`Name: "([a-z_]+)"|\.Gauges\("([a-z_]+)"`).FindAllStringSubmatch(string(src), -1) {
		name := metrics.Namespace + "_" + m[1] + m[2]
		known[name] = true
		if strings.HasSuffix(name, "_seconds") {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				known[name+s] = true
			}
		}
	}
	if len(known) < 5 {
		t.Fatalf("found only %v in the sources", known)
	}
	return known
}

// TestChartHostPathStore: a hostPath store runs one controller, pinned to
// the node holding the file, without setting replicas.
func TestChartHostPathStore(t *testing.T) {
	objs := render(t, "hostpath.yaml")
	dep := objs["Deployment/nbd-csi-controller"]
	if r := get(dep, "spec", "replicas"); r != 1 {
		t.Errorf("replicas %v, want 1", r)
	}
	spec := get(dep, "spec", "template", "spec")
	if get(spec, "nodeSelector", "kubernetes.io/hostname") != "worker-1" || get(spec, "nodeSelector", "kubernetes.io/os") != "linux" {
		t.Errorf("nodeSelector %v, want the store's node", get(spec, "nodeSelector"))
	}
	if get(dep, "spec", "strategy", "type") != "Recreate" || get(spec, "affinity") != nil {
		t.Errorf("strategy %v, affinity %v", get(dep, "spec", "strategy"), get(spec, "affinity"))
	}
}
