// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// WipeOptions control Wipe.
type WipeOptions struct {
	// From is where to start: everything below it already reads as zeroes
	// (a checkpoint of an earlier, interrupted wipe).
	From uint64
	// Until, if set, is when to stop starting new steps (the first step
	// always runs, so every call makes progress): Wipe then returns with
	// Next below the export size and no error, and the caller resumes from
	// Next later.
	Until time.Time
	// Checkpoint, if set, is called with an offset below which the export
	// reads as zeroes durably (after a FLUSH when the export has one), at
	// least every CheckpointBytes of progress and at the end. An error
	// from it stops the wipe.
	Checkpoint func(next uint64) error
	// CheckpointBytes is the step (default 256 MiB, at least 4 MiB, at
	// most 1 GiB): one BLOCK_STATUS request covers at most a step, Until
	// is looked at after each, and a checkpoint follows every step of
	// bytes zeroed or four steps covered.
	CheckpointBytes uint64
	// IgnoreAllocation zeroes every byte, even where base:allocation says
	// the export already reads as zeroes (for comparison in benchmarks).
	IgnoreAllocation bool
}

// WipeMethod says how ranges were zeroed.
type WipeMethod string

// Wipe methods, fastest first.
const (
	// WipeFastZero: NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO.
	WipeFastZero WipeMethod = "write-zeroes-fast"
	// WipeWriteZeroes: NBD_CMD_WRITE_ZEROES (the server may punch holes).
	WipeWriteZeroes WipeMethod = "write-zeroes"
	// WipeWrite: NBD_CMD_WRITE of zero buffers.
	WipeWrite WipeMethod = "write"
)

// WipeResult reports what Wipe did.
type WipeResult struct {
	// Next is the offset below which the export reads as zeroes; it equals
	// Size when the wipe is complete.
	Next uint64
	// Size is the export size.
	Size uint64
	// Zeroed counts the bytes zeroed by requests; Skipped the bytes
	// base:allocation reported as reading as zeroes already.
	Zeroed, Skipped uint64
	// Method is the slowest method that had to be used.
	Method WipeMethod
	// AllocationAware is true when base:allocation guided the wipe.
	AllocationAware bool
}

// Done reports whether the whole export reads as zeroes.
func (r WipeResult) Done() bool { return r.Next >= r.Size }

// Limits of one wipe step.
const (
	// wipeMinStep and wipeMaxStep bound one step: one BLOCK_STATUS
	// request, the zeroing of what it reports, a checkpoint.
	wipeMinStep = 4 << 20
	wipeMaxStep = 1 << 30
	// wipeZeroPiece is the largest WRITE_ZEROES request.
	wipeZeroPiece = 256 << 20
	// wipeWritePiece is the largest WRITE of zeroes (below every server's
	// default maximum payload).
	wipeWritePiece = 4 << 20
	// wipeInFlight bounds requests in flight during a wipe.
	wipeInFlight = 8
)

// Wipe makes the export of a userspace-profile connection read as zeroes
// from opts.From to its end. It zeroes only what can hold data: where the
// export negotiated base:allocation, ranges the server reports as reading
// as zeroes are skipped. It zeroes with WRITE_ZEROES and FAST_ZERO when the
// export has both, falls back to plain WRITE_ZEROES when a fast zero is
// refused (the server may then punch holes or write), and to writing zero
// buffers when the export has no WRITE_ZEROES. TRIM is never used: its
// contents are undefined afterwards.
//
// Wipe stops early, without error, at opts.Until; Result.Next says where to
// resume. Progress is durable at each checkpoint.
func (c *Conn) Wipe(ctx context.Context, opts WipeOptions) (WipeResult, error) {
	info := c.info
	res := WipeResult{Next: opts.From, Size: info.Size, Method: WipeFastZero}
	if c.tx == nil {
		return res, fmt.Errorf("%w: wiping needs a userspace-profile connection", ErrBadArgument)
	}
	if info.ReadOnly() {
		return res, fmt.Errorf("%w: export %q is read-only and cannot be wiped", ErrNotSupportedByExport, info.Name)
	}
	if res.Next > info.Size {
		res.Next = info.Size
	}
	if m := uint64(info.BlockSizes.Minimum); info.BlockSizesAdvertised && m > 1 {
		res.Next -= res.Next % m // resume on a block boundary
	}
	step := opts.CheckpointBytes
	if step == 0 {
		step = 256 << 20
	}
	step = min(max(step, wipeMinStep), wipeMaxStep)
	_, hasAlloc := info.MetaContexts[nbdproto.MetaBaseAllocation]
	res.AllocationAware = hasAlloc && !opts.IgnoreAllocation
	z := &zeroer{c: c, method: WipeWrite}
	if info.Flags.Has(FlagSendWriteZeroes) {
		z.method = WipeWriteZeroes
		if info.Flags.Has(FlagSendFastZero) {
			z.method = WipeFastZero
		}
	}
	last, dirty := res.Next, uint64(0)
	for first := true; res.Next < info.Size; first = false {
		// At least one step per call, so that every call makes progress.
		if !first && !opts.Until.IsZero() && !time.Now().Before(opts.Until) {
			break
		}
		span := min(step, info.Size-res.Next)
		ranges := [][2]uint64{{res.Next, res.Next + span}}
		if res.AllocationAware {
			var covered uint64
			var err error
			ranges, covered, err = c.dataRanges(ctx, res.Next, span)
			if err != nil {
				return res, fmt.Errorf("block status at %d: %w", res.Next, err)
			}
			span = covered
		}
		var zeroed uint64
		for _, r := range ranges {
			zeroed += r[1] - r[0]
		}
		if err := z.zero(ctx, ranges); err != nil {
			return res, fmt.Errorf("zero in [%d, %d): %w", res.Next, res.Next+span, err)
		}
		res.Zeroed += zeroed
		res.Skipped += span - zeroed
		res.Next += span
		// Checkpoint after step bytes zeroed, or 4 steps covered, or at
		// the end; a checkpoint with nothing zeroed since the last one
		// needs no FLUSH.
		dirty += zeroed
		if dirty >= step || res.Next-last >= 4*step || res.Next == info.Size {
			if err := c.checkpoint(ctx, opts.Checkpoint, res.Next, dirty > 0); err != nil {
				return res, err
			}
			dirty, last = 0, res.Next
		}
	}
	if res.Next != last {
		if err := c.checkpoint(ctx, opts.Checkpoint, res.Next, dirty > 0); err != nil {
			return res, err
		}
	}
	res.Method = z.method
	return res, nil
}

