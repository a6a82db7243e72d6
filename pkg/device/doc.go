// SPDX-License-Identifier: Apache-2.0

// Package device is the kernel side of attaching an NBD export: it hands
// already-negotiated sockets to the Linux nbd driver, waits until
// /dev/nbdN is usable, and finds, resizes, reconnects and detaches such
// devices later.
//
// The NBD handshake is not done here. Callers (the node service, through
// pkg/nbd's kernel profile) pass connected sockets whose handshake bytes
// have all been consumed, together with the export size and transmission
// flags. This package never imports pkg/nbd.
//
// Two kernel interfaces are supported:
//
//   - Netlink (the default) uses the "nbd" generic netlink family
//     (Linux ≥ 4.12; backend identifiers need ≥ 5.14). The device
//     outlives the attaching process: the kernel keeps its own
//     reference on every socket. The device is tagged with a backend
//     identifier (the volume identity), so that a restarted process can
//     find it again from /sys/block/nbdN/backend.
//   - Ioctl (the fallback) uses NBD_SET_SOCK … NBD_DO_IT. The device lives
//     only as long as a thread of this process blocks in NBD_DO_IT; see
//     Device.Done.
//
// New picks netlink when the family resolves and falls back to ioctl, after
// loading the nbd module if /sys/module/nbd is absent.
//
// The Supervisor keeps a netlink device alive across server restarts: it
// watches the LINK_DEAD multicast group, redials through a caller-supplied
// function and hands the new sockets to the kernel with RECONFIGURE.
//
// Nothing here logs: errors are returned (wrapping the sentinels in
// errors.go with %w) and the Supervisor reports typed Events to a callback.
//
// Kernel behaviour relied on is cited from drivers/block/nbd.c and the uapi
// headers linux/nbd.h and linux/nbd-netlink.h; see the comments at each use.
package device
