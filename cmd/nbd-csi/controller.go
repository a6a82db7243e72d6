// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"flag"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// controllerFlags configure the controller service.
type controllerFlags struct{}

func (f *controllerFlags) register(*flag.FlagSet) {}

// newControllerService builds the controller service.
func newControllerService(context.Context, string, controllerFlags) (csi.ControllerServer, driver.ReadyFunc, func(), error) {
	return nil, nil, nil, errors.New("the controller service is not part of this build yet; run --mode=node")
}
