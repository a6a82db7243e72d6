// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
	"sync"
)

// mkfsOptions accepts only options that shape the new filesystem. mkfs
// runs as root on the node, and several of its options read or write host
// files or other devices (mke2fs -d copies a host directory into the new
// filesystem, -l reads a bad-blocks file, -z writes an undo file, -J
// device= uses another device as journal; mkfs.xfs -p reads a prototype
// file, -c a config file, -d name= / -l logdev= / -r rtdev= name other
// files or devices). An allowlist per filesystem, each option in its own
// token followed by its value in the next, with the value itself checked,
// makes all of those impossible, as is a bare word that mkfs would take as
// the device to format. docs/parameters.md lists what is accepted.
type mkfsOption struct {
	// value checks the option's value; nil means the option takes none.
	value func(string) error
}

// Patterns of option values, compiled at first use (matches): compiling
// them when the package initialises cost every nbd-csi process, CLI
// commands included, about 0.5 ms of start-up.
const (
	reNumber   = `^[0-9]+$`
	reSize     = `^[0-9]+[kmgtpsb]?$` // xfs sizes: bytes, k/m/g/t/p, sectors, blocks
	reWord     = `^[A-Za-z0-9_.-]+$`
	reFeatures = `^\^?[a-z0-9_]+(,\^?[a-z0-9_]+)*$`
	reLabel    = `^[^\x00-\x1f\x7f]{1,16}$`
	reUUID     = `^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|clear|random|time)$`
	reOwner    = `^[0-9]+:[0-9]+$`
)

// mkfsPatterns lists every pattern given to matches
// (TestMkfsPatternsCompile compiles them all).
var mkfsPatterns []string

func matches(pattern, what string) func(string) error {
	mkfsPatterns = append(mkfsPatterns, pattern)
	re := sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(pattern) })
	return func(v string) error {
		if !re().MatchString(v) {
			return fmt.Errorf("%s %q is not valid", what, v)
		}
		return nil
	}
}

func oneOf(vals ...string) func(string) error {
	return func(v string) error {
		for _, ok := range vals {
			if v == ok {
				return nil
			}
		}
		return fmt.Errorf("%q is not one of %s", v, strings.Join(vals, ", "))
	}
}

// subOptions checks a comma-separated list of key[=value] sub-options
// against allowed (key → value check; nil: the key takes no value).
func subOptions(allowed map[string]func(string) error) func(string) error {
	return func(v string) error {
		if v == "" {
			return fmt.Errorf("empty sub-option list")
		}
		for _, kv := range strings.Split(v, ",") {
			k, val, hasVal := strings.Cut(kv, "=")
			check, ok := allowed[k]
			if !ok {
				return fmt.Errorf("sub-option %q is not allowed (allowed: %s)", k, keys(allowed))
			}
			switch {
			case check == nil && hasVal:
				return fmt.Errorf("sub-option %q takes no value", k)
			case check != nil && !hasVal:
				return fmt.Errorf("sub-option %q needs a value", k)
			case check != nil:
				if err := check(val); err != nil {
					return fmt.Errorf("sub-option %q: %w", k, err)
				}
			}
		}
		return nil
	}
}

func keys(m map[string]func(string) error) string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

var (
	number  = matches(reNumber, "number")
	size    = matches(reSize, "size")
	boolean = oneOf("0", "1")
)

