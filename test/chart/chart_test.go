// SPDX-License-Identifier: Apache-2.0

// Package chart renders the Helm chart (charts/nbd-csi) with the real helm
// binary and checks the objects it produces.
package chart

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// helm returns a helm binary (hack/helm.sh builds one from the Go module
// proxy when none is installed).
func helm(t *testing.T) (string, string) {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(root, "hack/helm.sh")).Output()
	if err != nil {
		if os.Getenv("NBDCSI_REQUIRE_SERVERS") == "1" {
			t.Fatalf("no helm: %v", err)
		}
		t.Skipf("no helm: %v", err)
	}
	return strings.TrimSpace(string(out)), filepath.Join(root, "charts/nbd-csi")
}

type object = map[string]any

// render runs helm template with the values files and returns the objects
// by "Kind/name".
func render(t *testing.T, values ...string) map[string]object {
	t.Helper()
	bin, chart := helm(t)
	args := []string{"template", "nbd-csi", chart, "--namespace", "kube-system", "--include-crds"}
	for _, v := range values {
		args = append(args, "-f", filepath.Join("testdata", v))
	}
	var stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm template %v: %v\n%s", values, err, stderr.String())
	}
	objs := map[string]object{}
	dec := yaml.NewDecoder(bytes.NewReader(out))
	for {
		var o object
		if err := dec.Decode(&o); err != nil {
			break
		}
		if o == nil {
			continue
		}
		objs[o["kind"].(string)+"/"+get(o, "metadata", "name").(string)] = o
	}
	return objs
}

