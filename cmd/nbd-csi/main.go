// SPDX-License-Identifier: Apache-2.0

// Command nbd-csi is the nbd-csi CSI driver and its admin tools.
//
//	nbd-csi probe [--json] [TLS flags] URI   describe one export
//	nbd-csi list  [--json] [TLS flags] URI   list a server's exports
//	nbd-csi serve [flags]                    serve CSI (node, controller or both)
//	nbd-csi attach [flags] URI               attach an export to /dev/nbdN
//	nbd-csi detach DEVICE|--id ID            detach a device
//	nbd-csi devices [--json]                 list nbd devices
//	nbd-csi exports [--json] [--store-path PATH]  the controller's inventory
//	nbd-csi version [--json]                 print the version (also: nbd-csi --version)
//	nbd-csi run-server [flags] -- SERVER ... run an NBD server whose stop drops connections
//	nbd-csi luks rotate --volume-id ID|--device DEV --old-key-file F --new-key-file F
//
// Flags and arguments may come in any order; "--" ends the flags. Exit
// status: 0 success (and --help), 1 failure, 2 usage error.
// See docs/cli.md for every flag and the JSON field names.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// command is one subcommand.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout io.Writer) error
}

func commands() []command {
	return []command{
		{"serve", "serve CSI (controller, node or both)", runServe},
		{"probe", "connect to an export and describe it", runProbe},
		{"list", "list the exports of a server", runList},
		{"attach", "attach an export to a kernel nbd device (for operators and tests)", runAttach},
		{"detach", "detach an nbd device", runDetach},
		{"devices", "list the kernel's nbd devices and who attached them", runDevices},
		{"exports", "list the controller's export inventory and claims", runExports},
		{"luks", "rotate the passphrase of an encrypted volume (luks rotate)", runLuks},
		{"version", "print the version", runVersion},
		{"run-server", "run an NBD server so that stopping it drops connections instead of failing I/O", runRunServer},
	}
}

// exitCorruptStore is the exit status for a damaged embedded store
// (docs/cli.md, docs/operations.md).
const exitCorruptStore = 3

// errUsage marks errors caused by bad command-line use (exit status 2).
var errUsage = errors.New("usage")

// Exit statuses (docs/cli.md).
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return exitUsage
	}
	name, rest := args[0], args[1:]
	switch name {
	case "-h", "-help", "--help", "help":
		if name == "help" && len(rest) > 0 { // help COMMAND: its --help
			name, rest = rest[0], []string{"--help"}
			break
		}
		usage(stdout)
		return exitOK
	case "-version", "--version":
		name = "version"
	}
	for _, c := range commands() {
		if c.name != name {
			continue
		}
		err := c.run(ctx, rest, stdout)
		var help *helpError
		switch {
		case err == nil:
			return exitOK
		case errors.As(err, &help):
			fmt.Fprint(stdout, help.text)
			return exitOK
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "nbd-csi %s: %s\nRun 'nbd-csi %s --help' for usage.\n", c.name, printable(err.Error()), c.name)
			return exitUsage
		case errors.Is(err, store.ErrCorrupt):
			fmt.Fprintf(stderr, "nbd-csi %s: %s\n", c.name, printable(err.Error()))
			return exitCorruptStore
		default:
			// Error texts may carry a server's words: escape them.
			fmt.Fprintf(stderr, "nbd-csi %s: %s\n", c.name, printable(err.Error()))
			return exitFailure
		}
	}
	fmt.Fprintf(stderr, "nbd-csi: unknown command %q\nRun 'nbd-csi --help' for the commands.\n", name)
	return exitUsage
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "Usage: nbd-csi COMMAND [flags] [args]   (nbd-csi --version: the version)")
	fmt.Fprintln(w, "\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'nbd-csi COMMAND --help' for a command's flags; docs/cli.md has them all.")
	fmt.Fprintln(w, "Exit status: 0 success, 1 failure, 2 usage error.")
}