// ext4Options are the mke2fs options accepted for ext4.
var ext4Options = map[string]mkfsOption{
	"-b": {number}, // block size
	"-C": {number}, // cluster size (bigalloc)
	"-E": {subOptions(map[string]func(string) error{
		"stride": number, "stripe_width": number, "stripe-width": number, "resize": number,
		"lazy_itable_init": boolean, "lazy_journal_init": boolean, "packed_meta_blocks": boolean,
		"root_owner": matches(reOwner, "uid:gid"), "num_backup_sb": oneOf("0", "1", "2"),
		"discard": nil, "nodiscard": nil, "quotatype": matches(`^(usrquota|grpquota|prjquota)(:(usrquota|grpquota|prjquota))*$`, "quota types"),
		"encoding": matches(reWord, "encoding"), "encoding_flags": matches(reWord, "encoding flags"),
		"assume_storage_prezeroed": boolean,
	})},
	"-e": {oneOf("continue", "remount-ro", "panic")},
	"-G": {number}, // flex group size
	"-g": {number}, // blocks per group
	"-i": {number}, // bytes per inode
	"-I": {number}, // inode size
	"-j": {},       // journal
	// An internal journal only: never device= or location=.
	"-J": {subOptions(map[string]func(string) error{"size": number, "fast_commit_size": number})},
	"-L": {matches(reLabel, "label")},
	"-m": {matches(`^[0-9]+(\.[0-9]+)?$`, "percentage")},
	"-N": {number}, // number of inodes
	"-O": {matches(reFeatures, "feature list")},
	"-T": {matches(`^[a-z0-9_]+(,[a-z0-9_]+)*$`, "usage type")},
	"-U": {matches(reUUID, "UUID")},
	"-q": {},
	"-v": {},
	"-F": {},
	"-D": {},
}

// xfsOptions are the mkfs.xfs options accepted for xfs.
var xfsOptions = map[string]mkfsOption{
	"-b": {subOptions(map[string]func(string) error{"size": size})},
	"-d": {subOptions(map[string]func(string) error{ // never file, name or size
		"agcount": number, "agsize": size, "su": size, "sw": number, "sunit": number, "swidth": number,
		"noalign": nil, "sectsize": size, "cowextsize": number, "extszinherit": number,
	})},
	"-i": {subOptions(map[string]func(string) error{
		"size": size, "perblock": number, "maxpct": number, "align": boolean, "attr": oneOf("0", "1", "2"),
		"projid32bit": boolean, "sparse": boolean, "nrext64": boolean,
	})},
	"-l": {subOptions(map[string]func(string) error{ // never logdev, file or name: the log stays internal
		"size": size, "version": oneOf("1", "2"), "sunit": number, "su": size, "lazy-count": boolean,
		"internal": boolean, "agnum": number, "sectsize": size,
	})},
	"-m": {subOptions(map[string]func(string) error{
		"crc": boolean, "finobt": boolean, "uuid": matches(reUUID, "UUID"), "rmapbt": boolean, "reflink": boolean,
		"inobtcount": boolean, "bigtime": boolean,
	})},
	"-n": {subOptions(map[string]func(string) error{"size": size, "version": oneOf("2", "ci"), "ftype": boolean})},
	"-s": {subOptions(map[string]func(string) error{"size": size})},
	"-L": {matches(`^[^\x00-\x1f\x7f]{1,12}$`, "label (at most 12 characters)")},
	"-K": {},
	"-f": {},
	"-q": {},
}

// CheckMkfsOptions validates mkfs options for fsType against the allowlist;
// the error names the offending option.
func CheckMkfsOptions(fsType string, opts []string) error {
	var allowed map[string]mkfsOption
	switch fsType {
	case FSExt4:
		allowed = ext4Options
	case FSXFS:
		allowed = xfsOptions
	default:
		return fmt.Errorf("fsType %q is not supported (ext4 or xfs)", fsType)
	}
	for i := 0; i < len(opts); i++ {
		o := opts[i]
		spec, ok := allowed[o]
		if !ok {
			if strings.HasPrefix(o, "-") && len(o) > 2 {
				return fmt.Errorf("%s %q: give each option and its value as separate words (e.g. \"-b 4096\"); combined or attached forms are not accepted", KeyMkfsOptions, o)
			}
			if !strings.HasPrefix(o, "-") {
				return fmt.Errorf("%s %q: not an option (a bare word would be taken as the device or size)", KeyMkfsOptions, o)
			}
			return fmt.Errorf("%s %q is not allowed for %s: only options that shape the filesystem are (docs/parameters.md)", KeyMkfsOptions, o, fsType)
		}
		if spec.value == nil {
			continue
		}
		if i+1 == len(opts) {
			return fmt.Errorf("%s %q needs a value", KeyMkfsOptions, o)
		}
		i++
		if err := spec.value(opts[i]); err != nil {
			return fmt.Errorf("%s %s: %w", KeyMkfsOptions, o, err)
		}
	}
	return nil
}
