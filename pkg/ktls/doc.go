// SPDX-License-Identifier: Apache-2.0

// Package ktls moves an established crypto/tls client session into the
// Linux kernel's TLS layer (kTLS), so that the socket can be given to a
// kernel consumer such as the nbd driver with no userspace relay.
//
// crypto/tls exposes neither its keys nor its record sequence numbers, and
// this package does not fork it. Instead:
//
//   - A Recorder wraps the TCP connection given to tls.Client. It never
//     hands crypto/tls bytes past the end of the current TLS record, so
//     nothing of a later record can sit in crypto/tls's buffers, and it
//     parses both directions into records to count them (sequence numbers)
//     and to keep the last record of each direction.
//   - The secrets come from tls.Config.KeyLogWriter (a per-connection
//     writer kept in memory only; the material never reaches a log or a
//     disk). Keys and IVs are derived from them: HKDF-Expand-Label from the
//     application traffic secrets for TLS 1.3, the PRF key expansion from
//     the master secret and both randoms for TLS 1.2.
//   - Before anything is installed, the derived keys and sequence numbers
//     are proven: the last record read and the last record written are
//     decrypted with them (AEAD authentication fails on any mistake), and a
//     probe read proves crypto/tls holds no plaintext. Any doubt refuses the
//     offload; the session is then still usable in userspace.
//   - Offload installs TX and RX with setsockopt(TCP_ULP, "tls") and
//     SOL_TLS TLS_TX/TLS_RX.
//
// Supported: TLS 1.2 and 1.3 with AES-128-GCM and AES-256-GCM.
// ChaCha20-Poly1305 is refused (the proof above needs an implementation
// this module does not carry).
//
// After the offload the kernel owns the record layer. The kernel's TLS
// receive path answers a record that is not application data (an alert,
// or a TLS 1.3 KeyUpdate or NewSessionTicket) with EIO when the reader
// passes no control-message buffer, which is what in-kernel consumers do:
// such a record ends the connection. Callers must treat that like any
// other lost connection, and may prefer TLS 1.2, which has no KeyUpdate
// (docs/tls.md).
//
// The package never logs.
package ktls
