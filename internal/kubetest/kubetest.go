// SPDX-License-Identifier: Apache-2.0

// Package kubetest runs a real Kubernetes API server for tests: etcd (from
// PATH; Debian's etcd-server) and kube-apiserver (built from the Go module
// proxy by hack/kube-apiserver.sh, found through $KUBE_APISERVER or the
// build cache), on free loopback ports, with RBAC on and the project's CRDs
// installed. Start it once per test binary, from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(kubetest.Main(m, &cluster)) }
//
// A missing binary skips the tests that need the cluster, unless
// NBDCSI_REQUIRE_KUBE is 1 (CI sets it), which makes it a failure.
package kubetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/nbd-csi/nbd-csi/internal/servers"
)

// RequireEnv names the variable that, set to 1, turns a missing etcd or
// kube-apiserver into a failure instead of a skip.
const RequireEnv = "NBDCSI_REQUIRE_KUBE"

// AdminToken authenticates as a member of system:masters.
const AdminToken = "nbd-csi-test-admin"

// ErrMissing: etcd or kube-apiserver is not available.
var ErrMissing = errors.New("no etcd or kube-apiserver")

// CRDGroupVersionResource is the CRD resource.
var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// Cluster is a running etcd + kube-apiserver.
type Cluster struct {
	dir          string
	etcd, apisrv *exec.Cmd
	// exited is closed when a process has exited (its Wait returned).
	exited map[*exec.Cmd]chan struct{}
	host   string
	// StartTime is how long the API server took to become ready.
	StartTime time.Duration
}

// Config returns an admin client config.
func (c *Cluster) Config() *rest.Config {
	return c.ConfigFor(AdminToken)
}

// ConfigFor returns a client config authenticating with token (see
// Users).
func (c *Cluster) ConfigFor(token string) *rest.Config {
	return &rest.Config{Host: c.host, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 500, Burst: 1000}
}

// Users are the tokens the API server accepts besides the admin's, with
// their user names: a test binds roles to them to check RBAC rules.
var Users = map[string]string{"nbd-csi-test-controller": "system:serviceaccount:kube-system:nbd-csi-controller"}

