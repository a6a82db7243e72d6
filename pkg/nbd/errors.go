// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"errors"
	"fmt"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// Sentinel errors. Errors returned by this package wrap one of these where it
// applies, so callers classify them with errors.Is.
var (
	// ErrUnknownExport means the server has no export of the requested name
	// (NBD_REP_ERR_UNKNOWN, or a name missing from NBD_OPT_LIST).
	ErrUnknownExport = errors.New("unknown export")
	// ErrTLSRequired means the server (or the export) requires TLS and the
	// client has none configured (NBD_REP_ERR_TLS_REQD).
	ErrTLSRequired = errors.New("server requires TLS")
	// ErrTLSUnavailable means TLS was requested but the server cannot or
	// will not do it. The client never falls back to plaintext.
	ErrTLSUnavailable = errors.New("TLS requested but not offered by the server")
	// ErrPolicy means the server refused the option by policy
	// (NBD_REP_ERR_POLICY).
	ErrPolicy = errors.New("forbidden by server policy")
	// ErrPlatform means the option is not supported on the server's
	// platform (NBD_REP_ERR_PLATFORM).
	ErrPlatform = errors.New("not supported on the server platform")
	// ErrInvalid means the server found the option invalid
	// (NBD_REP_ERR_INVALID).
	ErrInvalid = errors.New("invalid option")
	// ErrUnsupported means the server does not know the option
	// (NBD_REP_ERR_UNSUP) or lacks a feature the client needs.
	ErrUnsupported = errors.New("unsupported by server")
	// ErrBlockSizeRequired means the server insists on block size
	// negotiation (NBD_REP_ERR_BLOCK_SIZE_REQD).
	ErrBlockSizeRequired = errors.New("server requires block size negotiation")
	// ErrTooBig means a request or reply was too large
	// (NBD_REP_ERR_TOO_BIG).
	ErrTooBig = errors.New("request or reply too big")
	// ErrShutdown means the server is shutting down (NBD_REP_ERR_SHUTDOWN
	// during the handshake, NBD_ESHUTDOWN during transmission).
	ErrShutdown = errors.New("server is shutting down")
	// ErrProtocol means the server violated the protocol: bad magic, wrong
	// lengths, inconsistent values. The connection is unusable afterwards.
	ErrProtocol = errors.New("NBD protocol violation")
	// ErrClosed means the connection was closed locally.
	ErrClosed = errors.New("connection closed")
	// ErrBadURI means an NBD URI could not be parsed or uses something this
	// client does not support.
	ErrBadURI = errors.New("invalid NBD URI")
	// ErrBadArgument means a caller-supplied value (export name, offset,
	// length) is not acceptable.
	ErrBadArgument = errors.New("invalid argument")
	// ErrNotSupportedByExport means the caller asked for a command the
	// export's transmission flags do not allow (e.g. a write to a read-only
	// export, TRIM without NBD_FLAG_SEND_TRIM).
	ErrNotSupportedByExport = errors.New("not supported by export")
	// ErrInventoryLimit means a server's answer exceeds a budget the client
	// keeps (exports listed, bytes of names and descriptions, information
	// replies per export); a *LimitError says which.
	ErrInventoryLimit = errors.New("server exceeds the client's inventory budget")
)

// LimitError names the server and the budget it exceeded. It is returned
// before anything past the budget is allocated.
type LimitError struct {
	// Server is the server's URI (without an export).
	Server string
	// What is the answer that exceeded it, e.g. "NBD_OPT_LIST".
	What string
	// Limit is the budget, counted in Unit ("exports", "bytes", …).
	Limit uint64
	Unit  string
}

// Error implements error. Dial, Probe and List prefix it with the server's
// URI.
func (e *LimitError) Error() string {
	return fmt.Sprintf("%s exceeds the client's limit of %d %s", e.What, e.Limit, e.Unit)
}

// Unwrap returns ErrInventoryLimit.
func (e *LimitError) Unwrap() error { return ErrInventoryLimit }

// OptionError is the server's refusal of a handshake option. It carries the
// server's message verbatim and matches the sentinel for its reply type with
// errors.Is.
type OptionError struct {
	// Option is the option the server refused (nbdproto.Opt*).
	Option uint32
	// Reply is the error reply type (nbdproto.RepErr*).
	Reply uint32
	// Message is the optional human-readable text the server sent.
	Message string
}

