// SPDX-License-Identifier: Apache-2.0

package driver

import "sync"

// inflight tracks the keys (volume IDs, target paths) that have an
// operation in progress, so that a second operation on the same key is
// refused with Aborted instead of racing the first. Operations on
// different keys run in parallel.
type inflight struct {
	mu   sync.Mutex
	keys map[string]struct{}
}

func newInflight() *inflight { return &inflight{keys: map[string]struct{}{}} }

// TryAcquire marks key busy and reports whether it was free.
func (i *inflight) TryAcquire(key string) bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	if _, busy := i.keys[key]; busy {
		return false
	}
	i.keys[key] = struct{}{}
	return true
}

// Release marks key free.
func (i *inflight) Release(key string) {
	i.mu.Lock()
	defer i.mu.Unlock()
	delete(i.keys, key)
}
