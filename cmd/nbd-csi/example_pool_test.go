// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// poolManifest is what TestExamplePool reads of the StatefulSet in
// deploy/examples/nbd-server-pool.yaml.
type poolManifest struct {
	Kind string `json:"kind"`
	Spec struct {
		Template struct {
			Spec struct {
				InitContainers []container `json:"initContainers"`
				Containers     []container `json:"containers"`
			} `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

type container struct {
	Command []string `json:"command"`
	Env     []struct {
		Name  string `json:"name"`
		Value string `json:"value"`
	} `json:"env"`
}

// TestExamplePool runs the commands of the example export pool
// (deploy/examples/nbd-server-pool.yaml) on the host, so the example cannot
// rot: the init container's script makes the exports (and leaves existing
// ones alone), the server container's command line serves them with the
// real nbdkit under this binary's run-server, and SIGTERM ends it at once
// with status 0. Only /pool, the port and the nbd-csi path are replaced.
func TestExamplePool(t *testing.T) {
	b, err := os.ReadFile("../../deploy/examples/nbd-server-pool.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var sts *poolManifest
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		var m poolManifest
		if err := yaml.Unmarshal(doc, &m); err != nil {
			t.Fatalf("parse example: %v", err)
		}
		if m.Kind == "StatefulSet" {
			sts = &m
		}
	}
	if sts == nil || len(sts.Spec.Template.Spec.InitContainers) != 1 || len(sts.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("example has no StatefulSet with one init container and one container: %+v", sts)
	}
	pool := t.TempDir()
	local := func(args []string) []string {
		out := make([]string, len(args))
		for i, a := range args {
			out[i] = strings.ReplaceAll(a, "/pool", pool)
		}
		return out
	}

	// The init step, twice: the second run must keep what the first made.
	init := sts.Spec.Template.Spec.InitContainers[0]
	for run := range 2 {
		cmd := exec.Command(init.Command[0], local(init.Command[1:])...)
		cmd.Env = os.Environ()
		for _, e := range init.Env {
			if e.Name == "EXPORTS" {
				e.Value = "3"
			}
			if e.Name == "SIZE" {
				e.Value = "1M"
			}
			cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("init step: %v\n%s", err, out)
		}
		if run == 0 {
			if err := os.WriteFile(filepath.Join(pool, "pvc-002"), []byte("data"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	ents, _ := os.ReadDir(pool)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"pvc-001", "pvc-002", "pvc-003"}) {
		t.Fatalf("init step made %v, want pvc-001…pvc-003", names)
	}
	if got, _ := os.ReadFile(filepath.Join(pool, "pvc-002")); string(got) != "data" {
		t.Fatal("init step rewrote an existing export")
	}

	// The server.
	argv := local(sts.Spec.Template.Spec.Containers[0].Command)
	if argv[0] != "/usr/bin/nbd-csi" || argv[1] != "run-server" {
		t.Fatalf("server command %v does not start with /usr/bin/nbd-csi run-server", argv)
	}
	port, err := servers.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	for i, a := range argv {
		if a == "--port=10809" {
			argv[i] = "--port=" + strconv.Itoa(port)
		}
	}
	if !slices.Contains(argv, "--port="+strconv.Itoa(port)) {
		t.Fatalf("server command %v does not listen on --port=10809", argv)
	}
	nbdkit := slices.Index(argv, "--") + 1
	if _, err := os.Stat(argv[nbdkit]); err != nil {
		servers.LookPath(t, "nbdkit") // skips (or fails in CI) when nbdkit is missing
		t.Fatalf("the example runs %s: %v", argv[nbdkit], err)
	}
	cmd := exec.Command(os.Args[0], argv[1:]...)
	cmd.Env = append(os.Environ(), envRunMain+"=1")
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	u, err := nbd.ParseURI("nbd://127.0.0.1:" + strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	var list []nbd.ListEntry
	for deadline := time.Now().Add(servers.ReadyTimeout); ; time.Sleep(50 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		list, err = nbd.List(ctx, u)
		cancel()
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("list the example's exports: %v\n%s", err, log.String())
	}
	names = nil
	for _, e := range list {
		names = append(names, e.Name)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"pvc-001", "pvc-002", "pvc-003"}) {
		t.Errorf("example serves %v, want pvc-001…pvc-003", names)
	}

	start := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Fatalf("run-server after SIGTERM: %v\n%s", err, log.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("run-server still running 10s after SIGTERM\n%s", log.String())
	}
	if !strings.Contains(log.String(), "killed") || !strings.Contains(log.String(), "flushed the filesystem of "+pool) {
		t.Errorf("run-server did not report the kill and the flush:\n%s", log.String())
	}
	t.Logf("example pool stopped %v after SIGTERM:\n%s", time.Since(start).Round(time.Millisecond), log.String())
}
