// SPDX-License-Identifier: Apache-2.0

// Package vm is a test rig that runs commands, typically compiled Go
// test binaries, in a QEMU virtual machine booting a real Debian cloud
// kernel, so that code driving the kernel's nbd driver can be tested on
// hosts whose kernel lacks nbd (or where loading modules is not
// allowed).
//
// The VM boots from an initramfs only; there is no disk and no network
// besides loopback. The initramfs is built from the host: a static
// busybox for the shell and basic commands, NBD servers and clients
// (nbdkit, qemu-nbd, nbd-server, nbd-client, nbdinfo), file system tools
// (e2fsprogs, xfsprogs), util-linux mount and friends and a few GNU
// coreutils, each with the shared libraries that ldd reports. The
// kernel image package is downloaded once with apt-get; only the kernel
// and a few modules (nbd, xfs, tls, loop, dm-mod …) are kept.
//
// Everything expensive is cached (see Config.CacheDir): the kernel per
// release, and the base initramfs per hash of its inputs. Each run adds
// a small uncompressed cpio archive with the script and the per-run
// files (test binaries), concatenated after the cached base.
//
// Inside the VM, /init mounts proc, sysfs, devtmpfs, devpts and tmpfs on
// /tmp, /run and /dev/shm, brings up lo, exports NBDCSI_IN_VM=1 and runs
// Config.Script with busybox sh. It then prints
// "VMRUN-EXIT=<status> run=<id>" on the serial console and powers off;
// Run returns that status. Kernel modules are loaded by the script
// (modprobe nbd nbds_max=16 max_part=0), so tests choose the module
// parameters.
//
// Note that busybox here is built to prefer its applets: inside the
// script, "mount", "dd" or "date" run the busybox applet even though the
// GNU programs are installed; call /bin/mount, /bin/dd or /bin/date to
// get those. Programs that search PATH themselves (Go's exec.LookPath)
// find the GNU programs.
package vm
