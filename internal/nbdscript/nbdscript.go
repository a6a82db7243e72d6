// SPDX-License-Identifier: Apache-2.0

// Package nbdscript is a scripted, possibly hostile NBD server for tests: a
// fixed-newstyle handshake written from the spec (independently of
// pkg/nbd), whose answers a Script decides — huge listings, long or
// control-character-laden names and descriptions, floods of information
// replies, error texts. It serves the handshake only; a client that enters
// transmission is disconnected.
package nbdscript

import (
	"encoding/binary"
	"io"
	"net"
	"sync"
	"testing"
)

// Protocol constants (NBD doc/proto.md), kept here so that the server does
// not share code with the client under test.
const (
	magicInit     = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt      = 0x49484156454f5054 // "IHAVEOPT"
	magicRep      = 0x3e889045565a9
	flagFixed     = 1
	flagNoZeroes  = 2
	optExportName = 1
	optAbort      = 2
	optList       = 3
	optInfo       = 6
	optGo         = 7
	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repErrUnsup   = 1<<31 + 1
	repErrPolicy  = 1<<31 + 2
	infoExport    = 0
	infoDesc      = 2
	maxOptionData = 1 << 16
)

// Script decides the server's answers.
type Script struct {
	// ListCount exports are listed by NBD_OPT_LIST; Name and Description
	// give entry i (generated on the fly, so a huge listing costs the
	// server nothing). Nil Description means none.
	ListCount   int
	Name        func(i int) string
	Description func(i int) string
	// Size and Flags answer NBD_OPT_INFO and NBD_OPT_GO (NBD_INFO_EXPORT);
	// InfoDescription, if set, is sent as NBD_INFO_DESCRIPTION.
	Size            uint64
	Flags           uint16
	InfoDescription string
	// UnknownInfos extra NBD_REP_INFO replies of an unknown type precede
	// the ACK to NBD_OPT_INFO and NBD_OPT_GO.
	UnknownInfos int
	// RefuseMessage, if set, refuses NBD_OPT_INFO and NBD_OPT_GO with
	// NBD_REP_ERR_POLICY carrying this text.
	RefuseMessage string
}

// Server is a running scripted server.
type Server struct {
	l  net.Listener
	wg sync.WaitGroup
}

// Start serves s on a loopback TCP port until the test ends.
func Start(t testing.TB, s Script) *Server {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &Server{l: l}
	srv.wg.Add(1)
	go func() {
		defer srv.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			srv.wg.Add(1)
			go func() {
				defer srv.wg.Done()
				defer c.Close()
				_ = serve(c, &s)
			}()
		}
	}()
	t.Cleanup(srv.Close)
	return srv
}

// URI is the server's nbd:// URI for export.
func (s *Server) URI(export string) string {
	return "nbd://" + s.l.Addr().String() + "/" + export
}

// Close stops accepting and waits for the connections to end.
func (s *Server) Close() {
	_ = s.l.Close()
	s.wg.Wait()
}

var be = binary.BigEndian

type conn struct {
	rw io.ReadWriter
}

func (c conn) reply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20+len(data))
	be.PutUint64(b, magicRep)
	be.PutUint32(b[8:], opt)
	be.PutUint32(b[12:], typ)
	be.PutUint32(b[16:], uint32(len(data)))
	copy(b[20:], data)
	_, err := c.rw.Write(b)
	return err
}

func serve(rw io.ReadWriter, s *Script) error {
	c := conn{rw}
	var g [18]byte
	be.PutUint64(g[0:], magicInit)
	be.PutUint64(g[8:], magicOpt)
	be.PutUint16(g[16:], flagFixed|flagNoZeroes)
	if _, err := rw.Write(g[:]); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(rw, cf[:]); err != nil {
		return err
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(rw, h[:]); err != nil {
			return err
		}
		if be.Uint64(h[:]) != magicOpt {
			return io.ErrUnexpectedEOF
		}
		opt, n := be.Uint32(h[8:]), be.Uint32(h[12:])
		if n > maxOptionData {
			return io.ErrUnexpectedEOF
		}
		if _, err := io.CopyN(io.Discard, rw, int64(n)); err != nil {
			return err
		}
		var err error
		switch opt {
		case optAbort:
			_ = c.reply(opt, repAck, nil)
			return nil
		case optExportName:
			return nil // no transmission: hang up
		case optList:
			err = list(c, s)
		case optInfo, optGo:
			err = info(c, opt, s)
			if err == nil && opt == optGo {
				return nil // no transmission: hang up
			}
		default:
			err = c.reply(opt, repErrUnsup, nil)
		}
		if err != nil {
			return err
		}
	}
}

func list(c conn, s *Script) error {
	for i := range s.ListCount {
		name := s.Name(i)
		desc := ""
		if s.Description != nil {
			desc = s.Description(i)
		}
		b := make([]byte, 4+len(name)+len(desc))
		be.PutUint32(b, uint32(len(name)))
		copy(b[4:], name)
		copy(b[4+len(name):], desc)
		if err := c.reply(optList, repServer, b); err != nil {
			return err
		}
	}
	return c.reply(optList, repAck, nil)
}

func info(c conn, opt uint32, s *Script) error {
	if s.RefuseMessage != "" {
		return c.reply(opt, repErrPolicy, []byte(s.RefuseMessage))
	}
	b := make([]byte, 12)
	be.PutUint16(b, infoExport)
	be.PutUint64(b[2:], s.Size)
	be.PutUint16(b[10:], s.Flags|1) // NBD_FLAG_HAS_FLAGS
	if err := c.reply(opt, repInfo, b); err != nil {
		return err
	}
	if s.InfoDescription != "" {
		if err := c.reply(opt, repInfo, append([]byte{0, infoDesc}, s.InfoDescription...)); err != nil {
			return err
		}
	}
	for range s.UnknownInfos {
		if err := c.reply(opt, repInfo, []byte{0x7f, 0x7f, 'x'}); err != nil {
			return err
		}
	}
	return c.reply(opt, repAck, nil)
}
