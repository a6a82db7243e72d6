// SPDX-License-Identifier: Apache-2.0

package device

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
)

// EnsureModule makes sure the kernel's nbd driver is present. If
// /sys/module/nbd (under opts.SysRoot) is absent it runs
//
//	modprobe nbd nbds_max=<NbdsMax> max_part=<MaxPart>
//
// through opts.Module.Exec, as ceph's rbd-nbd does. Module parameters only
// apply when this call loads the module. If modprobe fails and the module
// is still absent, the error wraps ErrNoKernelSupport and includes
// modprobe's output.
func EnsureModule(ctx context.Context, opts Options) error {
	opts = opts.withDefaults()
	sys := sysfs{root: opts.SysRoot}
	if sys.moduleLoaded() {
		return nil
	}
	if opts.Module.Skip {
		return fmt.Errorf("%w: %s/module/nbd is absent and module loading is disabled",
			ErrNoKernelSupport, opts.SysRoot)
	}
	args := []string{
		"nbd",
		"nbds_max=" + strconv.Itoa(opts.Module.NbdsMax),
		"max_part=" + strconv.Itoa(opts.Module.MaxPart),
	}
	out, err := opts.Module.Exec.CommandContext(ctx, opts.Module.ModprobePath, args...).CombinedOutput()
	if sys.moduleLoaded() {
		// Loaded, by us or concurrently by someone else.
		return nil
	}
	if err == nil {
		return fmt.Errorf("%w: %s succeeded but %s/module/nbd is absent",
			ErrNoKernelSupport, opts.Module.ModprobePath, opts.SysRoot)
	}
	return fmt.Errorf("%w: %s %v: %w: %s", ErrNoKernelSupport, opts.Module.ModprobePath, args,
		err, bytes.TrimSpace(out))
}
