// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestServerKeyFoldsSpellings(t *testing.T) {
	groups := []struct {
		want      string
		spellings []string
	}{
		{"tcp:127.0.0.1:10809", []string{
			"nbd://127.0.0.1", "nbd://127.0.0.1:10809", "nbds://127.0.0.1/", "nbd://127.0.0.1:10809/export",
			"nbd://[::ffff:127.0.0.1]", "nbd://[::FFFF:7F00:1]:10809", "nbd://2130706433", "nbd://0x7f.1",
			"nbd://0177.0.0.1", "nbd://127.1", "nbd://0x7F000001", "NBD://127.0.0.1?tls-hostname=x",
			"nbds://127.0.0.1?tls-verify-peer=0&tls-hostname=a", "nbds://127.0.0.1?tls-hostname=a&tls-verify-peer=0",
		}},
		{"tcp:[::1]:10809", []string{"nbd://[::1]", "nbd://[0:0:0:0:0:0:0:1]:10809", "nbds://[0::1]/x"}},
		{"tcp:[2001:db8::1]:99", []string{"nbd://[2001:DB8::1]:99", "nbd://[2001:0db8:0000::0001]:99"}},
		{"tcp:nbd.example.com:10809", []string{"nbd://nbd.example.com", "nbd://NBD.Example.COM.", "nbds://nbd.example.com.:10809/e", "nbd://nbd.example.com:010809"}},
		{"tcp:localhost:7000", []string{"nbd://localhost:7000", "nbd://LOCALHOST.:7000"}},
		{"unix:/run/nbd.sock", []string{"nbd+unix:///?socket=/run/nbd.sock", "nbds+unix:///e?socket=/run//x/../nbd.sock", "nbd+unix:///?socket=%2Frun%2Fnbd.sock"}},
		{"unix:@abs", []string{"nbd+unix:///?socket=%00abs", "nbds+unix:///x?socket=%00abs"}},
	}
	for _, g := range groups {
		for _, s := range g.spellings {
			u, err := ParseURI(s)
			if err != nil {
				t.Errorf("ParseURI(%q): %v", s, err)
				continue
			}
			if got := u.ServerKey(); got != g.want {
				t.Errorf("ServerKey(%q) = %q, want %q", s, got, g.want)
			}
		}
	}
	// Different servers stay apart.
	distinct := []string{"nbd://127.0.0.1", "nbd://127.0.0.2", "nbd://127.0.0.1:10810", "nbd://[::1]", "nbd://localhost",
		"nbd://a.example", "nbd://b.example", "nbd+unix:///?socket=/run/a", "nbd+unix:///?socket=run/a", "nbd+unix:///?socket=%00run/a",
		"nbd://256.1", "nbd://1.2.3.4.5"}
	seen := map[string]string{}
	for _, s := range distinct {
		k := mustParse(t, s).ServerKey()
		if o, dup := seen[k]; dup {
			t.Errorf("%q and %q share ServerKey %q", s, o, k)
		}
		seen[k] = s
	}
}

func mustParse(t *testing.T, s string) *URI {
	t.Helper()
	u, err := ParseURI(s)
	if err != nil {
		t.Fatalf("ParseURI(%q): %v", s, err)
	}
	return u
}

func TestExportKey(t *testing.T) {
	same := []string{"nbd://h/a%20b", "nbds://H./a b", "nbd://h:10809/a%20b?tls-hostname=x"}
	for _, s := range same {
		if got, want := mustParse(t, s).ExportKey(), "tcp:h:10809\x00a b"; got != want {
			t.Errorf("ExportKey(%q) = %q, want %q", s, got, want)
		}
	}
	// Export names are case-sensitive and not normalised: the server
	// compares bytes.
	if mustParse(t, "nbd://h/A").ExportKey() == mustParse(t, "nbd://h/a").ExportKey() {
		t.Error("export names A and a share a key")
	}
	if mustParse(t, "nbd://h//a").ExportKey() == mustParse(t, "nbd://h/a").ExportKey() {
		t.Error("export names /a and a share a key")
	}
}

