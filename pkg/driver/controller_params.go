// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"fmt"
	"path"
	"strconv"
	"strings"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// StorageClass parameters read by the controller (docs/parameters.md). The
// node keys (connections, timeout, deadConnectionTimeout, blockSize,
// mkfsOptions) are also accepted and passed through to the volume context.
const (
	// ParamServer is the NBD server to provision from: an NBD URI without
	// an export, e.g. nbd://host:10809, nbds://host, nbd+unix:///?socket=PATH.
	ParamServer = "server"
	// ParamExportFilter is a glob (path.Match syntax) on export names;
	// default "*".
	ParamExportFilter = "exportFilter"
	// ParamWipeOnDelete ("true"/"false", default false) zeroes the export
	// before it is released, so one tenant's data never reaches the next.
	ParamWipeOnDelete = "wipeOnDelete"
)

// poolParams are validated StorageClass parameters.
type poolParams struct {
	server *nbd.URI
	filter string
	wipe   bool
	// nodeContext are the node keys to pass through.
	nodeContext map[string]string
}

// parsePoolParams validates CreateVolume / GetCapacity parameters. Keys
// containing "/" belong to Kubernetes sidecars and are ignored.
func parsePoolParams(params map[string]string) (*poolParams, error) {
	p := &poolParams{filter: "*", nodeContext: map[string]string{}}
	for k, v := range params {
		switch {
		case strings.Contains(k, "/"):
		case k == ParamServer, k == ParamExportFilter, k == ParamWipeOnDelete:
		case nodeKeys[k] && k != KeyURI:
			p.nodeContext[k] = v
		default:
			return nil, fmt.Errorf("parameter %q is unknown (known: server, exportFilter, wipeOnDelete, connections, timeout, deadConnectionTimeout, blockSize, mkfsOptions, encrypted)", k)
		}
	}
	raw := params[ParamServer]
	if raw == "" {
		return nil, fmt.Errorf("parameter %q is required (the NBD server URI, without an export)", ParamServer)
	}
	u, err := nbd.ParseURI(raw)
	if err != nil {
		return nil, fmt.Errorf("parameter %q: %w", ParamServer, err)
	}
	if u.Export != "" {
		return nil, fmt.Errorf("parameter %q must name a server, not an export (got export %q)", ParamServer, u.Export)
	}
	p.server = u
	if f, ok := params[ParamExportFilter]; ok {
		if _, err := path.Match(f, ""); err != nil || f == "" {
			return nil, fmt.Errorf("parameter %q: %q is not a valid glob", ParamExportFilter, f)
		}
		p.filter = f
	}
	if w, ok := params[ParamWipeOnDelete]; ok {
		b, err := strconv.ParseBool(w)
		if err != nil {
			return nil, fmt.Errorf("parameter %q: %q is not true or false", ParamWipeOnDelete, w)
		}
		p.wipe = b
	}
	// The node keys must pass the node's own validation.
	probe := map[string]string{KeyURI: u.WithExport("x").String()}
	for k, v := range p.nodeContext {
		probe[k] = v
	}
	if _, err := ParseVolumeContext(probe); err != nil {
		return nil, fmt.Errorf("parameters: %w", err)
	}
	return p, nil
}

// volumeContext is what a claimed export's volume carries to the node.
func (p *poolParams) volumeContext(export string) map[string]string {
	vc := map[string]string{KeyURI: p.server.WithExport(export).String()}
	for k, v := range p.nodeContext {
		vc[k] = v
	}
	return vc
}
