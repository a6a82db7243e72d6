// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"bytes"
	"testing"
)

func TestStreamCounts(t *testing.T) {
	var s stream
	hs := append([]byte{typeHandshake, 3, 1, 0, 40, handshakeClientHello, 0, 0, 36, 3, 3}, bytes.Repeat([]byte{7}, 32)...)
	hs = append(hs, 0, 0)
	ccs := []byte{typeChangeCipherSpec, 3, 3, 0, 1, 1}
	app := []byte{typeApplicationData, 3, 3, 0, 3, 1, 2, 3}
	all := bytes.Join([][]byte{hs, ccs, app, app}, nil)
	// Any split of the byte stream counts the same.
	for cut := 0; cut <= len(all); cut++ {
		s = stream{}
		s.feed(all[:cut])
		s.feed(all[cut:])
		// A CCS record has no sequence number: not counted.
		if s.records != 3 || s.sinceCCS != 2 || !s.atBoundary() || !s.helloOK || s.hello[0] != 7 || !bytes.Equal(s.last, app) {
			t.Fatalf("cut %d: records %d sinceCCS %d boundary %v hello %v", cut, s.records, s.sinceCCS, s.atBoundary(), s.helloOK)
		}
	}
}

// TestStreamCCSNeverLast: a CCS record (TLS 1.3 allows one at any time)
// never replaces the last protected record, which proves the keys.
func TestStreamCCSNeverLast(t *testing.T) {
	var s stream
	app := []byte{typeApplicationData, 3, 3, 0, 3, 1, 2, 3}
	s.feed(app)
	s.feed([]byte{typeChangeCipherSpec, 3, 3, 0, 1, 1})
	if s.records != 1 || !bytes.Equal(s.last, app) || !s.atBoundary() {
		t.Fatalf("after app+CCS: records %d last % x", s.records, s.last)
	}
}

func TestStreamRejectsOversizedRecord(t *testing.T) {
	var s stream
	s.feed([]byte{typeApplicationData, 3, 3, 0xff, 0xff})
	if s.bad == nil {
		t.Fatal("65535-byte record accepted")
	}
	if len(s.cur) != 0 {
		t.Fatal("buffer grew for a refused record")
	}
}

func FuzzStream(f *testing.F) {
	f.Add([]byte{typeApplicationData, 3, 3, 0, 3, 1, 2, 3}, 2)
	f.Add([]byte{typeHandshake, 3, 1, 0, 0}, 1)
	f.Fuzz(func(t *testing.T, b []byte, step int) {
		var s stream
		step = max(1, step%64+1)
		for i := 0; i < len(b); i += step {
			if s.bad == nil && s.want() <= 0 {
				t.Fatalf("want %d", s.want())
			}
			s.feed(b[i:min(len(b), i+step)])
		}
		if len(s.cur) > recordHeaderLen+maxRecordBody || len(s.last) > recordHeaderLen+maxRecordBody {
			t.Fatal("buffer past the record bound")
		}
	})
}
