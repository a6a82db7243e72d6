// SPDX-License-Identifier: Apache-2.0

// Package kernel holds the node plugin's tests on a real kernel: the CSI
// node service with the real attacher (pkg/attach over pkg/device) and the
// real mounter, against real NBD servers, with real mkfs and mount. They run
// as root where the nbd module is available — inside the QEMU VM of test/vm
// (make vm-test) — and skip elsewhere.
package kernel
