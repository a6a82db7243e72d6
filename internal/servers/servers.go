// SPDX-License-Identifier: Apache-2.0

// Package servers starts real NBD servers (nbdkit, qemu-nbd, nbd-server) for
// tests. Each server listens on a unix socket in a private temporary
// directory or on a free TCP port of 127.0.0.1, is ready (it has sent the
// NBD greeting to a probe connection) when the constructor returns, and is
// stopped, with every process it started, when the test ends.
//
//	s := servers.Nbdkit(t, servers.Unix, "memory", "size=1M")
//	c, err := nbd.Dial(ctx, mustParse(s.URI("")))
//	s.Kill()  // crash it under the connection (SIGKILL) …
//	s.Start() // … and bring it back on the same address
//
// Stop, Kill, Start and Restart must be called from the goroutine of the
// test that created the server (they may fail it). GenerateCerts makes the
// TLS material the servers and the client need.
//
// A missing server binary skips the test, unless the environment variable
// NBDCSI_REQUIRE_SERVERS is 1 (CI sets it), which turns the skip into a
// failure so that CI never passes by skipping.
package servers

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RequireEnv names the environment variable that, set to 1, makes a missing
// server binary a test failure instead of a skip.
const RequireEnv = "NBDCSI_REQUIRE_SERVERS"

// Timeouts. They bound every wait, so a broken server fails the test
// instead of hanging it.
const (
	// ReadyTimeout bounds the wait for a started server to greet.
	ReadyTimeout = 60 * time.Second
	// stopGrace is how long a server has to exit after SIGTERM before it
	// gets SIGKILL (nbdkit waits for connected clients).
	stopGrace = 2 * time.Second
	// pollInterval is the pause between readiness and exit checks.
	pollInterval = 10 * time.Millisecond
)

// errExitedEarly means the server exited before accepting connections.
var errExitedEarly = errors.New("exited before accepting connections")

// Listen selects the transport a server listens on.
type Listen int

const (
	// Unix listens on a unix socket in a private temporary directory.
	Unix Listen = iota
	// TCP listens on a free port of 127.0.0.1.
	TCP
)

// String returns "unix" or "tcp".
func (l Listen) String() string {
	if l == TCP {
		return "tcp"
	}
	return "unix"
}

// LookPath returns the path of a server binary. When it is missing the test
// is skipped, or fails when NBDCSI_REQUIRE_SERVERS=1.
func LookPath(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("%s not installed (%v), and %s=1 forbids skipping", name, err, RequireEnv)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
	return p
}

// Server is a running NBD server. Its address stays the same across
// Restart, so a client can reconnect to it.
type Server struct {
	// Name is the program ("nbdkit", "qemu-nbd", "nbd-server").
	Name string
	// Listen is the transport.
	Listen Listen
	// Socket is the unix socket path (Listen == Unix).
	Socket string
	// Port is the TCP port on 127.0.0.1 (Listen == TCP).
	Port int

	t testing.TB
	// argv builds the command line for the current address.
	argv func(s *Server) []string
	// daemon means the started command exits after forking the server,
	// whose PID is then read from pidFile.
	daemon  bool
	pidFile string
	// wrapped means the started command is a Wrapper around the server.
	wrapped bool

	mu      sync.Mutex
	running bool
	pgid    int
	exited  chan struct{} // closed when the started command has been reaped
	log     *syncBuffer
	// watchdog kills a daemon's process group when this test process
	// dies without running its cleanups (see startWatchdog).
	watchdog     *exec.Cmd
	watchdogDone chan struct{}
}

// syncBuffer collects a server's output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// start creates a Server, picks its address and starts it; for TCP a port
// that turned out to be taken is replaced by another (up to 3 tries).
func start(t testing.TB, name string, listen Listen, w Wrapper, daemon bool, argv func(*Server) []string) *Server {
	t.Helper()
	s := &Server{Name: name, Listen: listen, t: t, argv: argv, daemon: daemon, wrapped: w != nil, log: &syncBuffer{}}
	dir := shortTempDir(t)
	s.pidFile = filepath.Join(dir, "pid")
	if listen == Unix {
		s.Socket = filepath.Join(dir, "sock")
	}
	t.Cleanup(func() {
		if err := s.stop(); err != nil {
			t.Errorf("stop %s: %v", name, err)
		}
		if t.Failed() {
			if out := s.log.String(); out != "" {
				t.Logf("%s output:\n%s", name, out)
			}
		}
	})
	var err error
	for try := 0; try < 3; try++ {
		if listen == TCP {
			if s.Port, err = FreePort(); err != nil {
				t.Fatalf("find a free port: %v", err)
			}
		}
		if err = s.launch(); err == nil {
			return s
		}
		// Another process may have taken the port between freePort
		// and the server's bind; nbd-server logs only to syslog, so
		// any early exit on TCP is retried with a new port.
		if listen != TCP || !errors.Is(err, errExitedEarly) {
			break
		}
	}
	t.Fatalf("start %s: %v\n%s", name, err, s.log.String())
	return nil
}