// Root returns the repository root.
func Root() (string, error) {
	out, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		return "", fmt.Errorf("find the repository root: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

func findBinaries() (etcd, apiserver string, err error) {
	etcd, err = exec.LookPath("etcd")
	if err != nil {
		return "", "", fmt.Errorf("%w: etcd not in PATH (apt-get install etcd-server)", ErrMissing)
	}
	apiserver = os.Getenv("KUBE_APISERVER")
	if apiserver == "" {
		root, err := Root()
		if err != nil {
			return "", "", err
		}
		apiserver = filepath.Join(root, ".cache/kube/bin/kube-apiserver")
	}
	if _, err := os.Stat(apiserver); err != nil {
		return "", "", fmt.Errorf("%w: %s missing (run make kube, or hack/kube-apiserver.sh)", ErrMissing, apiserver)
	}
	return etcd, apiserver, nil
}

// Start starts etcd and kube-apiserver in a new temporary directory and
// installs the CRDs in crdDir. It returns an error wrapping ErrMissing when
// a binary is absent. Ports are picked free but another process can take
// one before etcd or kube-apiserver binds it (test packages run in
// parallel), so a start that failed on a taken address is retried with new
// ports, up to 3 times.
func Start(crdDir string) (*Cluster, error) {
	etcdBin, apiBin, err := findBinaries()
	if err != nil {
		return nil, err
	}
	for try := 1; ; try++ {
		c, err := start(etcdBin, apiBin, crdDir)
		if err == nil || try == 3 || !errors.Is(err, errAddrInUse) {
			return c, err
		}
	}
}

// freePort picks a port; tests replace it to force a taken one.
var freePort = servers.FreePort

// errAddrInUse marks a start that failed because a port was taken.
var errAddrInUse = errors.New("address already in use")

func start(etcdBin, apiBin, crdDir string) (*Cluster, error) {
	dir, err := os.MkdirTemp("", "nbd-csi-kube-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir, exited: map[*exec.Cmd]chan struct{}{}}
	ok := false
	defer func() {
		if !ok {
			c.Stop()
		}
	}()
	var ports [3]int
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return nil, err
		}
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	c.etcd = exec.Command(etcdBin, "--name=test", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=test="+peerURL, "--log-level=warn")
	if err := c.launch(c.etcd, "etcd.log"); err != nil {
		return nil, err
	}
	if err := writeFiles(dir); err != nil {
		return nil, err
	}
	c.host = "https://127.0.0.1:" + strconv.Itoa(ports[2])
	c.apisrv = exec.Command(apiBin, "--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(ports[2]),
		"--cert-dir="+filepath.Join(dir, "certs"),
		"--token-auth-file="+filepath.Join(dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+filepath.Join(dir, "sa.key"),
		"--service-account-signing-key-file="+filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--enable-priority-and-fairness=false",
		// As kubeadm and every CSI-capable cluster: the node plugin is
		// privileged (test/chart validates the chart's objects here).
		"--allow-privileged=true",
		"--v=0")
	start := time.Now()
	if err := c.launch(c.apisrv, "kube-apiserver.log"); err != nil {
		return nil, err
	}
	if err := c.waitReady(90 * time.Second); err != nil {
		return nil, err
	}
	c.StartTime = time.Since(start)
	if crdDir != "" {
		if err := c.InstallCRDs(crdDir); err != nil {
			return nil, err
		}
	}
	ok = true
	return c, nil
}

func writeFiles(dir string) error {
	var tokens strings.Builder
	fmt.Fprintf(&tokens, "%s,admin,admin,system:masters\n", AdminToken)
	for tok, user := range Users {
		fmt.Fprintf(&tokens, "%s,%s,%s\n", tok, user, user)
	}
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(tokens.String()), 0o600); err != nil {
		return err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

func (c *Cluster) launch(cmd *exec.Cmd, logName string) error {
	log, err := os.Create(filepath.Join(c.dir, logName))
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	done := make(chan struct{})
	c.exited[cmd] = done
	go func() { cmd.Wait(); log.Close(); close(done) }()
	return nil
}

// Log returns the tail of a component's log ("etcd" or "kube-apiserver").
func (c *Cluster) Log(name string) string {
	b, _ := os.ReadFile(filepath.Join(c.dir, name+".log"))
	if len(b) > 8192 {
		b = b[len(b)-8192:]
	}
	return string(b)
}

func (c *Cluster) waitReady(d time.Duration) error {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(d)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-c.exited[c.apisrv]:
			return c.exitErr("kube-apiserver")
		case <-c.exited[c.etcd]:
			return c.exitErr("etcd")
		default:
		}
		req, _ := http.NewRequest(http.MethodGet, c.host+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+AdminToken)
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && bytes.Equal(bytes.TrimSpace(body), []byte("ok")) {
				return nil
			}
			err = fmt.Errorf("readyz: %s: %s", resp.Status, body)
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("kube-apiserver not ready after %v: %v\n%s", d, last, c.Log("kube-apiserver"))
}

// exitErr describes a component that exited early, wrapping errAddrInUse
// when its log says a port was taken.
func (c *Cluster) exitErr(name string) error {
	log := c.Log(name)
	if strings.Contains(log, "address already in use") {
		return fmt.Errorf("%s exited: %w: %s", name, errAddrInUse, log)
	}
	return fmt.Errorf("%s exited: %s", name, log)
}

// InstallCRDs creates (or replaces) every CRD in dir's YAML files and waits
// until each is established and served.
func (c *Cluster) InstallCRDs(dir string) error {
	dc, err := dynamic.NewForConfig(c.Config())
	if err != nil {
		return err
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no CRDs in %s: %v", dir, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		var obj map[string]any
		if err := yaml.Unmarshal(raw, &obj); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		u := &unstructured.Unstructured{Object: obj}
		if _, err := dc.Resource(crdResource).Create(ctx, u, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create CRD from %s: %w", f, err)
		}
		if err := waitEstablished(ctx, dc, u.GetName()); err != nil {
			return err
		}
		group, _, _ := unstructured.NestedString(obj, "spec", "group")
		plural, _, _ := unstructured.NestedString(obj, "spec", "names", "plural")
		versions, _, _ := unstructured.NestedSlice(obj, "spec", "versions")
		for _, v := range versions {
			name, _ := v.(map[string]any)["name"].(string)
			gvr := schema.GroupVersionResource{Group: group, Version: name, Resource: plural}
			for {
				if _, err := dc.Resource(gvr).List(ctx, metav1.ListOptions{Limit: 1}); err == nil {
					break
				} else if ctx.Err() != nil {
					return fmt.Errorf("%s not served: %w", gvr, err)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	return nil
}

func waitEstablished(ctx context.Context, dc dynamic.Interface, name string) error {
	for {
		u, err := dc.Resource(crdResource).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
			for _, cond := range conds {
				m, _ := cond.(map[string]any)
				if m["type"] == "Established" && m["status"] == "True" {
					return nil
				}
			}
		}
		if ctx.Err() != nil {
			return fmt.Errorf("CRD %s not established: %v", name, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop kills both processes, waits for them, and removes the directory.
func (c *Cluster) Stop() {
	for _, cmd := range []*exec.Cmd{c.apisrv, c.etcd} {
		if done, ok := c.exited[cmd]; ok {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
			}
		}
	}
	os.RemoveAll(c.dir)
}

// Main starts a cluster with the repository's CRDs into *c, runs the tests
// and stops it. Without the binaries *c stays nil and the tests that need
// it skip (Need), unless RequireEnv is set.
func Main(m *testing.M, c **Cluster) int {
	root, err := Root()
	if err != nil {
		err = fmt.Errorf("%w: %v", ErrMissing, err) // e.g. inside the VM rig
	} else {
		*c, err = Start(filepath.Join(root, "charts/nbd-csi/crds"))
	}
	if err != nil {
		if !errors.Is(err, ErrMissing) || os.Getenv(RequireEnv) == "1" {
			fmt.Fprintln(os.Stderr, "kubetest:", err)
			return 1
		}
		skipReason = err.Error()
	}
	code := m.Run()
	if *c != nil {
		(*c).Stop()
	}
	return code
}

var skipReason string

// Need skips t when Main found no cluster.
func Need(t testing.TB, c *Cluster) {
	t.Helper()
	if c == nil {
		t.Skip("no Kubernetes API server: " + skipReason)
	}
}

// WriteKubeconfig writes an admin kubeconfig for the cluster to path.
func (c *Cluster) WriteKubeconfig(path string) error {
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: %q, insecure-skip-tls-verify: true}
users:
- name: admin
  user: {token: %q}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
`, c.host, AdminToken)
	return os.WriteFile(path, []byte(cfg), 0o600)
}
