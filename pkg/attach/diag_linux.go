// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// The kernel never says which sockets RECONFIGURE took (it ignores those
// beyond its dead slots and still reports success). sock_diag is the
// authority asked instead: a socket the kernel holds outlives every
// descriptor of this process, one it ignored does not (a unix socket is
// freed, a TCP socket is orphaned — no inode — and closes).

// sockID identifies a socket for sock_diag.
type sockID struct {
	family int // unix.AF_UNIX, AF_INET or AF_INET6
	inode  uint64
	// TCP only: the connection's addresses.
	local, remote netip.AddrPort
}

func (id sockID) tcp() bool { return id.family == unix.AF_INET || id.family == unix.AF_INET6 }

func (id sockID) String() string {
	if id.tcp() {
		return fmt.Sprintf("tcp %s->%s (inode %d)", id.local, id.remote, id.inode)
	}
	return fmt.Sprintf("unix socket inode %d", id.inode)
}

// identify returns the sock_diag identity of a connected socket.
func identify(f *os.File) (sockID, error) {
	var id sockID
	rc, err := f.SyscallConn()
	if err != nil {
		return id, err
	}
	var ierr error
	err = rc.Control(func(fd uintptr) {
		var st unix.Stat_t
		if ierr = unix.Fstat(int(fd), &st); ierr != nil {
			return
		}
		id.inode = st.Ino
		id.family, ierr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
		if ierr != nil || id.family == unix.AF_UNIX {
			return
		}
		var la, ra unix.Sockaddr
		if la, ierr = unix.Getsockname(int(fd)); ierr != nil {
			return
		}
		if ra, ierr = unix.Getpeername(int(fd)); ierr != nil {
			return
		}
		id.local, id.remote = addrPort(la), addrPort(ra)
	})
	if err == nil {
		err = ierr
	}
	if err != nil {
		return id, fmt.Errorf("identify socket: %w", err)
	}
	if id.family != unix.AF_UNIX && !id.tcp() {
		return id, fmt.Errorf("identify socket: unsupported family %d", id.family)
	}
	return id, nil
}

func addrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return netip.AddrPort{}
}

// errDiag marks a sock_diag failure (not an answer).
var errDiag = errors.New("sock_diag")

// sockState is what sock_diag says of a socket.
type sockState struct {
	// held: some descriptor still refers to the socket. After this
	// process closed all of its own, that descriptor is the kernel's.
	held bool
	// live: held, and a TCP connection still established or a unix
	// socket not shut down in both directions.
	live bool
	// cookie identifies the socket for SOCK_DESTROY (TCP).
	cookie [2]uint32
}

const (
	sockDiagByFamily = 20
	sockDestroy      = 21
	tcpEstablished   = 1
	inetDiagNoCookie = ^uint32(0)
)

// diagLookup asks sock_diag about id.
func diagLookup(id sockID) (sockState, error) {
	var req []byte
	if id.tcp() {
		req = inetDiagReq(id, [2]uint32{inetDiagNoCookie, inetDiagNoCookie})
	} else {
		// struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
		req = make([]byte, 24)
		req[0] = unix.AF_UNIX
		binary.NativeEndian.PutUint32(req[4:], ^uint32(0))
		binary.NativeEndian.PutUint32(req[8:], uint32(id.inode))
		binary.NativeEndian.PutUint32(req[16:], inetDiagNoCookie)
		binary.NativeEndian.PutUint32(req[20:], inetDiagNoCookie)
	}
	msg, err := diagRoundTrip(sockDiagByFamily, req)
	if errors.Is(err, unix.ENOENT) {
		return sockState{}, nil
	}
	if err != nil {
		return sockState{}, err
	}
	if id.tcp() {
		// struct inet_diag_msg: family, state, timer, retrans, id (48),
		// expires, rqueue, wqueue, uid, inode.
		if len(msg) < 72 {
			return sockState{}, fmt.Errorf("%w: short inet_diag reply (%d bytes)", errDiag, len(msg))
		}
		inode := binary.NativeEndian.Uint32(msg[68:])
		var st sockState
		st.cookie[0] = binary.NativeEndian.Uint32(msg[44:])
		st.cookie[1] = binary.NativeEndian.Uint32(msg[48:])
		// An orphaned socket (every descriptor closed) has no inode.
		st.held = inode != 0 && uint64(inode) == id.inode
		st.live = st.held && msg[1] == tcpEstablished
		return st, nil
	}
	// struct unix_diag_msg: family, type, state, pad, ino, cookie[2]
	if len(msg) < 16 {
		return sockState{}, fmt.Errorf("%w: short unix_diag reply (%d bytes)", errDiag, len(msg))
	}
	ino := binary.NativeEndian.Uint32(msg[4:])
	st := sockState{held: uint64(ino) == id.inode}
	// Attributes follow; UNIX_DIAG_SHUTDOWN (6) is always there. Both
	// directions shut down: the kernel declared the connection dead, or
	// the peer closed it.
	shutdown := -1
	for b := msg[16:]; len(b) >= 4; {
		l := int(binary.NativeEndian.Uint16(b[0:]))
		if l < 4 || l > len(b) {
			break
		}
		if binary.NativeEndian.Uint16(b[2:]) == 6 && l >= 5 {
			shutdown = int(b[4])
		}
		b = b[min(len(b), (l+3)&^3):]
	}
	st.live = st.held && shutdown >= 0 && shutdown&3 != 3
	return st, nil
}

