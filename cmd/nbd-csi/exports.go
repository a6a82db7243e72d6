// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// ExportOutput is one export in `nbd-csi exports --json` (docs/cli.md).
type ExportOutput struct {
	Server      string    `json:"server"`
	Export      string    `json:"export"`
	Description string    `json:"description"`
	Size        uint64    `json:"size"`
	Flags       []string  `json:"flags"`
	Phase       string    `json:"phase"`
	VolumeName  string    `json:"volume_name,omitempty"`
	VolumeID    string    `json:"volume_id,omitempty"`
	Nodes       []string  `json:"nodes"`
	SeenAt      time.Time `json:"seen_at"`
}

func runExports(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("exports", flag.ContinueOnError)
	var sf storeFlags
	sf.register(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args, "exports [flags]"); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	st, err := sf.open(ctx, true)
	if err != nil {
		return err
	}
	defer st.Close()
	all, err := st.Exports()
	if err != nil {
		return err
	}
	out := []ExportOutput{}
	for _, e := range all {
		o := ExportOutput{Server: e.Server, Export: e.Name, Description: e.Description, Size: e.Size,
			Flags: nbd.TransmissionFlags(e.Flags).Names(), Phase: string(e.Phase), VolumeName: e.VolumeName,
			VolumeID: e.VolumeID, Nodes: []string{}, SeenAt: e.SeenAt}
		if e.VolumeID != "" {
			holders, err := st.Holders(e.VolumeID)
			if err != nil {
				return err
			}
			for _, h := range holders {
				o.Nodes = append(o.Nodes, h.NodeID)
			}
		}
		out = append(out, o)
	}
	if *asJSON {
		return writeJSON(stdout, out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVER\tEXPORT\tSIZE\tPHASE\tVOLUME\tNODES")
	for _, o := range out {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", printable(o.Server), printable(o.Export), humanBytes(o.Size), o.Phase,
			printable(o.VolumeName), printable(fmt.Sprint(o.Nodes)))
	}
	return tw.Flush()
}