// shortTempDir returns a private directory removed at cleanup. It is not
// under t.TempDir() because unix socket paths are limited to 107 bytes and
// test names can be long.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdsrv")
	if err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// FreePort returns a TCP port of 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// launch starts the server process and waits until it greets.
func (s *Server) launch() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Listen == Unix {
		// A socket left by the previous run (nbdkit does not remove
		// it) would make the bind fail.
		_ = os.Remove(s.Socket)
	}
	_ = os.Remove(s.pidFile)
	args := s.argv(s)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = s.log, s.log
	// Own process group, so that Stop reaches every process the server
	// forks; SIGKILL if this test process dies first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(s.log, "+ %s\n", strings.Join(args, " "))
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	s.exited, s.pgid, s.running = exited, cmd.Process.Pid, true

	deadline := time.Now().Add(ReadyTimeout)
	if s.daemon {
		// The command forks the daemon (a new session, so its own
		// process group) and exits; the daemon writes its PID.
		pid, err := s.readPIDFile(exited, &waitErr, deadline)
		if err != nil {
			s.killGroupLocked()
			return err
		}
		s.pgid = pid
		if err := s.startWatchdog(); err != nil {
			s.killGroupLocked()
			return err
		}
	}
	for {
		if s.greets() {
			return nil
		}
		select {
		case <-exited:
			if !s.daemon {
				s.running = false
				return fmt.Errorf("%w: %s: %v", errExitedEarly, s.Name, waitErr)
			}
		default:
		}
		if s.daemon && !groupAlive(s.pgid) {
			s.running = false
			return fmt.Errorf("%w: %s daemon (pid %d; it logs to syslog)", errExitedEarly, s.Name, s.pgid)
		}
		if time.Now().After(deadline) {
			s.killGroupLocked()
			return fmt.Errorf("%s did not accept connections within %v", s.Name, ReadyTimeout)
		}
		time.Sleep(pollInterval)
	}
}

// readPIDFile waits for a daemon's PID file. A launcher that exits with an
// error (bad configuration) ends the wait at once.
func (s *Server) readPIDFile(exited <-chan struct{}, waitErr *error, deadline time.Time) (int, error) {
	for {
		b, err := os.ReadFile(s.pidFile)
		if err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
				return pid, nil
			}
		}
		select {
		case <-exited:
			if *waitErr != nil {
				return 0, fmt.Errorf("%w: %s: %v", errExitedEarly, s.Name, *waitErr)
			}
		default:
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%s wrote no PID file within %v", s.Name, ReadyTimeout)
		}
		time.Sleep(pollInterval)
	}
}

// greets reports whether a connection to the server receives the NBD
// greeting ("NBDMAGIC"), which every handshake style starts with.
func (s *Server) greets() bool {
	c, err := net.DialTimeout(s.Network(), s.Address(), time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	var b [8]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return false
	}
	return string(b[:]) == "NBDMAGIC"
}

// Network returns "unix" or "tcp".
func (s *Server) Network() string {
	if s.Listen == TCP {
		return "tcp"
	}
	return "unix"
}

// Address returns the socket path or "127.0.0.1:PORT".
func (s *Server) Address() string {
	if s.Listen == TCP {
		return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port))
	}
	return s.Socket
}

// URI returns the plaintext NBD URI of an export (nbd:// or nbd+unix://).
func (s *Server) URI(export string) string { return s.uri(export, false) }

// TLSURI returns the TLS URI of an export (nbds:// or nbds+unix://). Unix
// URIs name "localhost" with tls-hostname, which the generated server
// certificate carries.
func (s *Server) TLSURI(export string) string { return s.uri(export, true) }

