// SPDX-License-Identifier: Apache-2.0

// Package nbdproto holds the wire constants and fixed-size message layouts of
// the NBD protocol, as defined by the NetworkBlockDevice project's
// doc/proto.md ("the spec" below). Values are taken from the spec, not from
// any implementation's header (the reference nbd.h disagrees with the spec
// on NBD_REPLY_TYPE_BLOCK_STATUS).
//
// All integers on the wire are big-endian.
package nbdproto

// Magic numbers (spec, "Values" and "Handshake").
const (
	// InitMagic is the first 8 bytes the server sends in every handshake
	// style ("NBDMAGIC").
	InitMagic uint64 = 0x4e42444d41474943
	// OldstyleMagic follows InitMagic in the oldstyle handshake.
	OldstyleMagic uint64 = 0x00420281861253
	// OptsMagic ("IHAVEOPT") follows InitMagic in the newstyle handshake
	// and prefixes every option the client sends.
	OptsMagic uint64 = 0x49484156454F5054
	// RepMagic prefixes every option reply.
	RepMagic uint64 = 0x3e889045565a9
	// RequestMagic prefixes a compact transmission request.
	RequestMagic uint32 = 0x25609513
	// SimpleReplyMagic prefixes a simple reply.
	SimpleReplyMagic uint32 = 0x67446698
	// StructuredReplyMagic prefixes a structured reply chunk.
	StructuredReplyMagic uint32 = 0x668e33ef
	// ExtendedReplyMagic prefixes an extended-header reply chunk; this client
	// never negotiates extended headers, so seeing it is a protocol error.
	ExtendedReplyMagic uint32 = 0x6e8a278c
)

// Handshake flags sent by the server (16 bits).
const (
	FlagFixedNewstyle uint16 = 1 << 0
	FlagNoZeroes      uint16 = 1 << 1
)

// Client flags (32 bits).
const (
	FlagCFixedNewstyle uint32 = 1 << 0
	FlagCNoZeroes      uint32 = 1 << 1
)

// Options (spec, "Option types").
const (
	OptExportName      uint32 = 1
	OptAbort           uint32 = 2
	OptList            uint32 = 3
	OptStartTLS        uint32 = 5
	OptInfo            uint32 = 6
	OptGo              uint32 = 7
	OptStructuredReply uint32 = 8
	OptListMetaContext uint32 = 9
	OptSetMetaContext  uint32 = 10
	OptExtendedHeaders uint32 = 11
)

// Option reply types (spec, "Option reply types"). Error replies have bit 31
// set.
const (
	RepAck         uint32 = 1
	RepServer      uint32 = 2
	RepInfo        uint32 = 3
	RepMetaContext uint32 = 4

	RepFlagError        uint32 = 1 << 31
	RepErrUnsup         uint32 = RepFlagError | 1
	RepErrPolicy        uint32 = RepFlagError | 2
	RepErrInvalid       uint32 = RepFlagError | 3
	RepErrPlatform      uint32 = RepFlagError | 4
	RepErrTLSReqd       uint32 = RepFlagError | 5
	RepErrUnknown       uint32 = RepFlagError | 6
	RepErrShutdown      uint32 = RepFlagError | 7
	RepErrBlockSizeReqd uint32 = RepFlagError | 8
	RepErrTooBig        uint32 = RepFlagError | 9
	RepErrExtHeaderReqd uint32 = RepFlagError | 10
)

// Information types carried by NBD_REP_INFO and requested by NBD_OPT_INFO
// and NBD_OPT_GO.
const (
	InfoExport      uint16 = 0
	InfoName        uint16 = 1
	InfoDescription uint16 = 2
	InfoBlockSize   uint16 = 3
)

// Transmission flags (16 bits).
const (
	FlagHasFlags         uint16 = 1 << 0
	FlagReadOnly         uint16 = 1 << 1
	FlagSendFlush        uint16 = 1 << 2
	FlagSendFUA          uint16 = 1 << 3
	FlagRotational       uint16 = 1 << 4
	FlagSendTrim         uint16 = 1 << 5
	FlagSendWriteZeroes  uint16 = 1 << 6
	FlagSendDF           uint16 = 1 << 7
	FlagCanMultiConn     uint16 = 1 << 8
	FlagSendResize       uint16 = 1 << 9
	FlagSendCache        uint16 = 1 << 10
	FlagSendFastZero     uint16 = 1 << 11
	FlagBlockStatusPayld uint16 = 1 << 12
)

// Commands (spec, "Request types").
const (
	CmdRead        uint16 = 0
	CmdWrite       uint16 = 1
	CmdDisc        uint16 = 2
	CmdFlush       uint16 = 3
	CmdTrim        uint16 = 4
	CmdCache       uint16 = 5
	CmdWriteZeroes uint16 = 6
	CmdBlockStatus uint16 = 7
)

// Command flags (16 bits).
const (
	CmdFlagFUA      uint16 = 1 << 0
	CmdFlagNoHole   uint16 = 1 << 1
	CmdFlagDF       uint16 = 1 << 2
	CmdFlagReqOne   uint16 = 1 << 3
	CmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	ReplyFlagDone uint16 = 1 << 0

	ReplyTypeNone        uint16 = 0
	ReplyTypeOffsetData  uint16 = 1
	ReplyTypeOffsetHole  uint16 = 2
	ReplyTypeBlockStatus uint16 = 5
	ReplyTypeError       uint16 = 1<<15 | 1
	ReplyTypeErrorOffset uint16 = 1<<15 | 2
)

// Error values of the transmission phase (spec, "Error values").
const (
	EPERM     uint32 = 1
	EIO       uint32 = 5
	ENOMEM    uint32 = 12
	EINVAL    uint32 = 22
	ENOSPC    uint32 = 28
	EOVERFLOW uint32 = 75
	ENOTSUP   uint32 = 95
	ESHUTDOWN uint32 = 108
)

// Metadata context namespace and flags for base:allocation.
const (
	MetaBaseAllocation        = "base:allocation"
	StateHole          uint32 = 1 << 0
	StateZero          uint32 = 1 << 1
)

// Fixed sizes and limits.
const (
	// DefaultPort is the IANA-assigned NBD port.
	DefaultPort = 10809
	// MaxString is the spec's hard limit for any string (export names,
	// descriptions, error messages): 4096 bytes.
	MaxString = 4096
	// OldstylePadding and ExportNamePadding are the zero bytes that end the
	// oldstyle greeting and the NBD_OPT_EXPORT_NAME reply (unless
	// NO_ZEROES was negotiated).
	OldstylePadding   = 124
	ExportNamePadding = 124
	// OptReplyHeaderLen is magic(8)+option(4)+type(4)+length(4).
	OptReplyHeaderLen = 20
	// RequestLen is the size of a compact request header.
	RequestLen = 28
	// SimpleReplyLen is the size of a simple reply header.
	SimpleReplyLen = 16
	// StructuredReplyLen is the size of a structured reply chunk header.
	StructuredReplyLen = 20
	// MaxOptReply bounds the payload of a single option reply this client
	// accepts. The longest legitimate reply is NBD_REP_SERVER or an error
	// with two maximal strings plus a length word.
	MaxOptReply = 4 + 2*MaxString + 16
	// MaxPayloadDefault is the default maximum request payload when the
	// server advertises none (32 MiB).
	MaxPayloadDefault = 32 << 20
	// MaxBlockSizeMin is the largest minimum block size a server may
	// advertise (64 KiB).
	MaxBlockSizeMin = 64 << 10
)
