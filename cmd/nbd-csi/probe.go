// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// clientFlags are the flags shared by the commands that talk to a server.
type clientFlags struct {
	json     bool
	timeout  time.Duration
	tlsCA    string
	tlsCert  string
	tlsKey   string
	tlsName  string
	insecure bool
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&c.json, "json", false, "print JSON (field names in docs/cli.md)")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "connect and handshake timeout")
	c.registerTLS(fs)
}

// registerTLS registers only the TLS flags.
func (c *clientFlags) registerTLS(fs *flag.FlagSet) {
	fs.StringVar(&c.tlsCA, "tls-ca", "", "PEM CA bundle to verify the server (enables TLS)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM client certificate (enables TLS; needs --tls-key)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM client private key (enables TLS; needs --tls-cert)")
	fs.StringVar(&c.tlsName, "tls-hostname", "", "name to verify in the server certificate (default: the URI host)")
	fs.BoolVar(&c.insecure, "tls-insecure", false, "encrypt but do not verify the server certificate")
}

// options turns the flags into dial options. Any TLS flag turns TLS on,
// and then the connection never continues in plaintext.
func (c *clientFlags) options() []nbd.Option {
	if t := c.tlsOptions(); t != nil {
		return []nbd.Option{nbd.WithTLS(t)}
	}
	return nil
}

// tlsOptions returns the TLS material the flags give, nil for none.
func (c *clientFlags) tlsOptions() *nbd.TLSOptions {
	if c.tlsCA == "" && c.tlsCert == "" && c.tlsKey == "" && c.tlsName == "" && !c.insecure {
		return nil
	}
	return &nbd.TLSOptions{
		CAFile: c.tlsCA, CertFile: c.tlsCert, KeyFile: c.tlsKey,
		ServerName: c.tlsName, InsecureSkipVerify: c.insecure,
	}
}

// parseURI parses a URI argument; a bad one is a usage error.
func parseURI(s string) (*nbd.URI, error) {
	u, err := nbd.ParseURI(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	return u, nil
}

// parse parses args, which must leave exactly one URI.
func (c *clientFlags) parse(name string, args []string) (*nbd.URI, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	c.register(fs)
	if err := parseFlags(fs, args, name+" [flags] URI\n\nURI: nbd://host[:port]/export, nbds://…, nbd+unix:///export?socket=PATH, nbds+unix://…"); err != nil {
		return nil, err
	}
	if fs.NArg() != 1 {
		return nil, fmt.Errorf("%w: want exactly one URI, got %d arguments", errUsage, fs.NArg())
	}
	if c.timeout <= 0 {
		return nil, fmt.Errorf("%w: --timeout %v: want a positive duration (e.g. 30s)", errUsage, c.timeout)
	}
	return parseURI(fs.Arg(0))
}

// ProbeOutput is the JSON document `nbd-csi probe --json` prints. Field
// names are stable; docs/cli.md describes them.
type ProbeOutput struct {
	URI                  string   `json:"uri"`
	Export               string   `json:"export"`
	CanonicalName        string   `json:"canonical_name,omitempty"`
	Description          string   `json:"description"`
	Size                 uint64   `json:"size"`
	Flags                []string `json:"flags"`
	FlagsRaw             uint16   `json:"flags_raw"`
	ReadOnly             bool     `json:"read_only"`
	BlockSizeMinimum     uint32   `json:"block_size_minimum"`
	BlockSizePreferred   uint32   `json:"block_size_preferred"`
	BlockSizeMaximum     uint32   `json:"block_size_maximum"`
	BlockSizesAdvertised bool     `json:"block_sizes_advertised"`
	Handshake            string   `json:"handshake"`
	TLS                  bool     `json:"tls"`
	StructuredReplies    bool     `json:"structured_replies"`
	MetaContexts         []string `json:"meta_contexts"`
}

func runProbe(ctx context.Context, args []string, stdout io.Writer) error {
	var cf clientFlags
	u, err := cf.parse("probe", args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cf.timeout)
	defer cancel()
	info, err := nbd.Probe(ctx, u, append(cf.options(), nbd.WithProfile(nbd.ProfileUserspace))...)
	if err != nil {
		return err
	}
	out := ProbeOutput{
		URI: u.String(), Export: info.Name, CanonicalName: info.CanonicalName,
		Description: info.Description, Size: info.Size, Flags: info.Flags.Names(),
		FlagsRaw: uint16(info.Flags), ReadOnly: info.ReadOnly(),
		BlockSizeMinimum: info.BlockSizes.Minimum, BlockSizePreferred: info.BlockSizes.Preferred,
		BlockSizeMaximum: info.BlockSizes.Maximum, BlockSizesAdvertised: info.BlockSizesAdvertised,
		Handshake: info.Handshake.String(), TLS: info.TLS,
		StructuredReplies: info.StructuredReplies, MetaContexts: []string{},
	}
	for name := range info.MetaContexts {
		out.MetaContexts = append(out.MetaContexts, name)
	}
	slices.Sort(out.MetaContexts)
	if cf.json {
		return writeJSON(stdout, out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "export:\t%q\n", out.Export)
	if out.CanonicalName != "" && out.CanonicalName != out.Export {
		fmt.Fprintf(tw, "canonical name:\t%q\n", out.CanonicalName)
	}
	if out.Description != "" {
		fmt.Fprintf(tw, "description:\t%s\n", printable(out.Description))
	}
	fmt.Fprintf(tw, "size:\t%d (%s)\n", out.Size, humanBytes(out.Size))
	fmt.Fprintf(tw, "flags:\t%s\n", strings.Join(out.Flags, " "))
	bs := "not advertised (defaults)"
	if out.BlockSizesAdvertised {
		bs = "advertised"
	}
	fmt.Fprintf(tw, "block sizes:\tminimum %d, preferred %d, maximum %d, %s\n", out.BlockSizeMinimum, out.BlockSizePreferred, out.BlockSizeMaximum, bs)
	fmt.Fprintf(tw, "handshake:\t%s\n", out.Handshake)
	fmt.Fprintf(tw, "tls:\t%v\n", out.TLS)
	fmt.Fprintf(tw, "structured replies:\t%v\n", out.StructuredReplies)
	if len(out.MetaContexts) > 0 {
		fmt.Fprintf(tw, "metadata contexts:\t%s\n", printable(strings.Join(out.MetaContexts, " ")))
	}
	return tw.Flush()
}

// ListOutput is the JSON document `nbd-csi list --json` prints.
type ListOutput struct {
	URI     string       `json:"uri"`
	Exports []ListExport `json:"exports"`
}

// ListExport is one export in ListOutput.
type ListExport struct {
	Name        string `json:"name"`
	Description string `json:"description"`
}

func runList(ctx context.Context, args []string, stdout io.Writer) error {
	var cf clientFlags
	u, err := cf.parse("list", args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cf.timeout)
	defer cancel()
	l, err := nbd.List(ctx, u, cf.options()...)
	if err != nil {
		return err
	}
	out := ListOutput{URI: u.WithExport("").String(), Exports: []ListExport{}}
	for _, e := range l {
		out.Exports = append(out.Exports, ListExport{Name: e.Name, Description: e.Description})
	}
	if cf.json {
		return writeJSON(stdout, out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "EXPORT\tDESCRIPTION")
	for _, e := range out.Exports {
		fmt.Fprintf(tw, "%q\t%s\n", e.Name, printable(e.Description))
	}
	return tw.Flush()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
