// SPDX-License-Identifier: Apache-2.0

package device

import (
	"fmt"
	"os"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

// The "nbd" generic netlink family, include/uapi/linux/nbd-netlink.h.
const (
	genlFamilyName = "nbd"
	genlMcastGroup = "nbd_mc_group"

	cmdConnect     uint8 = 1
	cmdDisconnect  uint8 = 2
	cmdReconfigure uint8 = 3
	cmdLinkDead    uint8 = 4 // multicast only
	cmdStatus      uint8 = 5

	attrIndex           uint16 = 1  // u32
	attrSizeBytes       uint16 = 2  // u64
	attrBlockSizeBytes  uint16 = 3  // u64
	attrTimeout         uint16 = 4  // u64, seconds
	attrServerFlags     uint16 = 5  // u64
	attrClientFlags     uint16 = 6  // u64
	attrSockets         uint16 = 7  // nested NBD_SOCK_ITEM
	attrDeadConnTimeout uint16 = 8  // u64, seconds
	attrDeviceList      uint16 = 9  // nested NBD_DEVICE_ITEM
	attrBackendID       uint16 = 10 // string

	sockItem uint16 = 1 // NBD_SOCK_ITEM
	sockFD   uint16 = 1 // NBD_SOCK_FD, u32

	deviceItem      uint16 = 1 // NBD_DEVICE_ITEM
	deviceIndex     uint16 = 1 // NBD_DEVICE_INDEX, u32
	deviceConnected uint16 = 2 // NBD_DEVICE_CONNECTED, u8
)

// attrs is one attribute of a request, as a function over the encoder
// (the style of mdlayher/genetlink users): requests are lists of these.
type attrs func(ae *netlink.AttributeEncoder)

func withIndex(i uint32) attrs {
	return func(ae *netlink.AttributeEncoder) { ae.Uint32(attrIndex, i) }
}

func withSize(bytes uint64) attrs {
	return func(ae *netlink.AttributeEncoder) { ae.Uint64(attrSizeBytes, bytes) }
}

func withBlockSize(bytes uint64) attrs {
	return func(ae *netlink.AttributeEncoder) { ae.Uint64(attrBlockSizeBytes, bytes) }
}

func withTimeout(sec uint64) attrs {
	return func(ae *netlink.AttributeEncoder) { ae.Uint64(attrTimeout, sec) }
}

func withDeadConnTimeout(sec uint64) attrs {
	return func(ae *netlink.AttributeEncoder) { ae.Uint64(attrDeadConnTimeout, sec) }
}

func withServerFlags(f uint16) attrs {
	return func(ae *netlink.AttributeEncoder) { ae.Uint64(attrServerFlags, uint64(f)) }
}

func withClientFlags(f uint64) attrs {
	return func(ae *netlink.AttributeEncoder) { ae.Uint64(attrClientFlags, f) }
}

func withBackendID(id string) attrs {
	return func(ae *netlink.AttributeEncoder) { ae.String(attrBackendID, id) }
}

// withSockets encodes SOCKETS = { SOCK_ITEM { SOCK_FD u32 } ... }.
func withSockets(fds []uint32) attrs {
	return func(ae *netlink.AttributeEncoder) {
		ae.Nested(attrSockets, func(nae *netlink.AttributeEncoder) error {
			for _, fd := range fds {
				nae.Nested(sockItem, func(iae *netlink.AttributeEncoder) error {
					iae.Uint32(sockFD, fd)
					return nil
				})
			}
			return nil
		})
	}
}

// socketFDs returns the descriptor numbers of files. The files must stay
// open (runtime.KeepAlive) until the request has been answered.
func socketFDs(files []*os.File) ([]uint32, error) {
	fds := make([]uint32, len(files))
	for i, f := range files {
		if f == nil {
			return nil, fmt.Errorf("%w: socket %d is nil", ErrInvalidConfig, i)
		}
		fd := f.Fd()
		if fd > 1<<31-1 {
			return nil, fmt.Errorf("%w: socket %d has descriptor %d", ErrInvalidConfig, i, fd)
		}
		fds[i] = uint32(fd)
	}
	return fds, nil
}

// connectAttrs builds NBD_CMD_CONNECT. INDEX is only sent when asked for:
// omitting it lets the kernel pick an unused device or create one.
// TIMEOUT and DEAD_CONN_TIMEOUT are always sent, so settings of a previous
// user of the device are never inherited.
func connectAttrs(c normalized, fds []uint32, clientFlags uint64) []attrs {
	var a []attrs
	if c.Index != nil {
		a = append(a, withIndex(*c.Index))
	}
	return append(a,
		withSize(c.SizeBytes),
		withBlockSize(c.BlockSize),
		withTimeout(c.timeoutSec),
		withDeadConnTimeout(c.deadConnSec),
		withServerFlags(c.flags),
		withClientFlags(clientFlags&^cflagDisconnectOnClose),
		withSockets(fds),
		withBackendID(c.BackendID),
	)
}

func encode(list []attrs) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	for _, a := range list {
		a(ae)
	}
	return ae.Encode()
}

// parseIndex finds NBD_ATTR_INDEX in a CONNECT reply or LINK_DEAD message.
func parseIndex(msgs []genetlink.Message) (uint32, error) {
	for _, m := range msgs {
		ad, err := netlink.NewAttributeDecoder(m.Data)
		if err != nil {
			return 0, fmt.Errorf("decode reply: %w", err)
		}
		for ad.Next() {
			if ad.Type() == attrIndex {
				i := ad.Uint32()
				if err := ad.Err(); err != nil {
					return 0, fmt.Errorf("decode index: %w", err)
				}
				return i, nil
			}
		}
		if err := ad.Err(); err != nil {
			return 0, fmt.Errorf("decode reply: %w", err)
		}
	}
	return 0, fmt.Errorf("reply carries no NBD_ATTR_INDEX")
}

// parseStatus decodes a STATUS reply:
// DEVICE_LIST { DEVICE_ITEM { DEVICE_INDEX u32, DEVICE_CONNECTED u8 } ... }.
func parseStatus(msgs []genetlink.Message) ([]Status, error) {
	var out []Status
	for _, m := range msgs {
		ad, err := netlink.NewAttributeDecoder(m.Data)
		if err != nil {
			return nil, fmt.Errorf("decode status: %w", err)
		}
		for ad.Next() {
			if ad.Type() != attrDeviceList {
				continue
			}
			ad.Nested(func(lad *netlink.AttributeDecoder) error {
				for lad.Next() {
					if lad.Type() != deviceItem {
						continue
					}
					var st Status
					lad.Nested(func(iad *netlink.AttributeDecoder) error {
						for iad.Next() {
							switch iad.Type() {
							case deviceIndex:
								st.Index = iad.Uint32()
							case deviceConnected:
								st.Connected = iad.Uint8() != 0
							}
						}
						return iad.Err()
					})
					out = append(out, st)
				}
				return lad.Err()
			})
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("decode status: %w", err)
		}
	}
	return out, nil
}
