// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package nbd

// quickAck is Linux-only (TCP_QUICKACK); elsewhere delayed ACKs stay.
func (s *session) quickAck() {}
