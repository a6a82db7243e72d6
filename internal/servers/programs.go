// SPDX-License-Identifier: Apache-2.0

package servers

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Wrapper is a supervisor command a server runs under: the server's command
// line is appended to it, e.g. Wrapper{"/bin/nbd-csi", "run-server", "--"}.
// The wrapper runs in the foreground and must stop the server, and every
// process the server started, when it gets SIGTERM; Kill refuses a wrapped
// server (SIGKILL would orphan a daemon the wrapper adopted).
type Wrapper []string

// Nbdkit starts "nbdkit --exit-with-parent -f ARGS..." listening on listen.
// args are nbdkit options, the plugin and its parameters, e.g.
//
//	Nbdkit(t, servers.Unix, "--no-sr", "memory", "size=1M")
func Nbdkit(t testing.TB, listen Listen, args ...string) *Server {
	t.Helper()
	return Wrapper(nil).Nbdkit(t, listen, args...)
}

// QemuNBD starts qemu-nbd with no wrapper (see Wrapper.QemuNBD).
func QemuNBD(t testing.TB, listen Listen, args ...string) *Server {
	t.Helper()
	return Wrapper(nil).QemuNBD(t, listen, args...)
}

// NBDServer starts nbd-server with no wrapper (see Wrapper.NBDServer).
func NBDServer(t testing.TB, listen Listen, exports string, generic ...string) *Server {
	t.Helper()
	return Wrapper(nil).NBDServer(t, listen, exports, generic...)
}

// argv prepends the wrapper to a server's command line.
func (w Wrapper) argv(server []string) []string {
	return append(append([]string(nil), w...), server...)
}

// Nbdkit starts nbdkit (see the function Nbdkit) under the wrapper.
func (w Wrapper) Nbdkit(t testing.TB, listen Listen, args ...string) *Server {
	t.Helper()
	bin := LookPath(t, "nbdkit")
	return start(t, "nbdkit", listen, w, false, func(s *Server) []string {
		argv := []string{bin, "--exit-with-parent", "--foreground"}
		if listen == TCP {
			argv = append(argv, "--ipaddr", "127.0.0.1", "--port", strconv.Itoa(s.Port))
		} else {
			argv = append(argv, "--unix", s.Socket)
		}
		return w.argv(append(argv, args...))
	})
}

// QemuNBD starts "qemu-nbd --persistent --shared=0 ARGS..." listening on
// listen: it keeps serving after a client leaves and takes any number of
// clients. args are qemu-nbd options and the image, e.g.
//
//	QemuNBD(t, servers.TCP, "-x", "disk", "-f", "qcow2", path)
func (w Wrapper) QemuNBD(t testing.TB, listen Listen, args ...string) *Server {
	t.Helper()
	bin := LookPath(t, "qemu-nbd")
	return start(t, "qemu-nbd", listen, w, false, func(s *Server) []string {
		argv := []string{bin, "--persistent", "--shared=0"}
		if listen == TCP {
			argv = append(argv, "--bind=127.0.0.1", "--port="+strconv.Itoa(s.Port))
		} else {
			argv = append(argv, "--socket="+s.Socket)
		}
		return w.argv(append(argv, args...))
	})
}

// NBDServer starts nbd-server with a configuration file made of a [generic]
// section and exports, the export sections as nbd-server(5) describes them
// ("[name]\nexportname = /abs/path\n…"). The [generic] section is written
// here: the listen address (port and listenaddr 127.0.0.1, or unixsock),
// allowlist = true, then the lines in generic (e.g. TLS settings).
//
// nbd-server 3.24 always daemonizes (its -d serves a single session), so
// the daemon is tracked through its PID file and a watchdog process kills
// it should the test binary die without cleaning up. Under a wrapper, the
// wrapper is the process tracked (it must adopt and stop the daemon).
func (w Wrapper) NBDServer(t testing.TB, listen Listen, exports string, generic ...string) *Server {
	t.Helper()
	bin := LookPath(t, "nbd-server")
	dir := shortTempDir(t)
	conf := filepath.Join(dir, "config")
	return start(t, "nbd-server", listen, w, w == nil, func(s *Server) []string {
		var b strings.Builder
		b.WriteString("[generic]\n")
		if listen == TCP {
			fmt.Fprintf(&b, "port = %d\nlistenaddr = 127.0.0.1\n", s.Port)
		} else {
			fmt.Fprintf(&b, "unixsock = %s\n", s.Socket)
		}
		b.WriteString("allowlist = true\n")
		for _, g := range generic {
			b.WriteString(g + "\n")
		}
		b.WriteString(exports)
		if err := os.WriteFile(conf, []byte(b.String()), 0o600); err != nil {
			t.Fatalf("write nbd-server config: %v", err)
		}
		return w.argv([]string{bin, "-C", conf, "-p", s.pidFile})
	})
}
