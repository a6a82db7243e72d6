// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package attach

import (
	"errors"
	"os"
)

var errDiag = errors.New("sock_diag: not supported on this system")

type sockID struct{ family int }

func (id sockID) tcp() bool      { return false }
func (id sockID) String() string { return "socket" }

type sockState struct {
	held, live bool
	cookie     [2]uint32
}

func identify(*os.File) (sockID, error)    { return sockID{}, errDiag }
func diagLookup(sockID) (sockState, error) { return sockState{}, errDiag }
func diagDestroy(sockID, [2]uint32) error  { return errDiag }

func diagProbeUnix() bool { return false }
func diagProbeTCP() bool  { return false }
