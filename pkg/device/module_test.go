// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/utils/exec"
	testingexec "k8s.io/utils/exec/testing"
)

// modprobeScript returns a FakeExec expecting one modprobe call; load
// decides whether the fake modprobe "loads" the module (creates
// /sys/module/nbd).
func modprobeScript(t *testing.T, tree *fakeTree, load bool, out string, err error, argv *[]string) *testingexec.FakeExec {
	cmd := &testingexec.FakeCmd{
		CombinedOutputScript: []testingexec.FakeAction{func() ([]byte, []byte, error) {
			if load {
				tree.loadModule(16)
			}
			return []byte(out), nil, err
		}},
	}
	return &testingexec.FakeExec{CommandScript: []testingexec.FakeCommandAction{
		func(name string, args ...string) exec.Cmd {
			*argv = append([]string{name}, args...)
			return testingexec.InitFakeCmd(cmd, name, args...)
		},
	}}
}

func TestEnsureModule(t *testing.T) {
	ctx := context.Background()
	t.Run("already loaded", func(t *testing.T) {
		tree := newFakeTree(t)
		tree.loadModule(16)
		fe := &testingexec.FakeExec{}
		opts := tree.opts()
		opts.Module.Exec = fe
		if err := EnsureModule(ctx, opts); err != nil {
			t.Fatal(err)
		}
		if fe.CommandCalls != 0 {
			t.Error("modprobe ran although the module was loaded")
		}
	})
	t.Run("loads with parameters", func(t *testing.T) {
		tree := newFakeTree(t)
		var argv []string
		opts := tree.opts()
		opts.Module = ModuleOptions{ModprobePath: "/sbin/modprobe", NbdsMax: 64, MaxPart: 15}
		opts.Module.Exec = modprobeScript(t, tree, true, "", nil, &argv)
		if err := EnsureModule(ctx, opts); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]string{"/sbin/modprobe", "nbd", "nbds_max=64", "max_part=15"}, argv); diff != "" {
			t.Errorf("argv (-want +got):\n%s", diff)
		}
	})
	t.Run("defaults", func(t *testing.T) {
		tree := newFakeTree(t)
		var argv []string
		opts := tree.opts()
		opts.Module.Exec = modprobeScript(t, tree, true, "", nil, &argv)
		if err := EnsureModule(ctx, opts); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]string{"modprobe", "nbd", "nbds_max=16", "max_part=0"}, argv); diff != "" {
			t.Errorf("argv (-want +got):\n%s", diff)
		}
	})
	t.Run("no kernel support", func(t *testing.T) {
		tree := newFakeTree(t)
		var argv []string
		opts := tree.opts()
		opts.Module.Exec = modprobeScript(t, tree, false,
			"modprobe: FATAL: Module nbd not found in directory /lib/modules/6.18.44\n",
			testingexec.FakeExitError{Status: 1}, &argv)
		err := EnsureModule(ctx, opts)
		if !errors.Is(err, ErrNoKernelSupport) || !strings.Contains(err.Error(), "Module nbd not found") {
			t.Fatalf("got %v, want ErrNoKernelSupport with modprobe's output", err)
		}
	})
	t.Run("modprobe fails but the module appeared", func(t *testing.T) {
		tree := newFakeTree(t)
		var argv []string
		opts := tree.opts()
		opts.Module.Exec = modprobeScript(t, tree, true, "", testingexec.FakeExitError{Status: 1}, &argv)
		if err := EnsureModule(ctx, opts); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("loading disabled", func(t *testing.T) {
		tree := newFakeTree(t)
		opts := tree.opts()
		opts.Module = ModuleOptions{Skip: true, Exec: &testingexec.FakeExec{}}
		if err := EnsureModule(ctx, opts); !errors.Is(err, ErrNoKernelSupport) {
			t.Fatalf("got %v", err)
		}
	})
}
