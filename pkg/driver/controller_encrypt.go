// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"fmt"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/pkg/crypt"
)

// encrypted tells whether the StorageClass asks for encrypted volumes
// (parsePoolParams has validated the value).
func (p *poolParams) encrypted() bool {
	b, _ := strconv.ParseBool(p.nodeContext[KeyEncrypted])
	return b
}

// checkEncryption refuses encrypted volumes that could never be used. The
// node formats a blank export with LUKS2 on its first writable stage, so
// a volume whose access modes are all read-only would stay unformatted and
// unusable forever.
func checkEncryption(p *poolParams, caps []*csi.VolumeCapability) error {
	if p.encrypted() && !writable(caps) {
		return fmt.Errorf("parameter %q: an encrypted volume is formatted on its first writable stage, and every access mode requested is read-only", KeyEncrypted)
	}
	return nil
}

// claimSize is the export size a request needs: an encrypted volume also
// holds its LUKS2 header (crypt.HeaderArea), so that the filesystem or
// block device gets at least the requested bytes.
func claimSize(p *poolParams, required int64) uint64 {
	if p.encrypted() {
		return uint64(required) + crypt.HeaderArea
	}
	return uint64(required)
}

// luksOverhead is what an encrypted volume's LUKS2 header takes from its
// export; 0 for a plain volume.
func luksOverhead(vc map[string]string) uint64 {
	if b, _ := strconv.ParseBool(vc[KeyEncrypted]); b {
		return crypt.HeaderArea
	}
	return 0
}

// usableSize is the capacity a volume with volume context vc offers on an
// export of size bytes: what its filesystem or block device gets.
func usableSize(vc map[string]string, size uint64) uint64 {
	o := luksOverhead(vc)
	if size < o {
		return 0
	}
	return size - o
}
