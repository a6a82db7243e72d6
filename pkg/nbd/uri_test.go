// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseURI(t *testing.T) {
	long := strings.Repeat("a", 4097)
	tests := []struct {
		name string
		in   string
		want *URI
	}{
		{"tcp default port", "nbd://example.com/disk", &URI{Scheme: "nbd", Host: "example.com", Port: 10809, Export: "disk", TLSVerifyPeer: true}},
		{"tcp port", "nbd://10.0.0.1:1234/disk", &URI{Scheme: "nbd", Host: "10.0.0.1", Port: 1234, Export: "disk", TLSVerifyPeer: true}},
		{"no path is default export", "nbd://h", &URI{Scheme: "nbd", Host: "h", Port: 10809, TLSVerifyPeer: true}},
		{"slash is default export", "nbd://h/", &URI{Scheme: "nbd", Host: "h", Port: 10809, TLSVerifyPeer: true}},
		{"double slash keeps one", "nbd://h//disk", &URI{Scheme: "nbd", Host: "h", Port: 10809, Export: "/disk", TLSVerifyPeer: true}},
		{"percent decoded", "nbd://h/my%20disk%2Fx", &URI{Scheme: "nbd", Host: "h", Port: 10809, Export: "my disk/x", TLSVerifyPeer: true}},
		{"ipv6", "nbd://[::1]:10810/e", &URI{Scheme: "nbd", Host: "::1", Port: 10810, Export: "e", TLSVerifyPeer: true}},
		{"scheme case", "NBD://h/e", &URI{Scheme: "nbd", Host: "h", Port: 10809, Export: "e", TLSVerifyPeer: true}},
		{"tls", "nbds://h/e?tls-hostname=srv&tls-verify-peer=0", &URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "e", TLSHostname: "srv"}},
		{"tls certificates", "nbds://h/e?tls-certificates=/etc/pki/nbd&tls-type=x509", &URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "e", TLSVerifyPeer: true, TLSCertificates: "/etc/pki/nbd"}},
		{"unix", "nbd+unix:///e?socket=/run/nbd.sock", &URI{Scheme: "nbd+unix", Export: "e", Socket: "/run/nbd.sock", TLSVerifyPeer: true}},
		{"unix abstract", "nbd+unix:///e?socket=%00abs", &URI{Scheme: "nbd+unix", Export: "e", Socket: "@abs", TLSVerifyPeer: true}},
		// A TLS parameter makes TLS mandatory: never plaintext.
		{"tls certificates imply tls", "nbd://h/e?tls-certificates=/d", &URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "e", TLSVerifyPeer: true, TLSCertificates: "/d"}},
		{"tls hostname implies tls", "nbd://h/e?tls-hostname=srv", &URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "e", TLSVerifyPeer: true, TLSHostname: "srv"}},
		{"tls verify peer implies tls", "nbd://h/e?tls-verify-peer=1", &URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "e", TLSVerifyPeer: true}},
		{"tls no verify implies tls", "nbd://h/e?tls-verify-peer=0", &URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "e"}},
		{"tls type implies tls", "nbd://h/e?tls-type=x509", &URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "e", TLSVerifyPeer: true}},
		{"unix tls parameter implies tls", "nbd+unix:///e?socket=/s&tls-hostname=x", &URI{Scheme: "nbds+unix", Export: "e", Socket: "/s", TLSHostname: "x", TLSVerifyPeer: true}},
		{"unix tls", "nbds+unix:///?socket=/s&tls-hostname=localhost", &URI{Scheme: "nbds+unix", Socket: "/s", TLSHostname: "localhost", TLSVerifyPeer: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseURI(tt.in)
			if err != nil {
				t.Fatalf("ParseURI(%q): %v", tt.in, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("ParseURI(%q) (-want +got):\n%s", tt.in, diff)
			}
			// The canonical form parses to the same thing.
			again, err := ParseURI(got.String())
			if err != nil {
				t.Fatalf("ParseURI(String()=%q): %v", got.String(), err)
			}
			if diff := cmp.Diff(got, again); diff != "" {
				t.Errorf("round trip through %q (-want +got):\n%s", got.String(), diff)
			}
		})
	}

	bad := []struct {
		name, in, mention string
	}{
		{"empty", "", "empty"},
		{"no scheme", "host/disk", "no scheme"},
		{"http", "http://h/e", "unsupported scheme"},
		{"vsock", "nbd+vsock://2/e", "unsupported scheme"},
		{"unknown parameter", "nbd://h/e?color=blue", `unknown parameter "color"`},
		{"repeated parameter", "nbd+unix:///e?socket=/a&socket=/b", "2 times"},
		{"unix without socket", "nbd+unix:///e", "requires the socket="},
		{"unix with host", "nbd+unix://h/e?socket=/s", "take no host"},
		{"socket on tcp", "nbd://h/e?socket=/s", "only valid with"},
		{"port zero", "nbd://h:0/e", "out of range"},
		{"port huge", "nbd://h:70000/e", "out of range"},
		{"no host", "nbd:///e", "no host"},
		{"user info", "nbds://alice@h/e", "user info"},
		{"fragment", "nbd://h/e#x", "fragment"},
		{"verify peer garbage", "nbds://h/e?tls-verify-peer=maybe", "tls-verify-peer"},
		{"psk", "nbds://h/e?tls-type=psk", "tls-type"},
		{"psk on plaintext", "nbd://h/e?tls-type=psk", "tls-type"},
		{"psk file", "nbd://h/e?tls-psk-file=/k", `TLS parameter "tls-psk-file" is not supported`},
		{"tls priority", "nbd://h/e?tls-priority=NORMAL", `TLS parameter "tls-priority" is not supported`},
		{"tls username", "nbd+unix:///e?socket=/s&tls-username=u", `TLS parameter "tls-username" is not supported`},
		{"nul in export", "nbd://h/a%00b", "NUL"},
		{"long export", "nbd://h/" + long, "4097 bytes"},
		{"opaque", "nbd:h/e", "want nbd://"},
		{"bare ipv6", "nbds://::", "in brackets"},
		{"bare ipv6 with port", "nbd://::1:10809/e", "in brackets"},
		{"bracketed non-address", "nbd://[a:b]/e", "invalid host"},
	}
	for _, tt := range bad {
		t.Run("bad/"+tt.name, func(t *testing.T) {
			_, err := ParseURI(tt.in)
			if !errors.Is(err, ErrBadURI) {
				t.Fatalf("ParseURI(%q) = %v, want ErrBadURI", tt.in, err)
			}
			if !strings.Contains(err.Error(), tt.mention) {
				t.Errorf("ParseURI(%q) error %q does not mention %q", tt.in, err, tt.mention)
			}
		})
	}
}