// checkpoint flushes and reports progress.
func (c *Conn) checkpoint(ctx context.Context, fn func(uint64) error, next uint64, flush bool) error {
	if flush && c.info.Flags.Has(FlagSendFlush) {
		if err := c.Flush(ctx); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	}
	if fn != nil {
		if err := fn(next); err != nil {
			return fmt.Errorf("checkpoint at %d: %w", next, err)
		}
	}
	return nil
}

// dataRanges asks base:allocation about [off, off+span) and returns the
// ranges that may hold data (everything not flagged as reading as zeroes)
// within the part the server described, which is covered bytes from off.
func (c *Conn) dataRanges(ctx context.Context, off, span uint64) ([][2]uint64, uint64, error) {
	ext, err := c.BlockStatus(ctx, nbdproto.MetaBaseAllocation, off, uint32(min(span, 0xffffffff)), 0)
	if err != nil {
		return nil, 0, err
	}
	var out [][2]uint64
	pos, end := off, off+span
	for _, e := range ext {
		if pos >= end {
			break
		}
		next := min(pos+uint64(e.Length), end)
		if e.Flags&nbdproto.StateZero == 0 {
			if n := len(out); n > 0 && out[n-1][1] == pos {
				out[n-1][1] = next
			} else {
				out = append(out, [2]uint64{pos, next})
			}
		}
		pos = next
	}
	if pos == off {
		return nil, 0, protocolErrorf("block status at %d described no bytes", off)
	}
	return out, pos - off, nil
}

// zeroer zeroes ranges with the fastest method the export takes, keeping
// several requests in flight.
type zeroer struct {
	c      *Conn
	method WipeMethod
	buf    []byte
}

// zero makes the ranges (ascending, disjoint) read as zeroes, all their
// requests pipelined together.
func (z *zeroer) zero(ctx context.Context, ranges [][2]uint64) error {
	for len(ranges) > 0 {
		piece := uint64(wipeZeroPiece)
		if z.method == WipeWrite {
			piece = min(uint64(wipeWritePiece), uint64(maxPayload(&z.c.info)))
			if m := uint64(z.c.info.BlockSizes.Minimum); z.c.info.BlockSizesAdvertised && m > 1 {
				piece -= piece % m
			}
			if z.buf == nil {
				z.buf = make([]byte, piece)
			}
		}
		var pieces [][2]uint64
		for _, r := range ranges {
			for off := r[0]; off < r[1]; off += piece {
				pieces = append(pieces, [2]uint64{off, min(off+piece, r[1])})
			}
		}
		failedAt, err := z.run(ctx, pieces)
		if err == nil {
			return nil
		}
		if z.method != WipeFastZero || !errors.Is(err, ErrUnsupported) {
			return err
		}
		// The server says zeroing is not fast here: let it zero the slow
		// way, which still costs no network payload, from where the
		// first refusal was.
		z.method = WipeWriteZeroes
		var rest [][2]uint64
		for _, r := range ranges {
			if r[1] > failedAt {
				rest = append(rest, [2]uint64{max(r[0], failedAt), r[1]})
			}
		}
		ranges = rest
	}
	return nil
}

// run issues the requests for the pieces, wipeInFlight at a time. On error
// it returns the start of the first piece that failed (everything below it
// succeeded), and the server's error rather than the cancellations it
// caused.
func (z *zeroer) run(parent context.Context, pieces [][2]uint64) (uint64, error) {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	sem := make(chan struct{}, wipeInFlight)
	var mu sync.Mutex
	var wg sync.WaitGroup
	end := pieces[len(pieces)-1][1]
	failedAt, cause := end, error(nil)
	for _, p := range pieces {
		if ctx.Err() != nil {
			break
		}
		off, n := p[0], p[1]-p[0]
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			continue
		}
		wg.Add(1)
		go func(off, n uint64) {
			defer wg.Done()
			defer func() { <-sem }()
			var err error
			switch z.method {
			case WipeFastZero:
				err = z.c.WriteZeroes(ctx, off, uint32(n), CmdFastZero)
			case WipeWriteZeroes:
				err = z.c.WriteZeroes(ctx, off, uint32(n), 0)
			default:
				err = z.c.WriteAt(ctx, z.buf[:n], off, 0)
			}
			if err == nil {
				return
			}
			mu.Lock()
			failedAt = min(failedAt, off)
			if cause == nil && !errors.Is(err, context.Canceled) {
				cause = err
			}
			mu.Unlock()
			cancel()
		}(off, n)
	}
	wg.Wait()
	if err := parent.Err(); err != nil {
		return pieces[0][0], err
	}
	if cause != nil {
		return failedAt, cause
	}
	if failedAt < end {
		return failedAt, context.Canceled
	}
	return end, nil
}
