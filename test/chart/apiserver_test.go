// SPDX-License-Identifier: Apache-2.0

package chart

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"

	"github.com/nbd-csi/nbd-csi/internal/kubetest"
)

// TestChartServerDryRun: what the chart renders for each values file is
// accepted by a real kube-apiserver (server-side dry run: the API's own
// validation of every field, e.g. StorageClass allowedTopologies, PDB,
// probes on named ports), the helm test pod included. The
// prometheus-operator kinds are left out: their CRDs are not installed.
func TestChartServerDryRun(t *testing.T) {
	c, err := kubetest.Start("../../charts/nbd-csi/crds")
	if errors.Is(err, kubetest.ErrMissing) && os.Getenv(kubetest.RequireEnv) != "1" {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cs, err := kubernetes.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	// The controller-manager (absent here) makes every namespace's default
	// ServiceAccount, which the helm test pod runs as.
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: "kube-system"}}
	if _, err := cs.CoreV1().ServiceAccounts("kube-system").Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create the default ServiceAccount: %v", err)
	}
	for _, values := range [][]string{nil, {"production.yaml"}, {"hostpath.yaml"}, {"custom.yaml"}} {
		accepted := 0
		for key, o := range render(t, values...) {
			if strings.HasPrefix(key, "ServiceMonitor/") || strings.HasPrefix(key, "PrometheusRule/") || strings.HasPrefix(key, "CustomResourceDefinition/") {
				continue
			}
			u := &unstructured.Unstructured{Object: o}
			gvk := u.GroupVersionKind()
			m, err := mapper.RESTMapping(schema.GroupKind{Group: gvk.Group, Kind: gvk.Kind}, gvk.Version)
			if err != nil {
				t.Errorf("values %v: %s: the API server does not serve its kind: %v", values, key, err)
				continue
			}
			var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
			if m.Scope.Name() == "namespace" {
				ns := u.GetNamespace()
				if ns == "" {
					ns = "default"
				}
				ri = dyn.Resource(m.Resource).Namespace(ns)
			}
			if _, err := ri.Create(ctx, u, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
				t.Errorf("values %v: the API server refuses %s: %v", values, key, err)
				continue
			}
			accepted++
		}
		t.Logf("values %v: %d objects accepted", values, accepted)
	}
}
