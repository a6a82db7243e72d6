// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"strings"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// HandshakeStyle is the handshake variant the server spoke.
type HandshakeStyle int

// Handshake styles, oldest first.
const (
	HandshakeOldstyle HandshakeStyle = iota + 1
	HandshakeNewstyle
	HandshakeFixedNewstyle
)

// String returns "oldstyle", "newstyle" or "fixed-newstyle".
func (h HandshakeStyle) String() string {
	switch h {
	case HandshakeOldstyle:
		return "oldstyle"
	case HandshakeNewstyle:
		return "newstyle"
	case HandshakeFixedNewstyle:
		return "fixed-newstyle"
	}
	return "unknown"
}

// TransmissionFlags are the 16-bit per-export flags of the spec
// (NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, …).
type TransmissionFlags uint16

// Flag values, re-exported for callers outside this module's internal tree.
const (
	FlagHasFlags        = TransmissionFlags(nbdproto.FlagHasFlags)
	FlagReadOnly        = TransmissionFlags(nbdproto.FlagReadOnly)
	FlagSendFlush       = TransmissionFlags(nbdproto.FlagSendFlush)
	FlagSendFUA         = TransmissionFlags(nbdproto.FlagSendFUA)
	FlagRotational      = TransmissionFlags(nbdproto.FlagRotational)
	FlagSendTrim        = TransmissionFlags(nbdproto.FlagSendTrim)
	FlagSendWriteZeroes = TransmissionFlags(nbdproto.FlagSendWriteZeroes)
	FlagSendDF          = TransmissionFlags(nbdproto.FlagSendDF)
	FlagCanMultiConn    = TransmissionFlags(nbdproto.FlagCanMultiConn)
	FlagSendResize      = TransmissionFlags(nbdproto.FlagSendResize)
	FlagSendCache       = TransmissionFlags(nbdproto.FlagSendCache)
	FlagSendFastZero    = TransmissionFlags(nbdproto.FlagSendFastZero)
)

// flagNames lists the flags in bit order with their stable, documented names
// (docs/cli.md); "has-flags" is omitted because it is always set.
var flagNames = []struct {
	flag TransmissionFlags
	name string
}{
	{FlagReadOnly, "read-only"},
	{FlagSendFlush, "flush"},
	{FlagSendFUA, "fua"},
	{FlagRotational, "rotational"},
	{FlagSendTrim, "trim"},
	{FlagSendWriteZeroes, "write-zeroes"},
	{FlagSendDF, "df"},
	{FlagCanMultiConn, "multi-conn"},
	{FlagSendResize, "resize"},
	{FlagSendCache, "cache"},
	{FlagSendFastZero, "fast-zero"},
}

// Has reports whether all bits of g are set in f.
func (f TransmissionFlags) Has(g TransmissionFlags) bool { return f&g == g }

// Names returns the names of the set flags in bit order, e.g.
// ["read-only", "flush"].
func (f TransmissionFlags) Names() []string {
	names := []string{}
	for _, fn := range flagNames {
		if f.Has(fn.flag) {
			names = append(names, fn.name)
		}
	}
	return names
}

// String returns the set flag names joined by commas.
func (f TransmissionFlags) String() string { return strings.Join(f.Names(), ",") }

// BlockSizes are the server's block size constraints (NBD_INFO_BLOCK_SIZE).
type BlockSizes struct {
	// Minimum is the smallest block size the server accepts (power of two,
	// ≤ 64 KiB).
	Minimum uint32
	// Preferred is the block size the server prefers (power of two).
	Preferred uint32
	// Maximum is the largest payload the server accepts; 0xffffffff means
	// no limit.
	Maximum uint32
}

// DefaultBlockSizes are the constraints the spec tells a client to assume
// when the server advertises none.
var DefaultBlockSizes = BlockSizes{Minimum: 1, Preferred: 4096, Maximum: nbdproto.MaxPayloadDefault}

// ExportInfo describes an export as negotiated.
type ExportInfo struct {
	// Name is the export name the client asked for.
	Name string
	// CanonicalName is the name the server reported (NBD_INFO_NAME), if any.
	CanonicalName string
	// Description is the server's description (NBD_INFO_DESCRIPTION), if any.
	Description string
	// Size is the export size in bytes.
	Size uint64
	// Flags are the transmission flags.
	Flags TransmissionFlags
	// BlockSizes are the server's constraints; BlockSizesAdvertised tells
	// whether the server sent them or these are DefaultBlockSizes.
	BlockSizes           BlockSizes
	BlockSizesAdvertised bool
	// Handshake is the handshake style the server spoke.
	Handshake HandshakeStyle
	// TLS tells whether the session is encrypted.
	TLS bool
	// StructuredReplies tells whether structured replies were negotiated.
	StructuredReplies bool
	// MetaContexts maps each negotiated metadata context name to its ID.
	MetaContexts map[string]uint32
}

// ReadOnly reports whether the export refuses writes.
func (e *ExportInfo) ReadOnly() bool { return e.Flags.Has(FlagReadOnly) }

// ListEntry is one export from NBD_OPT_LIST.
type ListEntry struct {
	// Name is the export name.
	Name string
	// Description is the optional human-readable description.
	Description string
}