// get walks maps and lists (ints index lists).
func get(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func container(t *testing.T, o object, name string) map[string]any {
	t.Helper()
	for _, c := range get(o, "spec", "template", "spec", "containers").([]any) {
		if c.(map[string]any)["name"] == name {
			return c.(map[string]any)
		}
	}
	t.Fatalf("no container %s", name)
	return nil
}

// TestChartE2EValues: the e2e installs the chart's images as shipped. Every
// sidecar the chart pins (controller and node) is an image
// test/e2e/vm/cluster.sh builds from upstream source under exactly the
// chart's default reference (build_sidecar NAME SOURCE VERSION CMD makes
// registry.k8s.io/sig-storage/CMD:VERSION), the nbd-csi image is built
// under the chart's default reference too, and the values files the e2e
// providers install with pass the schema and override no image.
func TestChartE2EValues(t *testing.T) {
	script, err := os.ReadFile("../../test/e2e/vm/cluster.sh")
	if err != nil {
		t.Fatal(err)
	}
	built := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s*build_sidecar \S+ \S+ (\S+) (\S+)\s*$`).FindAllStringSubmatch(string(script), -1) {
		built["registry.k8s.io/sig-storage/"+m[2]+":"+m[1]] = true
	}
	if !regexp.MustCompile(`(?m)^nbdcsi_image\(\) \{ echo "ghcr.io/nbd-csi/nbd-csi:\$\(app_version\)"; \}$`).Match(script) {
		t.Error("cluster.sh does not name the nbd-csi image ghcr.io/nbd-csi/nbd-csi:$(app_version), the chart's default")
	}
	// images: every container image of the controller and node pods.
	images := func(objs map[string]map[string]any) map[string]string {
		out := map[string]string{}
		for _, kind := range []string{"Deployment/nbd-csi-controller", "DaemonSet/nbd-csi-node"} {
			for _, c := range get(objs[kind], "spec", "template", "spec", "containers").([]any) {
				c := c.(map[string]any)
				out[kind+" "+c["name"].(string)] = c["image"].(string)
			}
		}
		return out
	}
	defaults := images(render(t))
	sidecars := 0
	for who, img := range defaults {
		if strings.HasSuffix(who, " nbd-csi") {
			if !strings.HasPrefix(img, "ghcr.io/nbd-csi/nbd-csi:") {
				t.Errorf("%s runs %s, want ghcr.io/nbd-csi/nbd-csi:APPVERSION", who, img)
			}
			continue
		}
		sidecars++
		if !built[img] {
			t.Errorf("the chart's %s runs %s, which cluster.sh does not build (it builds %v)", who, img, built)
		}
	}
	if sidecars != 4 || len(built) != 4 {
		t.Errorf("chart sidecars %d, built by cluster.sh %v: want provisioner, attacher, resizer and node-driver-registrar", sidecars, built)
	}
	for _, file := range []string{"../../e2e/values-vm.yaml", "../../e2e/kind/values-rig.yaml"} {
		got := images(render(t, file))
		for who, img := range defaults {
			if got[who] != img {
				t.Errorf("%s: %s runs %s, want the chart's default %s", file, who, got[who], img)
			}
		}
	}
}

func TestChartLint(t *testing.T) {
	bin, chart := helm(t)
	if out, err := exec.Command(bin, "lint", "--strict", chart).CombinedOutput(); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
}

func TestChartDefaults(t *testing.T) {
	objs := render(t)
	if got := get(objs["CSIDriver/nbd.csi.nbd-csi.io"], "spec", "attachRequired"); got != true {
		t.Errorf("CSIDriver attachRequired = %v, want true (fencing)", got)
	}
	ds := objs["DaemonSet/nbd-csi-node"]
	if get(ds, "spec", "template", "spec", "hostNetwork") != true {
		t.Error("node DaemonSet is not hostNetwork (kernels < 6.4 hide the nbd netlink family)")
	}
	node := container(t, ds, "nbd-csi")
	if get(node, "securityContext", "privileged") != true {
		t.Error("node plugin is not privileged")
	}
	// Readiness is Probe (a node that cannot attach is not Ready, with the
	// reason), served by nbd-csi itself: no livenessprobe sidecar.
	if get(node, "readinessProbe", "httpGet", "path") != "/readyz" || !strings.Contains(strings.Join(toStrings(node["args"]), " "), "--health-address=:9809") {
		t.Errorf("node plugin probes: %v %v", node["readinessProbe"], node["args"])
	}
	// Metrics: the pods say where Prometheus finds them (the health port).
	for name, obj := range map[string]map[string]any{"node": ds, "controller": objs["Deployment/nbd-csi-controller"]} {
		want := map[string]string{"node": "9809", "controller": "9808"}[name]
		if get(obj, "spec", "template", "metadata", "annotations", "prometheus.io/port") != want ||
			get(obj, "spec", "template", "metadata", "annotations", "prometheus.io/path") != "/metrics" {
			t.Errorf("%s pod annotations: %v, want prometheus.io/port %s", name, get(obj, "spec", "template", "metadata", "annotations"), want)
		}
	}
	found := false
	for _, m := range node["volumeMounts"].([]any) {
		mm := m.(map[string]any)
		if mm["mountPath"] == "/var/lib/kubelet" && mm["mountPropagation"] == "Bidirectional" {
			found = true
		}
	}
	if !found {
		t.Error("kubelet dir not mounted with Bidirectional propagation")
	}
	dep := objs["Deployment/nbd-csi-controller"]
	if get(dep, "spec", "template", "spec", "securityContext", "runAsNonRoot") != true {
		t.Error("controller does not run as non-root")
	}
	ctrl := container(t, dep, "nbd-csi")
	if get(ctrl, "securityContext", "privileged") == true {
		t.Error("controller is privileged")
	}
	// The default store is the Kubernetes one: CRDs shipped, several
	// replicas, leader election, RBAC for the custom resources, no volume.
	args := strings.Join(toStrings(ctrl["args"]), " ")
	if !strings.Contains(args, "--store=kubernetes") || !strings.Contains(args, "--leader-election") {
		t.Errorf("controller args %q: want the kubernetes store with leader election", args)
	}
	if r := get(dep, "spec", "replicas"); r != 2.0 && r != 2 {
		t.Errorf("controller replicas = %v, want 2", r)
	}
	for _, crd := range []string{"nbdexports.nbd-csi.io", "nbdvolumes.nbd-csi.io"} {
		if _, ok := objs["CustomResourceDefinition/"+crd]; !ok {
			t.Errorf("CRD %s not shipped", crd)
		}
	}
	rbacOK := false
	for _, r := range get(objs["ClusterRole/nbd-csi-controller"], "rules").([]any) {
		rule := r.(map[string]any)
		if strings.Contains(fmt.Sprint(rule["resources"]), "nbdexports") && strings.Contains(fmt.Sprint(rule["verbs"]), "update") {
			rbacOK = true
		}
	}
	if !rbacOK {
		t.Error("controller ClusterRole cannot update nbdexports")
	}
	// The node plugin may create Events and find PVs, and read no pods.
	nodeRules := fmt.Sprint(get(objs["ClusterRole/nbd-csi-node"], "rules"))
	if !strings.Contains(nodeRules, "resources:[events] verbs:[create patch]") ||
		!strings.Contains(nodeRules, "resources:[persistentvolumes] verbs:[get list]") || strings.Contains(nodeRules, "pods") {
		t.Errorf("node ClusterRole rules: %s", nodeRules)
	}
	if get(objs["ClusterRoleBinding/nbd-csi-node"], "roleRef", "name") != "nbd-csi-node" {
		t.Error("node ClusterRole not bound")
	}
	for _, v := range get(dep, "spec", "template", "spec", "volumes").([]any) {
		if v.(map[string]any)["name"] == "store" {
			t.Error("kubernetes store still mounts a store volume")
		}
	}
	for key, o := range objs {
		for _, kind := range []string{"Deployment/", "DaemonSet/"} {
			if !strings.HasPrefix(key, kind) {
				continue
			}
			for _, c := range get(o, "spec", "template", "spec", "containers").([]any) {
				img := c.(map[string]any)["image"].(string)
				if strings.HasSuffix(img, ":latest") || !strings.Contains(img, ":") {
					t.Errorf("%s: image %s is not pinned", key, img)
				}
			}
		}
	}
	for key := range objs {
		if strings.HasPrefix(key, "StorageClass/") {
			t.Errorf("default values create %s", key)
		}
	}
}

func TestChartCustomValues(t *testing.T) {
	objs := render(t, "custom.yaml")
	ds := objs["DaemonSet/nbd-csi-node"]
	node := container(t, ds, "nbd-csi")
	ok := false
	for _, m := range node["volumeMounts"].([]any) {
		mm := m.(map[string]any)
		if mm["mountPath"] == "/data/kubelet" && mm["mountPropagation"] == "Bidirectional" {
			ok = true
		}
	}
	if !ok || !strings.Contains(strings.Join(toStrings(node["args"]), " "), "--kubelet-dir=/data/kubelet") {
		t.Errorf("custom kubeletDir not applied: %v", node["args"])
	}
	if !strings.Contains(strings.Join(toStrings(node["args"]), " "), "--health-address=127.0.0.1:9809") ||
		get(node, "livenessProbe", "httpGet", "host") != "127.0.0.1" || get(node, "readinessProbe", "httpGet", "host") != "127.0.0.1" {
		t.Errorf("node.healthHost not applied: args %v, liveness %v", node["args"], get(node, "livenessProbe"))
	}
	if a := get(ds, "spec", "template", "metadata", "annotations"); a != nil {
		t.Errorf("metrics.podAnnotations false, yet the node pods are annotated: %v", a)
	}
	reg := container(t, ds, "node-driver-registrar")
	if !strings.Contains(strings.Join(toStrings(reg["args"]), " "), "--kubelet-registration-path=/data/kubelet/plugins/nbd.csi.nbd-csi.io/csi.sock") {
		t.Errorf("registrar path: %v", reg["args"])
	}
	fast := objs["StorageClass/fast"]
	want := map[string]string{"server": "nbd://nbd.storage.svc:10809", "exportFilter": "ssd-*", "wipeOnDelete": "true",
		"csi.storage.k8s.io/fstype": "xfs", "connections": "4", "timeout": "30s", "deadConnectionTimeout": "5m"}
	for k, v := range want {
		if got := get(fast, "parameters", k); got != v {
			t.Errorf("StorageClass fast parameter %s = %v, want %s", k, got, v)
		}
	}
	if get(fast, "metadata", "annotations", "storageclass.kubernetes.io/is-default-class") != "true" {
		t.Error("fast is not the default class")
	}
	secure := objs["StorageClass/secure"]
	// Wiping is the default; only an explicit false opts out.
	if got := get(secure, "parameters", "wipeOnDelete"); got != "true" {
		t.Errorf("StorageClass without wipeOnDelete renders wipeOnDelete=%v, want \"true\" (secure by default)", got)
	}
	if got := get(objs["StorageClass/scratch"], "parameters", "wipeOnDelete"); got != "false" {
		t.Errorf("StorageClass with wipeOnDelete: false renders %v, want \"false\"", got)
	}
	for _, k := range []string{"provisioner-secret", "node-stage-secret", "controller-expand-secret"} {
		if get(secure, "parameters", "csi.storage.k8s.io/"+k+"-name") != "nbd-tls" ||
			get(secure, "parameters", "csi.storage.k8s.io/"+k+"-namespace") != "storage" {
			t.Errorf("secure %s reference: %v", k, get(secure, "parameters"))
		}
	}
	enc := objs["StorageClass/encrypted"]
	if get(enc, "parameters", "encrypted") != "true" || get(enc, "parameters", "csi.storage.k8s.io/node-stage-secret-name") != "luks-${pvc.name}" ||
		get(enc, "parameters", "csi.storage.k8s.io/node-stage-secret-namespace") != "storage" || get(enc, "parameters", "csi.storage.k8s.io/provisioner-secret-name") != nil {
		t.Errorf("encrypted StorageClass parameters: %v", get(enc, "parameters"))
	}
	if pvc, ok := objs["PersistentVolumeClaim/nbd-csi-controller-store"]; !ok {
		t.Error("store.type pvc made no PVC")
	} else if get(pvc, "metadata", "annotations", "helm.sh/resource-policy") != "keep" {
		t.Error("the pvc store is deleted with the release (no helm.sh/resource-policy: keep)")
	}
	ctrl := container(t, objs["Deployment/nbd-csi-controller"], "nbd-csi")
	if args := strings.Join(toStrings(ctrl["args"]), " "); !strings.Contains(args, "--store=embedded") || strings.Contains(args, "--leader-election") {
		t.Errorf("pvc store args %q", args)
	}
	if get(objs["Deployment/nbd-csi-controller"], "spec", "strategy", "type") != "Recreate" {
		t.Error("embedded store without Recreate strategy")
	}
}

func TestChartRejects(t *testing.T) {
	bin, chart := helm(t)
	for _, f := range []string{"unknown-key.yaml", "latest-tag.yaml", "two-replicas.yaml", "hostpath-no-node.yaml",
		"export-in-pool.yaml", "bad-connections.yaml", "bad-digest.yaml", "monitor-without-service.yaml", "rule-without-monitor.yaml"} {
		out, err := exec.Command(bin, "template", "x", chart, "-f", filepath.Join("testdata", f)).CombinedOutput()
		if err == nil {
			t.Errorf("%s was accepted", f)
		} else if !strings.Contains(string(out), "values don't meet the specifications of the schema") {
			t.Errorf("%s rejected for another reason: %s", f, out)
		}
	}
}

func toStrings(v any) []string {
	var out []string
	for _, x := range v.([]any) {
		out = append(out, x.(string))
	}
	return out
}
