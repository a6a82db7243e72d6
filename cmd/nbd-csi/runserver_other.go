// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package main

import (
	"context"
	"fmt"
	"io"
	"runtime"
)

func superviseServer(context.Context, []string, runServerOptions, io.Writer) error {
	return fmt.Errorf("run-server is not implemented on %s/%s", runtime.GOOS, runtime.GOARCH)
}
