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
	// ParamWipeOnDelete ("true"/"false", default true) zeroes the export
	// before it is released, so one tenant's data never reaches the next.
	// "false" is an explicit opt-out: the next claim gets the data.
	ParamWipeOnDelete = "wipeOnDelete"
)

// poolParams are validated StorageClass parameters.
type poolParams struct {
	server *nbd.URI
	// id is the server's identity: "id:"+serverID when declared, else
	// server.ServerKey().
	id     string
	filter string
	wipe   bool
	// nodeContext are the node keys to pass through.
	nodeContext map[string]string
}

// parsePoolParams validates CreateVolume / GetCapacity parameters. Keys
// containing "/" belong to Kubernetes sidecars and are ignored.
func parsePoolParams(params map[string]string) (*poolParams, error) {
	p := &poolParams{filter: "*", wipe: true, nodeContext: map[string]string{}}
	for k, v := range params {
		switch {
		case strings.Contains(k, "/"):
		case k == ParamServer, k == ParamExportFilter, k == ParamWipeOnDelete, k == KeyServerID:
		case nodeKeys[k] && k != KeyURI:
			p.nodeContext[k] = v
		default:
			return nil, fmt.Errorf("parameter %q is unknown (known: server, serverID, exportFilter, wipeOnDelete, connections, timeout, deadConnectionTimeout, blockSize, mkfsOptions, encrypted)", k)
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
	p.id = u.ServerKey()
	if sid, ok := params[KeyServerID]; ok {
		id, err := serverIdentity(sid)
		if err != nil {
			return nil, err
		}
		p.id = id
		p.nodeContext[KeyServerID] = sid
	}
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

// serverIdentity validates a declared serverID and returns the identity.
func serverIdentity(sid string) (string, error) {
	if sid == "" || len(sid) > 253 {
		return "", fmt.Errorf("parameter %q: want 1 to 253 bytes, got %d", KeyServerID, len(sid))
	}
	for _, c := range sid {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_' || c == ':') {
			return "", fmt.Errorf("parameter %q: %q holds %q; use letters, digits, '.', '-', '_', ':'", KeyServerID, sid, c)
		}
	}
	return "id:" + sid, nil
}

// exportIdentity is the identity of the export a volume context names:
// its declared serverID or its URI's server, and the export name.
func exportIdentity(vc map[string]string) (string, error) {
	p, err := ParseVolumeContext(vc)
	if err != nil {
		return "", err
	}
	server := p.URI.ServerKey()
	if sid, ok := vc[KeyServerID]; ok {
		if server, err = serverIdentity(sid); err != nil {
			return "", err
		}
	}
	return nbd.JoinExportKey(server, p.URI.Export), nil
}

// volumeContext is what a claimed export's volume carries to the node.
func (p *poolParams) volumeContext(export string) map[string]string {
	vc := map[string]string{KeyURI: p.server.WithExport(export).String()}
	for k, v := range p.nodeContext {
		vc[k] = v
	}
	return vc
}