// Error implements error.
func (e *OptionError) Error() string {
	s := fmt.Sprintf("server refused %s: %s", OptionName(e.Option), replyErrorText(e.Reply))
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap returns the sentinel that corresponds to the reply type, or nil for
// an error reply type this client does not know.
func (e *OptionError) Unwrap() error {
	switch e.Reply {
	case nbdproto.RepErrUnsup:
		return ErrUnsupported
	case nbdproto.RepErrPolicy:
		return ErrPolicy
	case nbdproto.RepErrInvalid:
		return ErrInvalid
	case nbdproto.RepErrPlatform:
		return ErrPlatform
	case nbdproto.RepErrTLSReqd:
		return ErrTLSRequired
	case nbdproto.RepErrUnknown:
		return ErrUnknownExport
	case nbdproto.RepErrShutdown:
		return ErrShutdown
	case nbdproto.RepErrBlockSizeReqd:
		return ErrBlockSizeRequired
	case nbdproto.RepErrTooBig:
		return ErrTooBig
	}
	return nil
}

func replyErrorText(rep uint32) string {
	switch rep {
	case nbdproto.RepErrUnsup:
		return "unsupported option"
	case nbdproto.RepErrPolicy:
		return "forbidden by policy"
	case nbdproto.RepErrInvalid:
		return "invalid"
	case nbdproto.RepErrPlatform:
		return "unsupported on this platform"
	case nbdproto.RepErrTLSReqd:
		return "TLS required"
	case nbdproto.RepErrUnknown:
		return "unknown export"
	case nbdproto.RepErrShutdown:
		return "server shutting down"
	case nbdproto.RepErrBlockSizeReqd:
		return "block size negotiation required"
	case nbdproto.RepErrTooBig:
		return "too big"
	case nbdproto.RepErrExtHeaderReqd:
		return "extended headers required"
	}
	return fmt.Sprintf("error reply %#x", rep)
}

// OptionName returns the spec name of a handshake option.
func OptionName(opt uint32) string {
	switch opt {
	case nbdproto.OptExportName:
		return "NBD_OPT_EXPORT_NAME"
	case nbdproto.OptAbort:
		return "NBD_OPT_ABORT"
	case nbdproto.OptList:
		return "NBD_OPT_LIST"
	case nbdproto.OptStartTLS:
		return "NBD_OPT_STARTTLS"
	case nbdproto.OptInfo:
		return "NBD_OPT_INFO"
	case nbdproto.OptGo:
		return "NBD_OPT_GO"
	case nbdproto.OptStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case nbdproto.OptListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case nbdproto.OptSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	case nbdproto.OptExtendedHeaders:
		return "NBD_OPT_EXTENDED_HEADERS"
	}
	return fmt.Sprintf("option %d", opt)
}

// protocolErrorf returns an error wrapping ErrProtocol.
func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// CommandError is an error the server returned for a transmission request.
type CommandError struct {
	// Command is the request type (nbdproto.Cmd*).
	Command uint16
	// Errno is the NBD error value (nbdproto.E*); unknown values are kept.
	Errno uint32
	// Message is the text of a structured error chunk, if any.
	Message string
	// Offset is the offset the error applies to (NBD_REPLY_TYPE_ERROR_OFFSET);
	// HasOffset tells whether it was sent.
	Offset    uint64
	HasOffset bool
}

// Error implements error.
func (e *CommandError) Error() string {
	s := fmt.Sprintf("%s failed: %s", CommandName(e.Command), errnoText(e.Errno))
	if e.HasOffset {
		s += fmt.Sprintf(" at offset %d", e.Offset)
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap maps NBD_ESHUTDOWN to ErrShutdown and NBD_ENOTSUP to ErrUnsupported.
func (e *CommandError) Unwrap() error {
	switch e.Errno {
	case nbdproto.ESHUTDOWN:
		return ErrShutdown
	case nbdproto.ENOTSUP:
		return ErrUnsupported
	}
	return nil
}

func errnoText(errno uint32) string {
	switch errno {
	case nbdproto.EPERM:
		return "EPERM (operation not permitted)"
	case nbdproto.EIO:
		return "EIO (input/output error)"
	case nbdproto.ENOMEM:
		return "ENOMEM (out of memory)"
	case nbdproto.EINVAL:
		return "EINVAL (invalid argument)"
	case nbdproto.ENOSPC:
		return "ENOSPC (no space left)"
	case nbdproto.EOVERFLOW:
		return "EOVERFLOW (value too large)"
	case nbdproto.ENOTSUP:
		return "ENOTSUP (operation not supported)"
	case nbdproto.ESHUTDOWN:
		return "ESHUTDOWN (server shutting down)"
	}
	// The spec: treat an unexpected value as NBD_EINVAL, but keep the
	// number for the message.
	return fmt.Sprintf("error %d (treated as EINVAL)", errno)
}

// CommandName returns the spec name of a transmission command.
func CommandName(cmd uint16) string {
	switch cmd {
	case nbdproto.CmdRead:
		return "NBD_CMD_READ"
	case nbdproto.CmdWrite:
		return "NBD_CMD_WRITE"
	case nbdproto.CmdDisc:
		return "NBD_CMD_DISC"
	case nbdproto.CmdFlush:
		return "NBD_CMD_FLUSH"
	case nbdproto.CmdTrim:
		return "NBD_CMD_TRIM"
	case nbdproto.CmdCache:
		return "NBD_CMD_CACHE"
	case nbdproto.CmdWriteZeroes:
		return "NBD_CMD_WRITE_ZEROES"
	case nbdproto.CmdBlockStatus:
		return "NBD_CMD_BLOCK_STATUS"
	}
	return fmt.Sprintf("command %d", cmd)
}