func TestParseInetAton(t *testing.T) {
	for s, want := range map[string]string{
		"1": "0.0.0.1", "0": "0.0.0.0", "4294967295": "255.255.255.255", "1.2": "1.0.0.2", "1.2.3": "1.2.0.3",
		"0x1.0x2.0x3.0x4": "1.2.3.4", "010.0.0.1": "8.0.0.1", "1.65535": "1.0.255.255", "1.2.65535": "1.2.255.255",
	} {
		a, ok := parseInetAton(s)
		if !ok || a.String() != want {
			t.Errorf("parseInetAton(%q) = %v, %v; want %s", s, a, ok, want)
		}
	}
	for _, s := range []string{"", "4294967296", "1.16777216", "256.1", "1.2.65536", "1.2.3.256", "08", "0x", "1..2", "a.b", "1.2.3.4.5", "0xg", "-1"} {
		if a, ok := parseInetAton(s); ok {
			t.Errorf("parseInetAton(%q) = %v, want refusal", s, a)
		}
	}
}

type fakeResolver map[string][]netip.Addr

func (f fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := f[host]; ok {
		return a, nil
	}
	return nil, errors.New("no such host " + host)
}

func TestResolveServer(t *testing.T) {
	r := fakeResolver{"localhost": {netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1"), netip.MustParseAddr("::ffff:127.0.0.1")}}
	got, err := ResolveServer(context.Background(), mustParse(t, "nbd://LocalHost.:99"), r)
	if want := []string{"tcp:127.0.0.1:99", "tcp:[::1]:99"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("ResolveServer(localhost) = %q, %v; want %q", got, err, want)
	}
	got, err = ResolveServer(context.Background(), mustParse(t, "nbd://[::ffff:127.0.0.1]:99"), r)
	if want := []string{"tcp:127.0.0.1:99"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("ResolveServer(mapped) = %q, %v; want %q", got, err, want)
	}
	if _, err := ResolveServer(context.Background(), mustParse(t, "nbd://nowhere.invalid"), r); err == nil {
		t.Error("ResolveServer of an unknown name succeeded")
	}
	// A symbolic link to a socket resolves to the socket.
	dir := t.TempDir()
	real := filepath.Join(dir, "real")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(real, "nbd.sock"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	a, _ := ResolveServer(context.Background(), mustParse(t, "nbd+unix:///?socket="+filepath.Join(dir, "link", "nbd.sock")), nil)
	b, _ := ResolveServer(context.Background(), mustParse(t, "nbd+unix:///?socket="+filepath.Join(real, "nbd.sock")), nil)
	if len(a) != 1 || !slices.Equal(a, b) {
		t.Errorf("socket via link resolves to %q, direct to %q", a, b)
	}
}

func FuzzServerKey(f *testing.F) {
	for _, s := range []string{"nbd://h/e", "nbds://[::ffff:1.2.3.4]:99/x", "nbd://0x7f.1", "nbd://A.B./e", "nbd+unix:///e?socket=/a/../b", "nbd://[fe80::1%25eth0]"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			return
		}
		k := u.ServerKey()
		// Stable under the URI's own round trip, and under the TLS choice.
		again, err := ParseURI(u.String())
		if err != nil {
			t.Fatalf("ParseURI(%q): %v", u.String(), err)
		}
		if again.ServerKey() != k {
			t.Fatalf("ServerKey(%q) = %q, of its String %q = %q", s, k, u.String(), again.ServerKey())
		}
		flip := *u
		switch u.Scheme {
		case "nbd":
			flip.Scheme = "nbds"
		case "nbds":
			flip.Scheme = "nbd"
		case "nbd+unix":
			flip.Scheme = "nbds+unix"
		case "nbds+unix":
			flip.Scheme = "nbd+unix"
		}
		if flip.ServerKey() != k {
			t.Fatalf("ServerKey changes with the scheme: %q vs %q", k, flip.ServerKey())
		}
		if !u.IsUnix() {
			if h := CanonicalHost(u.Host); CanonicalHost(h) != h {
				t.Fatalf("CanonicalHost not idempotent: %q → %q → %q", u.Host, h, CanonicalHost(h))
			}
		}
	})
}
