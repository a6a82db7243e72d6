// SPDX-License-Identifier: Apache-2.0

// Command vmrun runs a shell command inside the real-kernel VM of the
// test rig (package github.com/nbd-csi/nbd-csi/test/vm) and exits with
// the command's exit status.
//
// Usage:
//
//	go run ./test/vm/cmd/vmrun [flags] -- <shell command>
//
// Flags:
//
//	-mem MB          guest memory (default 2048)
//	-cpus N          virtual CPUs (default 2)
//	-timeout D       bound for the whole run (default 10m)
//	-file HOST:GUEST copy a host file or directory into the VM (repeatable)
//	-gotest PKG      compile PKG's tests with CGO_ENABLED=0 and install
//	                 them as /bin/<name>.test (repeatable)
//	-env KEY=VALUE   export a variable to the command (repeatable)
//	-module NAME     add a kernel module to the image (repeatable)
//	-append ARG      add a kernel command line argument (repeatable)
//	-cache DIR       cache directory (default $NBDCSI_VM_CACHE or <repo>/.cache/vm)
//	-accel A         auto, kvm or tcg (default $NBDCSI_VM_ACCEL or auto:
//	                 KVM only after a probe boot with it succeeded)
//	-print-accel     only choose the accelerator as -accel says, log why on
//	                 stderr and print its QEMU arguments ("-accel kvm -cpu
//	                 host") on stdout, for scripts that start QEMU themselves
//	-q               do not stream the console, print it only on failure
//
// The words after "--" are joined with spaces and run by busybox sh, so
// quote them as one argument when they contain shell syntax:
//
//	go run ./test/vm/cmd/vmrun -gotest ./pkg/device -- \
//	    'modprobe nbd && /bin/device.test -test.v -test.run Kernel'
//
// Exit status: the command's status; 125 when the rig failed (the VM
// did not run the command to completion); 2 for usage errors.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/nbd-csi/nbd-csi/test/vm"
)

// exitRigFailure is the exit status when the VM did not complete the
// command.
const exitRigFailure = 125

// listFlag collects the values of a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vmrun", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		files, gotests, env, modules, kargs listFlag
		cfg                                 vm.Config
		quiet                               bool
	)
	fs.IntVar(&cfg.MemoryMB, "mem", vm.DefaultMemoryMB, "guest memory in MiB")
	fs.IntVar(&cfg.CPUs, "cpus", vm.DefaultCPUs, "virtual CPUs")
	fs.DurationVar(&cfg.Timeout, "timeout", vm.DefaultTimeout, "bound for the whole run")
	fs.Var(&files, "file", "HOST:GUEST: copy a host file or directory into the VM (repeatable)")
	fs.Var(&gotests, "gotest", "PKG: compile PKG's tests and install them as /bin/<name>.test (repeatable)")
	fs.Var(&env, "env", "KEY=VALUE exported to the command (repeatable)")
	fs.Var(&modules, "module", "extra kernel module for the image (repeatable)")
	fs.Var(&kargs, "append", "extra kernel command line argument (repeatable)")
	fs.StringVar(&cfg.CacheDir, "cache", "", "cache directory (default $"+vm.EnvCache+" or <repo>/.cache/vm)")
	fs.StringVar(&cfg.Accel, "accel", "", "QEMU accelerator: auto, kvm or tcg (default $"+vm.EnvAccel+" or auto: KVM only after a probe boot with it succeeded)")
	fs.BoolVar(&quiet, "q", false, "do not stream the console; print it only on failure")
	printAccel := fs.Bool("print-accel", false, "only choose the accelerator, log why on stderr and print its QEMU arguments on stdout")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: vmrun [flags] -- <shell command run inside the VM>\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *printAccel {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		cfg.Console = stderr
		c, err := cfg.ChooseAccel(ctx)
		if err != nil {
			fmt.Fprintf(stderr, "vmrun: %v\n", err)
			return exitRigFailure
		}
		fmt.Fprintln(stderr, c)
		fmt.Fprintln(stdout, strings.Join(vm.AccelArgs(c.Accel), " "))
		return 0
	}
	script := strings.TrimSpace(strings.Join(fs.Args(), " "))
	if script == "" {
		fmt.Fprintln(stderr, "vmrun: no command given after --")
		fs.Usage()
		return 2
	}
	cfg.Script = script
	cfg.Env = env
	cfg.Modules = modules
	cfg.KernelArgs = kargs
	for _, f := range files {
		host, guest, ok := strings.Cut(f, ":")
		if !ok || host == "" || guest == "" {
			fmt.Fprintf(stderr, "vmrun: -file %q: want HOST:GUEST\n", f)
			return 2
		}
		cfg.Files = append(cfg.Files, vm.File{HostPath: host, GuestPath: guest})
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if len(gotests) > 0 {
		dir, err := os.MkdirTemp("", "vmrun-gotest-")
		if err != nil {
			fmt.Fprintf(stderr, "vmrun: %v\n", err)
			return exitRigFailure
		}
		defer os.RemoveAll(dir)
		for _, pkg := range gotests {
			start := time.Now()
			f, err := vm.BuildGoTest(ctx, pkg, dir)
			if err != nil {
				fmt.Fprintf(stderr, "vmrun: %v\n", err)
				return exitRigFailure
			}
			fmt.Fprintf(stderr, "vmrun: built %s → %s in %s\n", pkg, f.GuestPath, time.Since(start).Round(time.Millisecond))
			cfg.Files = append(cfg.Files, f)
		}
	}

	var buffered bytes.Buffer
	cfg.Console = stdout
	if quiet {
		cfg.Console = &buffered
	}
	res, err := vm.RunDetailed(ctx, cfg)
	if err != nil {
		if quiet {
			_, _ = stdout.Write(buffered.Bytes())
		}
		fmt.Fprintf(stderr, "vmrun: %v\n", err)
		if errors.Is(ctx.Err(), context.Canceled) {
			return 130
		}
		return exitRigFailure
	}
	if quiet && res.ExitCode != 0 {
		_, _ = stdout.Write(buffered.Bytes())
	}
	if quiet { // the console, which says it too, was not shown
		fmt.Fprintf(stderr, "vmrun: accelerator %s (%s)\n", res.Accel, res.AccelReason)
	}
	fmt.Fprintf(stderr, "vmrun: %s\n", res)
	return res.ExitCode
}