func TestURINetwork(t *testing.T) {
	for in, want := range map[string][2]string{
		"nbd://h/e":                     {"tcp", "h:10809"},
		"nbd://[fe80::1]:99/e":          {"tcp", "[fe80::1]:99"},
		"nbd+unix:///e?socket=/run/x":   {"unix", "/run/x"},
		"nbds+unix:///e?socket=%00name": {"unix", "@name"},
	} {
		u, err := ParseURI(in)
		if err != nil {
			t.Fatal(err)
		}
		n, a := u.Network()
		if n != want[0] || a != want[1] {
			t.Errorf("%s: Network() = %s %s, want %s %s", in, n, a, want[0], want[1])
		}
	}
}

func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"nbd://h/e", "nbds://[::1]:99/x%20y?tls-hostname=a", "nbd+unix:///e?socket=/s",
		"nbds+unix:///?socket=%00abs&tls-verify-peer=0", "nbd://h//e", "nbd://h/?tls-certificates=/d",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if !errors.Is(err, ErrBadURI) {
				t.Fatalf("ParseURI(%q) error %v does not wrap ErrBadURI", s, err)
			}
			return
		}
		again, err := ParseURI(u.String())
		if err != nil {
			t.Fatalf("ParseURI(%q).String() = %q does not parse: %v", s, u.String(), err)
		}
		if diff := cmp.Diff(u, again); diff != "" {
			t.Fatalf("round trip of %q via %q (-want +got):\n%s", s, u.String(), diff)
		}
	})
}
