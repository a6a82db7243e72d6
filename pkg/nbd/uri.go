// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// URI is a parsed NBD URI (NetworkBlockDevice doc/uri.md):
//
//	nbd://host[:port]/export         plaintext over TCP
//	nbds://host[:port]/export        TLS mandatory over TCP
//	nbd+unix:///export?socket=PATH   plaintext over a unix socket
//	nbds+unix:///export?socket=PATH  TLS mandatory over a unix socket
//
// The export name is the path without its leading slash, percent-decoded.
// Query parameters understood: socket, tls-hostname, tls-verify-peer (0 or 1)
// and tls-certificates (a directory holding ca-cert.pem and optionally
// client-cert.pem and client-key.pem, as libnbd and qemu name them), and
// tls-type=x509. Any other parameter is an error, as are user info (TLS-PSK
// usernames are not supported) and a host in a unix-socket URI.
//
// A TLS parameter asks for TLS: on an nbd or nbd+unix URI it makes TLS
// mandatory, and the URI parses as nbds or nbds+unix. A parameter that asks
// for TLS is never dropped into a plaintext connection, and one this client
// does not implement (tls-psk-file, tls-priority, tls-username, …) is an
// error rather than ignored.
type URI struct {
	// Scheme is one of nbd, nbds, nbd+unix, nbds+unix.
	Scheme string
	// Host is the TCP host (brackets removed for IPv6); empty for unix.
	Host string
	// Port is the TCP port (default 10809); 0 for unix.
	Port int
	// Socket is the unix socket path; a leading "@" denotes an abstract
	// socket (the URI spells it %00).
	Socket string
	// Export is the decoded export name; empty means the default export.
	Export string
	// TLSHostname overrides the name checked against the server
	// certificate (tls-hostname).
	TLSHostname string
	// TLSVerifyPeer is false only when the URI says tls-verify-peer=0.
	TLSVerifyPeer bool
	// TLSCertificates is the tls-certificates directory, if given.
	TLSCertificates string
}

// ParseURI parses and validates an NBD URI. Every error wraps ErrBadURI and
// names what is wrong.
func ParseURI(s string) (*URI, error) {
	if s == "" {
		return nil, fmt.Errorf("%w: empty", ErrBadURI)
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadURI, err)
	}
	out := &URI{Scheme: strings.ToLower(u.Scheme), TLSVerifyPeer: true}
	switch out.Scheme {
	case "nbd", "nbds", "nbd+unix", "nbds+unix":
	case "":
		return nil, fmt.Errorf("%w: %q has no scheme (want nbd://, nbds://, nbd+unix:// or nbds+unix://)", ErrBadURI, s)
	default:
		return nil, fmt.Errorf("%w: unsupported scheme %q (want nbd, nbds, nbd+unix or nbds+unix)", ErrBadURI, u.Scheme)
	}
	if u.Opaque != "" {
		return nil, fmt.Errorf("%w: %q: want %s://…", ErrBadURI, s, out.Scheme)
	}
	if u.User != nil {
		return nil, fmt.Errorf("%w: user info %q is not supported (TLS-PSK usernames are not implemented)", ErrBadURI, u.User.Username())
	}
	if u.Fragment != "" {
		return nil, fmt.Errorf("%w: fragment %q not allowed", ErrBadURI, u.Fragment)
	}
	// The export name is the path minus one leading slash; url.Parse has
	// already percent-decoded it.
	out.Export = strings.TrimPrefix(u.Path, "/")
	if err := ValidateExportName(out.Export); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadURI, err)
	}

	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("%w: query: %v", ErrBadURI, err)
	}
	tlsParam := ""
	for key, vals := range q {
		if strings.HasPrefix(key, "tls-") {
			tlsParam = key
		}
		if len(vals) != 1 {
			return nil, fmt.Errorf("%w: parameter %q given %d times", ErrBadURI, key, len(vals))
		}
		v := vals[0]
		switch key {
		case "socket":
			out.Socket = v
		case "tls-hostname":
			out.TLSHostname = v
		case "tls-verify-peer":
			switch v {
			case "1", "true":
				out.TLSVerifyPeer = true
			case "0", "false":
				out.TLSVerifyPeer = false
			default:
				return nil, fmt.Errorf("%w: tls-verify-peer=%q, want 0 or 1", ErrBadURI, v)
			}
		case "tls-certificates":
			if v == "" {
				return nil, fmt.Errorf("%w: tls-certificates is empty", ErrBadURI)
			}
			out.TLSCertificates = v
		case "tls-type":
			if v != "x509" {
				return nil, fmt.Errorf("%w: tls-type=%q is not supported (only x509)", ErrBadURI, v)
			}
		default:
			if strings.HasPrefix(key, "tls-") {
				return nil, fmt.Errorf("%w: TLS parameter %q is not supported (known: tls-hostname, tls-verify-peer, tls-certificates, tls-type=x509); refusing rather than connecting without it", ErrBadURI, key)
			}
			return nil, fmt.Errorf("%w: unknown parameter %q (known: socket, tls-hostname, tls-verify-peer, tls-certificates, tls-type)", ErrBadURI, key)
		}
	}
	if tlsParam != "" && !out.TLS() {
		// The parameter asks for TLS; never connect without it.
		out.Scheme = strings.Replace(out.Scheme, "nbd", "nbds", 1)
	}

	if out.IsUnix() {
		if u.Host != "" {
			return nil, fmt.Errorf("%w: %s URIs take no host (got %q); use %s:///export?socket=PATH", ErrBadURI, out.Scheme, u.Host, out.Scheme)
		}
		if out.Socket == "" {
			return nil, fmt.Errorf("%w: %s requires the socket= parameter", ErrBadURI, out.Scheme)
		}
		if out.Socket[0] == 0 {
			out.Socket = "@" + out.Socket[1:]
		}
		if strings.IndexByte(out.Socket, 0) >= 0 {
			return nil, fmt.Errorf("%w: socket path contains NUL", ErrBadURI)
		}
		return out, nil
	}
	if out.Socket != "" {
		return nil, fmt.Errorf("%w: socket= is only valid with nbd+unix or nbds+unix", ErrBadURI)
	}
	out.Host = u.Hostname()
	if out.Host == "" {
		return nil, fmt.Errorf("%w: %q has no host", ErrBadURI, s)
	}
	if strings.Contains(out.Host, ":") {
		// Only a bracketed IPv6 address may hold colons.
		if _, err := netip.ParseAddr(out.Host); err != nil || !strings.HasPrefix(u.Host, "[") {
			return nil, fmt.Errorf("%w: host %q: an IPv6 address goes in brackets, e.g. nbd://[::1]:10809", ErrBadURI, u.Host)
		}
	}
	if i := strings.IndexByte(out.Host, '%'); i >= 0 {
		// An IPv6 zone names a network interface: letters, digits, ".",
		// "-", "_" (anything else does not survive formatting the URI).
		for _, c := range out.Host[i+1:] {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
				return nil, fmt.Errorf("%w: IPv6 zone %q: want an interface name", ErrBadURI, out.Host[i+1:])
			}
		}
	}
	out.Port = nbdproto.DefaultPort
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("%w: port %q out of range 1-65535", ErrBadURI, p)
		}
		out.Port = n
	}
	return out, nil
}

