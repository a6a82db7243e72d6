// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/attach"
	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// deviceFlags are the kernel-side flags shared by attach, detach and devices.
type deviceFlags struct {
	netlink, ioctl bool
	sysRoot        string
	devRoot        string
	skipModprobe   bool
}

func (f *deviceFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.netlink, "netlink", false, "use the netlink interface (the default when available)")
	fs.BoolVar(&f.ioctl, "ioctl", false, "use the ioctl interface (the device then lives only as long as this command)")
	fs.StringVar(&f.sysRoot, "sys-root", "/sys", "where sysfs is mounted")
	fs.StringVar(&f.devRoot, "dev-root", "/dev", "where device nodes are")
	fs.BoolVar(&f.skipModprobe, "skip-modprobe", false, "never run modprobe")
}

func (f *deviceFlags) options() (device.Options, error) {
	o := device.Options{SysRoot: f.sysRoot, DevRoot: f.devRoot, Module: device.ModuleOptions{Skip: f.skipModprobe}}
	switch {
	case f.netlink && f.ioctl:
		return o, fmt.Errorf("%w: --netlink and --ioctl exclude each other", errUsage)
	case f.netlink:
		o.Backend = device.BackendNetlink
	case f.ioctl:
		o.Backend = device.BackendIoctl
	}
	return o, nil
}

// open returns the kernel interface for inspecting and detaching devices
// (never loading the module: with no module there is nothing to inspect).
func (f *deviceFlags) open(ctx context.Context) (device.Attacher, error) {
	o, err := f.options()
	if err != nil {
		return nil, err
	}
	o.Module.Skip = true
	return device.New(ctx, o)
}

func runAttach(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("attach", flag.ContinueOnError)
	var df deviceFlags
	df.register(fs)
	var cf clientFlags
	cf.registerTLS(fs)
	conns := fs.Int("connections", 1, "sockets per device (used only when the export allows multi-conn)")
	timeout := fs.Duration("timeout", 30*time.Second, "per-request I/O timeout (0: wait indefinitely)")
	dead := fs.Duration("dead-conn-timeout", 0, "how long I/O waits for a reconnect; needs a process to reconnect, so 0 unless --ioctl")
	id := fs.String("id", "", "identity recorded in the device's backend identifier (default: random)")
	tlsMode := fs.String("tls", driver.TLSKernel, "for a TLS export: kernel (the kernel's TLS layer carries the session; the command exits as for a plaintext export) or relay (this command relays the session and stays until Ctrl-C, then detaches)")
	if err := parseFlags(fs, args, "attach [flags] URI"); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: want exactly one URI", errUsage)
	}
	if *timeout < 0 || *dead < 0 {
		return fmt.Errorf("%w: --timeout %v, --dead-conn-timeout %v: durations cannot be negative", errUsage, *timeout, *dead)
	}
	u, err := parseURI(fs.Arg(0))
	if err != nil {
		return err
	}
	devOpts, err := df.options()
	if err != nil {
		return err
	}
	if *id == "" {
		b := make([]byte, 6)
		_, _ = rand.Read(b)
		*id = hex.EncodeToString(b)
	}
	a := attach.New(ctx, attach.Options{Device: devOpts, BackendPrefix: attach.CLIBackendPrefix})
	defer a.Close()
	if err := a.Ready(ctx); err != nil {
		return err
	}
	if *tlsMode != driver.TLSKernel && *tlsMode != driver.TLSRelay {
		return fmt.Errorf("%w: --tls=%q, want kernel or relay", errUsage, *tlsMode)
	}
	spec := driver.AttachSpec{VolumeID: *id, URI: u, TLS: cf.tlsOptions(), Connections: *conns, Timeout: *timeout, DeadConnTimeout: *dead, TLSMode: *tlsMode}
	att, err := a.Attach(ctx, spec)
	if err != nil {
		if (spec.TLS != nil || u.TLS()) && *tlsMode == driver.TLSKernel {
			return fmt.Errorf("%w (--tls=relay attaches through a relay in this command, which then stays until Ctrl-C)", err)
		}
		return err
	}
	fmt.Fprintln(stdout, att.Device)
	relay := att.TLS == driver.TLSRelay || att.TLS == driver.TLSMixed
	if !df.ioctl && !relay {
		return nil
	}
	// An ioctl device is served by a thread of this process, a relayed TLS
	// session by its goroutines.
	why := "is attached with ioctl"
	if relay {
		why = "carries TLS through a relay in this command"
	}
	fmt.Fprintf(os.Stderr, "%s %s and lives as long as this command: press Ctrl-C (or send SIGTERM) to detach\n", att.Device, why)
	sig, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-sig.Done()
	dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return a.Detach(dctx, *id)
}

