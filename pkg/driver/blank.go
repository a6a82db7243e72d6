// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// A fresh volume is formatted without running blkid when IsBlank proves it
// blank, which saves a process per NodeStage. The proof: blkid's verdict
// is a function of the bytes it reads, and where those bytes are zero it
// reads exactly what it reads on an all-zero device of the same size (each
// read's offset depends only on the size and on bytes read before). So if
// every byte blkid reads on an all-zero device reads zero here, blkid
// would find nothing here either. blankRegions is a superset, with
// margins, of what blkid -p (libblkid 2.38: superblocks and partition
// tables, ZFS labels, RAID metadata at the end) reads on an all-zero
// device; TestBlankRegionsCoverBlkid checks that against the installed
// blkid with strace. Anything not proven blank (a non-zero byte, an
// error) goes to blkid as before.

// blankWholeDevice is the size up to which IsBlank reads all of it.
const blankWholeDevice = 8 << 20

// region is a byte range [off, off+n) of a device.
type region struct{ off, n int64 }

// blankRegions returns the ranges IsBlank reads on a device of size bytes,
// sorted, not overlapping, starting at multiples of 4096 and ending at
// multiples of 4096 or at size (so O_DIRECT can read them).
func blankRegions(size int64) []region {
	if size <= blankWholeDevice {
		return []region{{0, size}}
	}
	const k = 1 << 10
	down := func(x int64) int64 { return x &^ (4*k - 1) }
	rs := []region{
		{0, 576 * k},                  // every probe at the start, ZFS labels 0 and 1 (2 × 256 KiB)
		{1 << 20, 64 * k},             // UDF anchor (2 KiB blocks), VMFS volume
		{2 << 20, 64 * k},             // VMFS, LUKS2 secondary header
		{4 << 20, 64 * k},             // LUKS2 secondary header
		{down(size - 1600*k), 64 * k}, // Promise FastTrack (3087 sectors from the end)
	}
	// ZFS labels 2 and 3 (the last 512 KiB below size rounded down to
	// 256 KiB), MD 0.90/1.0, GPT backup, DDF, nilfs2, DRBD, the other RAID
	// formats: all within the last 832 KiB.
	rs = append(rs, region{down(size - 832*k), 0})
	rs[len(rs)-1].n = size - rs[len(rs)-1].off
	// Merge overlaps (only possible when size is small).
	out := rs[:1]
	for _, r := range rs[1:] {
		last := &out[len(out)-1]
		if r.off <= last.off+last.n {
			last.n = max(last.n, r.off+r.n-last.off)
			continue
		}
		out = append(out, r)
	}
	return out
}

// IsBlank reports whether the block device (or file) at path reads as
// zeroes in every region blkid would examine on a blank device of its
// size: then blkid would find no filesystem, partition table, LUKS header
// or other signature on it. false means "not proven blank" (ask blkid);
// an error means the device could not be read.
func IsBlank(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return false, err
	}
	if st.Mode()&os.ModeDevice != 0 {
		// Read the device, not the page cache (and no readahead).
		df, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			return false, err
		}
		defer df.Close()
		f = df
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return false, fmt.Errorf("size of %s: %w", path, err)
	}
	if size <= 0 {
		return false, fmt.Errorf("size of %s: %d bytes", path, size)
	}
	rs := blankRegions(size)
	blank := make([]bool, len(rs))
	errs := make([]error, len(rs))
	var wg sync.WaitGroup
	for i, r := range rs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			blank[i], errs[i] = zeroRange(f, r)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	for _, b := range blank {
		if !b {
			return false, nil
		}
	}
	return true, nil
}

// zeroBlock is what a blank stretch reads as.
var zeroBlock [64 << 10]byte

// zeroRange reads r from f and reports whether it is all zeroes. The
// buffer is page-aligned (O_DIRECT).
func zeroRange(f *os.File, r region) (bool, error) {
	const chunk = 256 << 10
	buf, err := unix.Mmap(-1, 0, int(min(r.n, chunk)+4095)&^4095, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err != nil {
		return false, err
	}
	defer unix.Munmap(buf)
	for done := int64(0); done < r.n; {
		n := min(r.n-done, chunk)
		b := buf[:n]
		got, err := f.ReadAt(b, r.off+done)
		if int64(got) != n {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return false, fmt.Errorf("%d bytes at %d: %w", n, r.off+done, err)
		}
		for len(b) > 0 {
			c := min(len(b), len(zeroBlock))
			if !bytes.Equal(b[:c], zeroBlock[:c]) {
				return false, nil
			}
			b = b[c:]
		}
		done += n
	}
	return true, nil
}
