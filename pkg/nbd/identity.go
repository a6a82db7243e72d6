// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
)

// Server identity.
//
// NBD has no notion of a server identity: a server does not say who it is,
// and one server may be reached under many spellings. ServerKey folds every
// spelling that names the same endpoint without asking anyone (no DNS, no
// file system):
//
//   - the scheme's TLS choice: nbd:// and nbds:// to one host and port are
//     one server (TLS is how it is reached, not which server it is); so are
//     nbd+unix and nbds+unix to one socket;
//   - query parameters (tls-hostname, tls-certificates, tls-verify-peer,
//     their order and escaping): how to reach, not what;
//   - host case and one trailing dot (example.COM. = example.com);
//   - the default port, written or not (:10809);
//   - IP literal spellings: [0:0:0:0:0:0:0:1] = [::1], IPv4-mapped
//     [::ffff:127.0.0.1] = 127.0.0.1, and the numeric forms inet_aton
//     accepts (2130706433, 0x7f.1, 0177.0.0.1 = 127.0.0.1);
//   - a unix socket path's redundant elements (/run//x/../nbd.sock =
//     /run/nbd.sock).
//
// What a pure function cannot know is left to ResolveServer, which asks the
// resolver and the file system where a URI leads now: a host name and an
// address it resolves to (localhost and 127.0.0.1), a symbolic link to a
// socket (/var/run → /run). Callers compare those address sets to find two
// identities that reach one endpoint. And what nobody can know from the
// outside — one server listening on two addresses, or behind two names that
// resolve apart — only an administrator can declare (nbd-csi's serverID
// parameter).
//
// Export names are compared byte for byte after percent-decoding (the
// server compares them so); ExportKey joins a ServerKey and a name.

// ServerKey returns the canonical identity of the server u names, e.g.
// "tcp:127.0.0.1:10809", "tcp:[::1]:10809", "tcp:nbd.example.com:10809" or
// "unix:/run/nbd.sock" ("unix:@name" for an abstract socket).
func (u *URI) ServerKey() string {
	if u.IsUnix() {
		return "unix:" + canonicalSocket(u.Socket)
	}
	port := u.Port
	if port == 0 {
		port = DefaultPortNumber
	}
	return "tcp:" + net.JoinHostPort(CanonicalHost(u.Host), strconv.Itoa(port))
}

// ExportKey returns the canonical identity of the export u names: its
// ServerKey, NUL, the export name.
func (u *URI) ExportKey() string { return JoinExportKey(u.ServerKey(), u.Export) }

// JoinExportKey joins a server identity and an export name into an export
// identity (NUL cannot occur in either).
func JoinExportKey(server, export string) string { return server + "\x00" + export }

// DefaultPortNumber is the IANA-assigned NBD port.
const DefaultPortNumber = 10809

func canonicalSocket(p string) string {
	if strings.HasPrefix(p, "@") || p == "" {
		return p // abstract: a name, not a path
	}
	return filepath.Clean(p)
}

// CanonicalHost folds the spellings of one host: IP literals to their
// canonical text (IPv4-mapped IPv6 to IPv4, IPv6 compressed and
// lowercase, inet_aton's numeric IPv4 forms to dotted decimal), names to
// lowercase without a trailing dot.
func CanonicalHost(h string) string {
	h = strings.TrimPrefix(strings.TrimSuffix(h, "]"), "[")
	if a, err := netip.ParseAddr(h); err == nil {
		return a.Unmap().String()
	}
	h = strings.ToLower(h)
	if t := strings.TrimRight(h, "."); t != "" {
		h = t
	}
	if a, err := netip.ParseAddr(h); err == nil {
		return a.Unmap().String()
	}
	if a, ok := parseInetAton(h); ok {
		return a.String()
	}
	return h
}

// parseInetAton parses the IPv4 forms of inet_aton(3), which the C library
// resolver accepts as addresses: 1 to 4 parts, each decimal, octal (leading
// 0) or hexadecimal (0x); the last part fills the remaining bytes.
func parseInetAton(s string) (netip.Addr, bool) {
	if s == "" || len(s) > 64 {
		return netip.Addr{}, false
	}
	parts := strings.Split(s, ".")
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	vals := make([]uint64, len(parts))
	for i, p := range parts {
		base := 10
		switch {
		case len(p) > 2 && (p[:2] == "0x" || p[:2] == "0X"):
			base, p = 16, p[2:]
		case len(p) > 1 && p[0] == '0':
			base, p = 8, p[1:]
		}
		if p == "" {
			return netip.Addr{}, false
		}
		for _, c := range p {
			if !(c >= '0' && c <= '9' || base == 16 && (c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F')) {
				return netip.Addr{}, false
			}
		}
		v, err := strconv.ParseUint(p, base, 32)
		if err != nil {
			return netip.Addr{}, false
		}
		vals[i] = v
	}
	var ip uint64
	n := len(vals)
	for i := 0; i < n-1; i++ {
		if vals[i] > 0xff {
			return netip.Addr{}, false
		}
		ip |= vals[i] << (8 * (3 - i))
	}
	if last := vals[n-1]; last >= 1<<(8*(4-(n-1))) {
		return netip.Addr{}, false
	} else {
		ip |= last
	}
	return netip.AddrFrom4([4]byte{byte(ip >> 24), byte(ip >> 16), byte(ip >> 8), byte(ip)}), true
}

// Resolver is the part of *net.Resolver ResolveServer uses.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// ResolveServer returns where u leads now, as canonical endpoint keys of
// the ServerKey form: "tcp:ADDR:PORT" for every address the host resolves
// to (r; nil means net.DefaultResolver), or "unix:PATH" with symbolic links
// resolved (a socket that does not exist yet keeps its cleaned path). Two
// URIs whose results overlap reach at least one common endpoint.
func ResolveServer(ctx context.Context, u *URI, r Resolver) ([]string, error) {
	if u.IsUnix() {
		p := canonicalSocket(u.Socket)
		if !strings.HasPrefix(p, "@") {
			if real, err := filepath.EvalSymlinks(p); err == nil {
				if abs, err := filepath.Abs(real); err == nil {
					p = abs
				}
			}
		}
		return []string{"unix:" + p}, nil
	}
	port := strconv.Itoa(u.Port)
	if u.Port == 0 {
		port = strconv.Itoa(DefaultPortNumber)
	}
	host := CanonicalHost(u.Host)
	if a, err := netip.ParseAddr(host); err == nil {
		return []string{"tcp:" + net.JoinHostPort(a.WithZone("").String(), port)}, nil
	}
	if r == nil {
		r = net.DefaultResolver
	}
	addrs, err := r.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", host, err)
	}
	seen := map[string]bool{}
	var out []string
	for _, a := range addrs {
		k := "tcp:" + net.JoinHostPort(a.Unmap().WithZone("").String(), port)
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	return out, nil
}
