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
//	nbd-csi luks rotate --volume-id ID|--device DEV --old-key-file F --new-key-file F
//	nbd-csi version                          print the version
//
// See docs/cli.md for every flag and the JSON field names.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
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
	}
}

// errUsage marks errors caused by bad command-line use (exit status 2).
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, args[1:], stdout)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "nbd-csi %s: %v\n", c.name, err)
			return 2
		default:
			fmt.Fprintf(stderr, "nbd-csi %s: %v\n", c.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "nbd-csi: unknown command %q\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "Usage: nbd-csi COMMAND [flags] [args]")
	fmt.Fprintln(w, "\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'nbd-csi COMMAND --help' for a command's flags; docs/cli.md has them all.")
}