// diagDestroy ends a TCP connection held by anyone, the kernel included
// (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY, CAP_NET_ADMIN): the holder sees
// ECONNABORTED, for the nbd driver a dead connection.
func diagDestroy(id sockID, cookie [2]uint32) error {
	if !id.tcp() {
		return fmt.Errorf("%w: only TCP sockets can be destroyed", errDiag)
	}
	_, err := diagRoundTrip(sockDestroy, inetDiagReq(id, cookie))
	return err
}

// inetDiagReq encodes struct inet_diag_req_v2 for one TCP connection.
func inetDiagReq(id sockID, cookie [2]uint32) []byte {
	req := make([]byte, 56)
	req[0] = byte(id.family)
	req[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(req[4:], ^uint32(0)) // every state
	// struct inet_diag_sockid: sport, dport (big endian), src[4], dst[4], if, cookie[2]
	binary.BigEndian.PutUint16(req[8:], id.local.Port())
	binary.BigEndian.PutUint16(req[10:], id.remote.Port())
	putAddr(req[12:28], id.local.Addr())
	putAddr(req[28:44], id.remote.Addr())
	binary.NativeEndian.PutUint32(req[48:], cookie[0])
	binary.NativeEndian.PutUint32(req[52:], cookie[1])
	return req
}

func putAddr(b []byte, a netip.Addr) {
	if a.Is4() {
		v := a.As4()
		copy(b, v[:])
		return
	}
	v := a.As16()
	copy(b, v[:])
}

// diagRoundTrip sends one sock_diag request and returns the payload of its
// answer; an NLMSG_ERROR answer becomes its errno.
func diagRoundTrip(typ uint16, payload []byte) ([]byte, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errDiag, err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 5}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	msg := make([]byte, unix.NLMSG_HDRLEN+len(payload))
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	flags := uint16(unix.NLM_F_REQUEST)
	if typ == sockDestroy {
		flags |= unix.NLM_F_ACK
	}
	binary.NativeEndian.PutUint16(msg[6:], flags)
	binary.NativeEndian.PutUint32(msg[8:], 1)
	copy(msg[unix.NLMSG_HDRLEN:], payload)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("%w: send: %w", errDiag, err)
	}
	buf := make([]byte, 8192)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: receive: %w", errDiag, err)
	}
	buf = buf[:n]
	if len(buf) < unix.NLMSG_HDRLEN {
		return nil, fmt.Errorf("%w: short reply", errDiag)
	}
	l := binary.NativeEndian.Uint32(buf[0:])
	if l < unix.NLMSG_HDRLEN || int(l) > len(buf) {
		return nil, fmt.Errorf("%w: bad reply length %d", errDiag, l)
	}
	body := buf[unix.NLMSG_HDRLEN:l]
	if binary.NativeEndian.Uint16(buf[4:]) == unix.NLMSG_ERROR {
		if len(body) < 4 {
			return nil, fmt.Errorf("%w: short error reply", errDiag)
		}
		if e := int32(binary.NativeEndian.Uint32(body)); e != 0 {
			return nil, unix.Errno(-e)
		}
		return nil, nil
	}
	return body, nil
}

// diagProbe reports whether sock_diag answers for unix and for TCP sockets.
// A family whose handler is not loaded (unix_diag, inet_diag + tcp_diag)
// answers ENOENT exactly like a socket that does not exist, so each is
// asked about a socket known to exist and to be open.
func diagProbe() (unixOK, tcpOK bool) { return diagProbeUnix(), diagProbeTCP() }

// diagProbeUnix is diagProbe for unix sockets.
func diagProbeUnix() (unixOK bool) {
	if fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err == nil {
		a, b := os.NewFile(uintptr(fds[0]), "probe"), os.NewFile(uintptr(fds[1]), "probe")
		if id, err := identify(a); err == nil {
			st, err := diagLookup(id)
			unixOK = err == nil && st.held && st.live
		}
		a.Close()
		b.Close()
	}
	return unixOK
}

// diagProbeTCP is diagProbe for TCP sockets (a loopback listener and a
// connection to it).
func diagProbeTCP() (tcpOK bool) {
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		c, err := net.Dial("tcp", l.Addr().String())
		if err == nil {
			if f, err := c.(*net.TCPConn).File(); err == nil {
				if id, err := identify(f); err == nil {
					st, err := diagLookup(id)
					tcpOK = err == nil && st.held && st.live
				}
				f.Close()
			}
			c.Close()
		}
		l.Close()
		break
	}
	return tcpOK
}
