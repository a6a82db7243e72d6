// SPDX-License-Identifier: Apache-2.0

package servers

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// greeting reads the 8-byte greeting from the server.
func greeting(t *testing.T, s *Server) string {
	t.Helper()
	c, err := net.DialTimeout(s.Network(), s.Address(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", s.Address(), err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 8)
	if _, err := c.Read(b); err != nil {
		t.Fatalf("read greeting: %v", err)
	}
	return string(b)
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil && groupAlive(pid) }

func TestServersLifecycle(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		start func(t *testing.T, l Listen) *Server
	}{
		{"nbdkit", func(t *testing.T, l Listen) *Server { return Nbdkit(t, l, "memory", "size=1M") }},
		{"qemu-nbd", func(t *testing.T, l Listen) *Server { return QemuNBD(t, l, "-f", "raw", img) }},
		{"nbd-server", func(t *testing.T, l Listen) *Server {
			return NBDServer(t, l, "[disk]\nexportname = "+img+"\n")
		}},
	}
	for _, tc := range tests {
		for _, l := range []Listen{Unix, TCP} {
			t.Run(tc.name+"/"+l.String(), func(t *testing.T) {
				s := tc.start(t, l)
				if g := greeting(t, s); g != "NBDMAGIC" {
					t.Fatalf("greeting %q, want NBDMAGIC", g)
				}
				addr, pid := s.Address(), s.PID()
				s.Restart()
				if s.Address() != addr {
					t.Errorf("address changed across Restart: %s → %s", addr, s.Address())
				}
				if s.PID() == pid {
					t.Errorf("PID %d unchanged across Restart", pid)
				}
				if alive(pid) {
					t.Errorf("old server %d still alive after Restart", pid)
				}
				if g := greeting(t, s); g != "NBDMAGIC" {
					t.Fatalf("greeting after restart %q", g)
				}
				pid = s.PID()
				s.Kill()
				if alive(pid) {
					t.Errorf("server %d alive after Kill", pid)
				}
				s.Start()
				if s.Address() != addr || greeting(t, s) != "NBDMAGIC" {
					t.Errorf("server did not come back on %s after Kill and Start", addr)
				}
				pid = s.PID()
				s.Stop()
				if alive(pid) {
					t.Errorf("server %d alive after Stop", pid)
				}
				if c, err := net.DialTimeout(s.Network(), s.Address(), time.Second); err == nil {
					c.Close()
					t.Errorf("%s still accepts connections after Stop", s.Address())
				}
				s.Stop() // idempotent
			})
		}
	}
}

func TestServersURI(t *testing.T) {
	s := &Server{Listen: Unix, Socket: "/tmp/x/sock"}
	if got, want := s.URI("a b"), "nbd+unix:///a%20b?socket=/tmp/x/sock"; got != want {
		t.Errorf("URI = %q, want %q", got, want)
	}
	if got, want := s.TLSURI(""), "nbds+unix:///?socket=/tmp/x/sock&tls-hostname=localhost"; got != want {
		t.Errorf("TLSURI = %q, want %q", got, want)
	}
	s = &Server{Listen: TCP, Port: 1234}
	if got, want := s.TLSURI("e"), "nbds://127.0.0.1:1234/e"; got != want {
		t.Errorf("TLSURI = %q, want %q", got, want)
	}
}

func TestGenerateCerts(t *testing.T) {
	c := GenerateCerts(t)
	for _, f := range []string{"ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem",
		"client/ca-cert.pem", "client/client-cert.pem", "client/client-key.pem", "ca-only/ca-cert.pem"} {
		if _, err := os.Stat(filepath.Join(c.Dir, f)); err != nil {
			t.Errorf("missing %s: %v", f, err)
		}
	}
	caPEM, err := os.ReadFile(c.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("CA file holds no certificate")
	}
	srv, err := tls.LoadX509KeyPair(c.ServerCertFile, c.ServerKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := tls.LoadX509KeyPair(c.ClientCertFile, c.ClientKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	sc, _ := x509.ParseCertificate(srv.Certificate[0])
	for _, h := range []string{"127.0.0.1", "::1", "localhost"} {
		if _, err := sc.Verify(x509.VerifyOptions{Roots: pool, DNSName: h}); err != nil {
			t.Errorf("server certificate for %s: %v", h, err)
		}
	}
	cc, _ := x509.ParseCertificate(cli.Certificate[0])
	if _, err := cc.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client certificate: %v", err)
	}
	other := GenerateCerts(t)
	otherPEM, _ := os.ReadFile(other.CAFile)
	if string(otherPEM) == string(caPEM) {
		t.Error("two GenerateCerts calls returned the same CA")
	}
}

// TestLookPathMissing checks that a missing binary skips the test when
// NBDCSI_REQUIRE_SERVERS is not 1. It clears the variable itself, so it also
// runs (instead of skipping) under make test, which sets it.
func TestLookPathMissing(t *testing.T) {
	t.Setenv(RequireEnv, "")
	var skipped bool
	t.Run("missing", func(t *testing.T) {
		defer func() { skipped = t.Skipped() }()
		LookPath(t, "no-such-nbd-server-binary")
	})
	if !skipped {
		t.Error("a missing binary did not skip the test")
	}
}

// TestServersDieWithTestBinary runs a server in a child test process, kills
// that process with SIGKILL (no cleanups run) and checks that the server
// goes too: Pdeathsig for foreground servers, the watchdog for nbd-server.
func TestServersDieWithTestBinary(t *testing.T) {
	if os.Getenv("NBDCSI_SERVERS_CHILD") != "" {
		return
	}
	for _, name := range []string{"nbdkit", "qemu-nbd", "nbd-server"} {
		t.Run(name, func(t *testing.T) {
			LookPath(t, name)
			cmd := exec.Command(os.Args[0], "-test.run=^TestServersChild$", "-test.v")
			// The child's temporary directories, which it cannot
			// remove once killed, go under this test's.
			cmd.Env = append(os.Environ(), "NBDCSI_SERVERS_CHILD="+name, "TMPDIR="+t.TempDir())
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
			pid := 0
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if v, ok := strings.CutPrefix(sc.Text(), "SERVER-PID "); ok {
					pid, _ = strconv.Atoi(v)
					break
				}
			}
			if pid == 0 {
				t.Fatal("child printed no server PID")
			}
			if !alive(pid) {
				t.Fatalf("server %d not running in the child", pid)
			}
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			deadline := time.Now().Add(10 * time.Second)
			for alive(pid) {
				if time.Now().After(deadline) {
					_ = syscall.Kill(-pid, syscall.SIGKILL)
					t.Fatalf("server %d outlived the killed test binary", pid)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// TestServersChild is the child half of TestServersDieWithTestBinary.
func TestServersChild(t *testing.T) {
	name := os.Getenv("NBDCSI_SERVERS_CHILD")
	if name == "" {
		t.Skip("only run as a child of TestServersDieWithTestBinary")
	}
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	var s *Server
	switch name {
	case "nbdkit":
		s = Nbdkit(t, Unix, "memory", "size=1M")
	case "qemu-nbd":
		s = QemuNBD(t, Unix, "-f", "raw", img)
	default:
		s = NBDServer(t, Unix, "[disk]\nexportname = "+img+"\n")
	}
	fmt.Printf("SERVER-PID %d\n", s.PID())
	time.Sleep(time.Minute)
}

// fatalRecorder records Fatalf instead of failing the test.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (r *fatalRecorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// TestServersStartFailsFast checks that a server that cannot start fails
// the test quickly, with its output, instead of waiting for ReadyTimeout.
func TestServersStartFailsFast(t *testing.T) {
	for name, start := range map[string]func(t testing.TB){
		"nbdkit":     func(t testing.TB) { Nbdkit(t, Unix, "no-such-plugin") },
		"qemu-nbd":   func(t testing.TB) { QemuNBD(t, TCP, "-f", "raw", "/nonexistent/disk.img") },
		"nbd-server": func(t testing.TB) { NBDServer(t, TCP, "") },
	} {
		t.Run(name, func(t *testing.T) {
			LookPath(t, name)
			r := &fatalRecorder{TB: t}
			begin := time.Now()
			done := make(chan struct{})
			go func() { defer close(done); start(r) }()
			<-done
			if !strings.Contains(r.msg, "exited before accepting connections") {
				t.Errorf("start failure message = %q", r.msg)
			}
			if d := time.Since(begin); d > ReadyTimeout/2 {
				t.Errorf("failing start took %v", d)
			}
		})
	}
}
