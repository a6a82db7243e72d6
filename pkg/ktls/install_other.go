// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package ktls

import (
	"fmt"
	"runtime"
	"syscall"
)

// Available reports that this platform has no kernel TLS.
func Available() error {
	return fmt.Errorf("%w: not implemented on %s/%s", ErrUnavailable, runtime.GOOS, runtime.GOARCH)
}

func install(syscall.RawConn, *state) error {
	return fmt.Errorf("%w: not implemented on %s/%s", ErrUnavailable, runtime.GOOS, runtime.GOARCH)
}
