// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package ktls

import (
	"fmt"
	"runtime"
	"syscall"
)

func install(syscall.RawConn, *state) error {
	return fmt.Errorf("%w: not implemented on %s/%s", ErrUnavailable, runtime.GOOS, runtime.GOARCH)
}
