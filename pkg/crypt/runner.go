// SPDX-License-Identifier: Apache-2.0

package crypt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
)

// Command is one program run. Secrets go in Stdin or Fd3, never in Args.
type Command struct {
	// Name is the program (looked up in PATH).
	Name string
	// Args are its arguments.
	Args []string
	// Stdin is written to the program's standard input; nil gives it an
	// empty one (so cryptsetup never waits on a terminal prompt).
	Stdin []byte
	// Fd3, when not nil, is readable by the program on file descriptor 3
	// (a pipe, never a file).
	Fd3 []byte
}

// Result is how a program ended.
type Result struct {
	Stdout, Stderr []byte
	// ExitCode is the exit status (0 success).
	ExitCode int
}

// Runner runs programs. Run returns an error only when the program could
// not be run at all or ctx ended; a non-zero exit is a Result.
type Runner interface {
	Run(ctx context.Context, cmd Command) (Result, error)
}

// maxFd3 bounds what Fd3 may carry: it is written to the pipe before the
// program starts, so it must fit the pipe buffer (64 KiB on Linux).
const maxFd3 = 16 << 10

// ExecRunner runs programs on the host.
type ExecRunner struct{}

var _ Runner = ExecRunner{}

// Run runs cmd.
func (ExecRunner) Run(ctx context.Context, cmd Command) (Result, error) {
	c := exec.CommandContext(ctx, cmd.Name, cmd.Args...)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	c.Stdin = bytes.NewReader(cmd.Stdin)
	// A minimal environment: cryptsetup needs no more, and nothing of
	// ours leaks into it. DM_DISABLE_UDEV makes libdevmapper create the
	// /dev/mapper nodes itself instead of waiting for a udev the plugin's
	// container may not reach (as it does when no udev runs at all).
	c.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C", "DM_DISABLE_UDEV=1"}
	if cmd.Fd3 != nil {
		if len(cmd.Fd3) > maxFd3 {
			return Result{}, fmt.Errorf("%s: descriptor 3 input of %d bytes exceeds %d", cmd.Name, len(cmd.Fd3), maxFd3)
		}
		r, w, err := os.Pipe()
		if err != nil {
			return Result{}, fmt.Errorf("%s: pipe: %w", cmd.Name, err)
		}
		defer r.Close()
		// The whole input fits the pipe buffer, so this write completes
		// before the reader exists; closing w gives the reader EOF.
		_, werr := w.Write(cmd.Fd3)
		cerr := w.Close()
		if err := errors.Join(werr, cerr); err != nil {
			return Result{}, fmt.Errorf("%s: write pipe: %w", cmd.Name, err)
		}
		c.ExtraFiles = []*os.File{r}
	}
	err := c.Run()
	res := Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes()}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ctx.Err() == nil && ee.Exited() {
		res.ExitCode = ee.ExitCode()
		return res, nil
	}
	if err != nil {
		if ctx.Err() != nil {
			return res, fmt.Errorf("%s: %w", cmd.Name, ctx.Err())
		}
		return res, fmt.Errorf("%s: %w", cmd.Name, err)
	}
	return res, nil
}
