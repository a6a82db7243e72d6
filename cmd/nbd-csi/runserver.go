// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// runServerOptions are the flags of `nbd-csi run-server`.
type runServerOptions struct {
	// sync lists paths whose filesystems are flushed (syncfs) once the
	// server is gone.
	sync []string
	// killTimeout bounds the wait for the server's processes to be gone
	// after SIGKILL.
	killTimeout time.Duration
}

// pathList is a repeatable string flag.
type pathList []string

func (p *pathList) String() string { return strings.Join(*p, ",") }

func (p *pathList) Set(s string) error {
	if s == "" {
		return errors.New("empty path")
	}
	*p = append(*p, s)
	return nil
}

// runRunServer runs an NBD server so that stopping it (SIGTERM, SIGINT)
// looks to its clients like a dropped connection: the server and every
// process it started are killed with SIGKILL, so no request gets an error
// reply. docs/operations.md ("Restarting the NBD server") explains why.
func runRunServer(ctx context.Context, args []string, _ io.Writer) error {
	var o runServerOptions
	fs := flag.NewFlagSet("run-server", flag.ContinueOnError)
	fs.Var((*pathList)(&o.sync), "sync", "after the server is gone, flush the filesystem holding PATH to disk (syncfs); repeatable")
	fs.DurationVar(&o.killTimeout, "kill-timeout", 10*time.Second, "how long the server's processes may take to die after SIGKILL")
	const usage = `run-server [flags] -- SERVER [ARGS...]

Runs SERVER (nbdkit, qemu-nbd, nbd-server …) in the foreground and reaps
every process it starts (a daemonizing server included). On SIGTERM or
SIGINT it kills the server and its processes with SIGKILL instead of
letting it stop gracefully: a graceful stop answers requests in flight with
an error (nbdkit: ESHUTDOWN), which the kernel nbd driver turns into EIO,
while a dropped connection is reconnected by the node plugin and I/O only
stalls. HUP, USR1 and USR2 are passed on to the server.`
	if err := parseFlags(fs, args, usage); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return fmt.Errorf("%w: name the server to run after --", errUsage)
	}
	if o.killTimeout <= 0 {
		return fmt.Errorf("%w: --kill-timeout must be positive", errUsage)
	}
	for _, p := range o.sync {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%w: --sync: %v", errUsage, err)
		}
	}
	return superviseServer(ctx, fs.Args(), o, os.Stderr)
}
