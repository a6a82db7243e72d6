// SPDX-License-Identifier: Apache-2.0

// Package crypt puts LUKS2 encryption (dm-crypt, through cryptsetup) under
// an attached NBD device, so the NBD server only ever stores ciphertext.
//
// The package is a library: it never logs, returns typed errors
// (ErrWrongKey, ErrBusy, *ForeignDataError, *CommandError …) and runs
// cryptsetup and blkid through the Runner interface, so tests substitute a
// stateful fake that models their refusals.
//
// Secrets: passphrases reach cryptsetup only on its standard input
// (--key-file -) or on an inherited pipe (file descriptor 3, for the second
// key of luksAddKey). They never appear in arguments, in the environment, on
// disk, or in error messages.
//
// Safety: Format refuses a device that holds a LUKS header (primary or
// secondary), any signature blkid knows, or any non-zero byte in the area
// the LUKS2 header would overwrite. A wrong passphrase is ErrWrongKey and
// never leads to formatting.
package crypt
