// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"errors"
	"sync"
	"time"
)

// adoptParallel bounds how many volumes are adopted at once.
const adoptParallel = 8

// Start rebuilds the node's knowledge after a (re)start and then looks for
// orphans until ctx ends. It returns at once: the plugin serves CSI while
// this runs in the background.
//
//   - every state record whose device is still attached is adopted (a few
//     at a time): its connection is supervised again (reconnects, health);
//     the attacher reconnects in the background for as long as the
//     server does not answer;
//   - a device of ours with no state record and no mount is reported, and
//     detached once it has stayed that way for OrphanGracePeriod (a stage
//     in progress writes its record right after attaching, so it is never
//     an orphan for long).
//
// Devices with a record keep serving throughout; nothing here touches them.
func (s *NodeService) Start(ctx context.Context) {
	log := logger(ctx).WithName("recover")
	recs, errs := s.state.List()
	for _, err := range errs {
		log.Error(err, "Unreadable state record")
	}
	// Every volume to adopt is marked busy before Start returns (before
	// the node serves): an RPC on it gets Aborted until its adoption has
	// begun, instead of finding no supervision yet.
	var specs []AttachSpec
	for _, r := range recs {
		params, err := ParseVolumeContext(r.VolumeContext)
		if err != nil {
			log.Error(err, "State record with an invalid volume context", "volumeID", r.VolumeID)
			continue
		}
		if !s.volumes.TryAcquire(r.VolumeID) {
			continue // an operation on it is already running: it sees to the device
		}
		specs = append(specs, AttachSpec{VolumeID: r.VolumeID, URI: params.URI, Connections: params.Connections,
			Timeout: params.Timeout, DeadConnTimeout: params.DeadConnTimeout, BlockSize: params.BlockSize, TLSMode: params.TLSMode, ReadOnly: r.ReadOnly})
	}
	go func() {
		s.adoptAll(ctx, specs)
		if s.opts.OrphanGracePeriod > 0 {
			s.orphanLoop(ctx)
		}
	}()
}

// adoptAll adopts the devices of specs, adoptParallel at a time, releasing
// each volume's operation lock (taken by Start) once its adoption began.
func (s *NodeService) adoptAll(ctx context.Context, specs []AttachSpec) {
	log := logger(ctx).WithName("recover")
	sem := make(chan struct{}, adoptParallel)
	var wg sync.WaitGroup
	for i, spec := range specs {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			for _, rest := range specs[i:] {
				s.volumes.Release(rest.VolumeID)
			}
			wg.Wait()
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			err := s.attacher.Adopt(ctx, spec)
			s.volumes.Release(spec.VolumeID)
			switch {
			case err == nil:
				log.Info("Adopted attached volume; supervision resumed (dead connections are replaced in the background)", "volumeID", spec.VolumeID)
			case errors.Is(err, ErrNotAttached):
				log.Info("Staged volume has no device (node rebooted?); it is re-attached when next published or staged", "volumeID", spec.VolumeID)
			default:
				log.Error(err, "Adopting volume", "volumeID", spec.VolumeID)
			}
		}()
	}
	wg.Wait()
}

func (s *NodeService) orphanLoop(ctx context.Context) {
	seen := map[string]time.Time{}
	interval := min(s.opts.OrphanGracePeriod/2, time.Minute)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		s.sweepOrphans(ctx, seen, time.Now())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sweepOrphans detaches devices that have been orphans for the grace period.
func (s *NodeService) sweepOrphans(ctx context.Context, seen map[string]time.Time, now time.Time) {
	log := logger(ctx).WithName("orphans")
	atts, err := s.attacher.List(ctx)
	if err != nil {
		log.Error(err, "Listing devices")
		return
	}
	mps, err := s.mounter.List()
	if err != nil {
		log.Error(err, "Listing mounts")
		return
	}
	mounted := map[string]bool{}
	for _, mp := range mps {
		mounted[mp.Device] = true
	}
	current := map[string]bool{}
	for _, a := range atts {
		if _, err := s.state.Get(a.VolumeID); !errors.Is(err, errNoRecord) || mounted[a.Device] {
			continue
		}
		if s.enc != nil && mounted[s.enc.Path(a.VolumeID)] {
			continue // an encrypted volume's mapping is mounted
		}
		current[a.VolumeID] = true
		first, ok := seen[a.VolumeID]
		if !ok {
			seen[a.VolumeID] = now
			log.Info("Device of ours with no state record and no mount; detaching it after the grace period",
				"volumeID", a.VolumeID, "device", a.Device, "gracePeriod", s.opts.OrphanGracePeriod)
			continue
		}
		if now.Sub(first) < s.opts.OrphanGracePeriod || !s.volumes.TryAcquire(a.VolumeID) {
			continue
		}
		// An orphan's LUKS mapping (nothing mounts it) closes first; a
		// mapping in use keeps the device (close fails as busy).
		err := s.closeEncrypted(ctx, a.VolumeID)
		if err == nil {
			err = s.attacher.Detach(ctx, a.VolumeID)
		}
		s.volumes.Release(a.VolumeID)
		if err != nil {
			log.Error(err, "Detaching orphan", "volumeID", a.VolumeID, "device", a.Device)
			continue
		}
		log.Info("Detached orphan device", "volumeID", a.VolumeID, "device", a.Device)
		delete(seen, a.VolumeID)
	}
	for id := range seen {
		if !current[id] {
			delete(seen, id)
		}
	}
}
