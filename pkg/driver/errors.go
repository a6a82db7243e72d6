// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// statusError converts an error from below the RPC layer into a gRPC status,
// once, at the RPC boundary. what says what failed ("attach volume").
// Errors that already carry a status keep it.
func statusError(what string, err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(classify(err), fmt.Sprintf("%s: %v", what, err))
}

// classify picks the gRPC code for an error from pkg/nbd, pkg/device or the
// system.
func classify(err error) codes.Code {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, nbd.ErrBadURI), errors.Is(err, nbd.ErrBadArgument):
		return codes.InvalidArgument
	case errors.Is(err, nbd.ErrUnknownExport):
		return codes.NotFound
	case errors.Is(err, nbd.ErrInventoryLimit):
		// The server answers more than the client's budget: an admin
		// must act (split the pool, raise the limit); retrying is futile.
		return codes.FailedPrecondition
	case errors.Is(err, nbd.ErrTLSRequired), errors.Is(err, nbd.ErrTLSUnavailable),
		errors.Is(err, nbd.ErrPolicy), errors.Is(err, nbd.ErrBlockSizeRequired),
		errors.Is(err, nbd.ErrNotSupportedByExport), errors.Is(err, nbd.ErrPlatform):
		return codes.FailedPrecondition
	case errors.Is(err, nbd.ErrShutdown), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.ENOENT) && errors.As(err, new(*net.OpError)):
		return codes.Unavailable
	case errors.As(err, &ne) && ne.Timeout():
		return codes.DeadlineExceeded
	case errors.Is(err, ErrNotAttached):
		return codes.NotFound
	case errors.Is(err, crypt.ErrNoKey), errors.Is(err, crypt.ErrBadKey):
		return codes.InvalidArgument
	case errors.Is(err, crypt.ErrWrongKey), errors.Is(err, crypt.ErrReadOnly), errors.Is(err, crypt.ErrNotLUKS),
		errors.Is(err, crypt.ErrBusy), errors.As(err, new(*crypt.ForeignDataError)):
		return codes.FailedPrecondition
	case errors.Is(err, ErrAdopting):
		return codes.Unavailable
	}
	return codes.Internal
}