// ValidateExportName reports whether name can be sent to a server: at most
// 4096 bytes, valid UTF-8 and free of NUL (spec, "Conventions").
func ValidateExportName(name string) error {
	if len(name) > nbdproto.MaxString {
		return fmt.Errorf("%w: export name is %d bytes, the limit is %d", ErrBadArgument, len(name), nbdproto.MaxString)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return fmt.Errorf("%w: export name contains NUL", ErrBadArgument)
	}
	if !utf8.ValidString(name) {
		return fmt.Errorf("%w: export name is not valid UTF-8", ErrBadArgument)
	}
	return nil
}

// TLS reports whether the scheme makes TLS mandatory.
func (u *URI) TLS() bool { return u.Scheme == "nbds" || u.Scheme == "nbds+unix" }

// IsUnix reports whether the URI names a unix socket.
func (u *URI) IsUnix() bool { return strings.HasSuffix(u.Scheme, "+unix") }

// Network returns the arguments for net.Dial: ("unix", path) or
// ("tcp", "host:port").
func (u *URI) Network() (network, address string) {
	if u.IsUnix() {
		return "unix", u.Socket
	}
	return "tcp", net.JoinHostPort(u.Host, strconv.Itoa(u.Port))
}

// ServerName is the name to verify the server certificate against:
// tls-hostname if given, else the host.
func (u *URI) ServerName() string {
	if u.TLSHostname != "" {
		return u.TLSHostname
	}
	return u.Host
}

// WithExport returns a copy of u naming another export.
func (u *URI) WithExport(name string) *URI {
	c := *u
	c.Export = name
	return &c
}

// String formats the URI canonically (default port omitted).
func (u *URI) String() string {
	v := url.URL{Scheme: u.Scheme, Path: "/" + u.Export}
	if !u.IsUnix() {
		v.Host = u.Host
		if strings.Contains(u.Host, ":") {
			v.Host = "[" + u.Host + "]"
		}
		if u.Port != 0 && u.Port != nbdproto.DefaultPort {
			v.Host = net.JoinHostPort(u.Host, strconv.Itoa(u.Port))
		}
	}
	q := url.Values{}
	if u.IsUnix() {
		s := u.Socket
		if strings.HasPrefix(s, "@") {
			s = "\x00" + s[1:]
		}
		q.Set("socket", s)
	}
	if u.TLSHostname != "" {
		q.Set("tls-hostname", u.TLSHostname)
	}
	if !u.TLSVerifyPeer {
		q.Set("tls-verify-peer", "0")
	}
	if u.TLSCertificates != "" {
		q.Set("tls-certificates", u.TLSCertificates)
	}
	// '/' needs no escaping in a query; keeping it makes paths readable.
	v.RawQuery = strings.ReplaceAll(q.Encode(), "%2F", "/")
	return v.String()
}