func (s *Server) uri(export string, tls bool) string {
	u := url.URL{Scheme: "nbd", Path: "/" + export}
	if tls {
		u.Scheme = "nbds"
	}
	if s.Listen == TCP {
		u.Host = s.Address()
		return u.String()
	}
	u.Scheme += "+unix"
	q := url.Values{"socket": {s.Socket}}
	if tls {
		q.Set("tls-hostname", "localhost")
	}
	u.RawQuery = strings.ReplaceAll(q.Encode(), "%2F", "/")
	return u.String()
}

// PID returns the process ID of the server (of the daemon for nbd-server).
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pgid
}

// Log returns what the server printed so far.
func (s *Server) Log() string { return s.log.String() }

// Stop stops the server and every process in its group and waits for them
// to be gone. It fails the test if that does not happen.
func (s *Server) Stop() {
	s.t.Helper()
	if err := s.stop(); err != nil {
		s.t.Fatalf("stop %s: %v", s.Name, err)
	}
}

// Restart stops the server (as Stop) and starts it again on the same
// address.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.Start()
}

// Kill kills the server and its process group with SIGKILL at once, as a
// crash would, and waits for them to be gone. Start brings it back.
func (s *Server) Kill() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running {
		return
	}
	if s.wrapped {
		s.t.Fatalf("kill %s: a wrapped server is stopped through its wrapper (Terminate)", s.Name)
	}
	s.running = false
	s.stopWatchdog()
	_ = syscall.Kill(-s.pgid, syscall.SIGKILL)
	if !waitGroupGone(s.pgid, s.exited, s.daemon, stopGrace) {
		s.t.Fatalf("kill %s: process group %d still alive after SIGKILL", s.Name, s.pgid)
	}
}

// Start starts a stopped or killed server again on the same address and
// waits until it accepts connections.
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	running := s.running
	s.mu.Unlock()
	if running {
		s.t.Fatalf("start %s: already running", s.Name)
	}
	if err := s.launch(); err != nil {
		s.t.Fatalf("start %s: %v\n%s", s.Name, err, s.log.String())
	}
}

func (s *Server) stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running {
		return nil
	}
	return s.killGroupLocked()
}

// Termination is what Terminate observed.
type Termination struct {
	// Exited is how long the process group took to be gone after SIGTERM.
	Exited time.Duration
	// Killed tells whether SIGKILL was needed after the grace period.
	Killed bool
	// Rebindable is how long after SIGTERM the address could be bound
	// again (TCP, with SO_REUSEADDR as servers set it), or -1 if it could
	// not be before the group was gone. Zero for unix sockets.
	Rebindable time.Duration
}

// Terminate stops the server the way Kubernetes and systemd stop a
// service: SIGTERM to the process group (the wrapper's group when wrapped;
// a wrapper keeps the server in a group of its own), then SIGKILL when the
// group is not gone after grace. It fails the test if the group survives
// SIGKILL. Start brings the server back.
func (s *Server) Terminate(grace time.Duration) Termination {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running {
		s.t.Fatalf("terminate %s: not running", s.Name)
	}
	s.running = false
	s.stopWatchdog()
	pgid := s.pgid
	var r Termination
	if s.Listen == TCP {
		r.Rebindable = -1
	}
	start := time.Now()
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	deadline := start.Add(grace)
	for {
		if r.Rebindable < 0 && s.canBind() {
			r.Rebindable = time.Since(start)
		}
		if waitGroupGone(pgid, s.exited, s.daemon, 0) {
			r.Exited = time.Since(start)
			return r
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(pollInterval)
	}
	r.Killed = true
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	if !waitGroupGone(pgid, s.exited, s.daemon, stopGrace) {
		s.t.Fatalf("terminate %s: process group %d still alive after SIGKILL", s.Name, pgid)
	}
	r.Exited = time.Since(start)
	return r
}

// canBind reports whether a listener can be bound on the server's TCP
// address right now (Go sets SO_REUSEADDR, as the servers do).
func (s *Server) canBind() bool {
	l, err := net.Listen("tcp", s.Address())
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

// SparseFile creates path as a sparse file of size bytes (a server's backing
// file, or a stand-in device) and returns it.
func SparseFile(t testing.TB, path string, size int64) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}
