// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"crypto/tls"
	"net"
	"os"
	"testing"

	"github.com/nbd-csi/nbd-csi/pkg/ktls"
)

// SetKernelTLSSeams replaces the offload and the socket dup of KernelTLS
// for the test t (nil keeps the real one).
func SetKernelTLSSeams(t *testing.T, offload func(*tls.Conn, *ktls.Recorder) (*ktls.Info, error), file func(net.Conn) (*os.File, error)) {
	oldO, oldF := offloadTLS, socketFile
	t.Cleanup(func() { offloadTLS, socketFile = oldO, oldF })
	if offload != nil {
		offloadTLS = offload
	}
	if file != nil {
		socketFile = file
	}
}
