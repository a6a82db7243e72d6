// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"time"
)

// orphanSweeps keeps the sweep state of SweepOrphansForTest across calls.
var orphanSweeps = map[*NodeService]map[string]time.Time{}

// SweepOrphansForTest runs one orphan sweep at the given time.
func (s *NodeService) SweepOrphansForTest(ctx context.Context, now time.Time) {
	seen, ok := orphanSweeps[s]
	if !ok {
		seen = map[string]time.Time{}
		orphanSweeps[s] = seen
	}
	s.sweepOrphans(ctx, seen, now)
}