func runDetach(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("detach", flag.ContinueOnError)
	var df deviceFlags
	df.register(fs)
	id := fs.String("id", "", "backend identity given to 'nbd-csi attach --id' (instead of DEVICE)")
	if err := parseFlags(fs, args, "detach [flags] DEVICE|--id ID"); err != nil {
		return err
	}
	if (*id == "") == (fs.NArg() == 0) || fs.NArg() > 1 {
		return fmt.Errorf("%w: give either a device (/dev/nbdN) or --id", errUsage)
	}
	d, err := df.open(ctx)
	if err != nil {
		return err
	}
	defer d.Close()
	if *id != "" {
		return d.DetachBackend(ctx, attach.CLIBackendPrefix+*id)
	}
	var index uint32
	if _, err := fmt.Sscanf(strings.TrimPrefix(fs.Arg(0), df.devRoot+"/"), "nbd%d", &index); err != nil {
		return fmt.Errorf("%w: %q is not an nbd device", errUsage, fs.Arg(0))
	}
	return d.Detach(ctx, index)
}

// DeviceOutput is one device in `nbd-csi devices --json` (docs/cli.md).
type DeviceOutput struct {
	Device    string `json:"device"`
	Index     uint32 `json:"index"`
	BackendID string `json:"backend_id"`
	Owner     string `json:"owner"`
	Size      uint64 `json:"size"`
	Connected bool   `json:"connected"`
	PID       int    `json:"pid"`
	ReadOnly  bool   `json:"read_only"`
	// TLS and TLSFallback: with --state-dir, how the node plugin last
	// handed a TLS volume's connections to the kernel ("kernel",
	// "relay", or "mixed" when only some went through the relay) and why
	// not kernel TLS.
	TLS         string `json:"tls,omitempty"`
	TLSFallback string `json:"tls_fallback,omitempty"`
}

func runDevices(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("devices", flag.ContinueOnError)
	var df deviceFlags
	df.register(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	stateDir := fs.String("state-dir", "", "the node plugin's --state-dir: show how it encrypts TLS volumes (kernel TLS or relay)")
	if err := parseFlags(fs, args, "devices [flags]"); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	d, err := df.open(ctx)
	if err != nil {
		return err
	}
	defer d.Close()
	list, err := d.List(ctx)
	if err != nil {
		return err
	}
	out := []DeviceOutput{}
	for _, x := range list {
		owner := "other"
		switch {
		case strings.HasPrefix(x.BackendID, attach.BackendPrefix):
			owner = "csi"
		case strings.HasPrefix(x.BackendID, attach.CLIBackendPrefix):
			owner = "cli"
		}
		d := DeviceOutput{Device: x.Path, Index: x.Index, BackendID: x.BackendID, Owner: owner,
			Size: x.SizeBytes, Connected: x.Connected, PID: x.PID, ReadOnly: x.ReadOnly}
		if vol, ok := strings.CutPrefix(x.BackendID, attach.BackendPrefix); ok && *stateDir != "" {
			if d.TLS, d.TLSFallback, err = attach.ReadTLSMode(filepath.Join(*stateDir, "tls"), vol); err != nil {
				return err
			}
		}
		out = append(out, d)
	}
	if *asJSON {
		return writeJSON(stdout, out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	if *stateDir == "" {
		fmt.Fprintln(tw, "DEVICE\tSIZE\tCONNECTED\tRO\tOWNER\tBACKEND")
		for _, x := range out {
			fmt.Fprintf(tw, "%s\t%s\t%v\t%v\t%s\t%s\n", x.Device, humanBytes(x.Size), x.Connected, x.ReadOnly, printable(x.Owner), printable(x.BackendID))
		}
		return tw.Flush()
	}
	fmt.Fprintln(tw, "DEVICE\tSIZE\tCONNECTED\tRO\tOWNER\tTLS\tBACKEND")
	for _, x := range out {
		tlsMode := x.TLS
		if tlsMode == "" {
			tlsMode = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%v\t%v\t%s\t%s\t%s\n", x.Device, humanBytes(x.Size), x.Connected, x.ReadOnly, printable(x.Owner), printable(tlsMode), printable(x.BackendID))
	}
	return tw.Flush()
}
