// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// DynamicVolumePrefix starts the IDs of volumes the controller provisioned;
// any other ID is a static volume (a hand-written PV).
const DynamicVolumePrefix = "nbdv-"

// ControllerOptions configure the controller service (flags of
// `nbd-csi serve`, docs/cli.md).
type ControllerOptions struct {
	// ScanMaxAge is how old a server's inventory may be before CreateVolume
	// and GetCapacity scan it again.
	ScanMaxAge time.Duration
	// ScanTimeout bounds one scan of a server.
	ScanTimeout time.Duration
	// ScanInterval is how often Start rescans every server it has seen, so
	// that exports that appear or vanish show in the inventory without a
	// request (0: no background scans).
	ScanInterval time.Duration
	// WipeBudget bounds the time one DeleteVolume spends wiping (default
	// 60s, and at most three quarters of the caller's deadline); one step
	// (nbd.WipeOptions.CheckpointBytes) always runs, so every call makes
	// progress. A wipe that needs longer saves its progress and returns
	// Aborted; the retried DeleteVolume continues where it stopped.
	WipeBudget time.Duration
	// Wipes, if set, is told about the progress of wipes (metrics).
	Wipes WipeObserver
}

// WipeObserver follows wipes, e.g. to export metrics.
type WipeObserver interface {
	// WipeProgress reports that a volume's export reads as zeroes below
	// wiped of size bytes.
	WipeProgress(volumeID string, wiped, size uint64)
	// WipeDone reports a finished wipe: bytes zeroed by requests and
	// bytes skipped because they already read as zeroes.
	WipeDone(volumeID string, zeroed, skipped uint64)
}

// ControllerService implements the CSI controller service: provisioning
// from export pools, fencing, inventory.
type ControllerService struct {
	csi.UnimplementedControllerServer
	opts    ControllerOptions
	store   store.Store
	disc    Discoverer
	volumes *inflight // volume names and IDs

	mu       sync.Mutex
	scanned  map[string]time.Time // server URI → last successful scan
	scanLock map[string]*sync.Mutex
	// servers remembers each server seen in a request with the TLS
	// material it came with (in memory only), for background scans.
	servers map[string]knownServer
}

// knownServer is a server to rescan in the background.
type knownServer struct {
	uri *nbd.URI
	tls *nbd.TLSOptions
}

var _ csi.ControllerServer = (*ControllerService)(nil)

// NewControllerService builds the controller service.
func NewControllerService(opts ControllerOptions, st store.Store, disc Discoverer) *ControllerService {
	if opts.ScanMaxAge <= 0 {
		opts.ScanMaxAge = time.Minute
	}
	if opts.ScanTimeout <= 0 {
		opts.ScanTimeout = 30 * time.Second
	}
	if opts.WipeBudget <= 0 {
		opts.WipeBudget = time.Minute
	}
	return &ControllerService{opts: opts, store: st, disc: disc, volumes: newInflight(),
		scanned: map[string]time.Time{}, scanLock: map[string]*sync.Mutex{}, servers: map[string]knownServer{}}
}

// Start rescans every server seen so far each ScanInterval until ctx ends.
func (s *ControllerService) Start(ctx context.Context) {
	if s.opts.ScanInterval <= 0 {
		return
	}
	go func() {
		t := time.NewTicker(s.opts.ScanInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			s.mu.Lock()
			known := make([]knownServer, 0, len(s.servers))
			for _, k := range s.servers {
				known = append(known, k)
			}
			s.mu.Unlock()
			for _, k := range known {
				if err := s.scan(ctx, k.uri, k.tls, s.opts.ScanInterval/2); err != nil {
					logger(ctx).Error(err, "Background scan failed; the inventory keeps its last state", "server", k.uri.String())
				}
			}
		}
	}()
}

// Ready is the controller's part of Probe: the store must answer.
func (s *ControllerService) Ready(context.Context) error {
	_, err := s.store.Exports()
	return err
}

// volumeID derives a dynamic volume's ID from its name, so that a retried
// CreateVolume maps to the same volume.
func volumeID(name string) string {
	h := sha256.Sum256([]byte(name))
	return DynamicVolumePrefix + hex.EncodeToString(h[:16])
}

// scan refreshes a server's inventory when it is older than max (0: always).
func (s *ControllerService) scan(ctx context.Context, server *nbd.URI, tls *nbd.TLSOptions, maxAge time.Duration) error {
	key := server.String()
	s.mu.Lock()
	l := s.scanLock[key]
	if l == nil {
		l = &sync.Mutex{}
		s.scanLock[key] = l
	}
	s.mu.Unlock()
	l.Lock()
	defer l.Unlock()
	s.mu.Lock()
	last := s.scanned[key]
	s.mu.Unlock()
	if maxAge > 0 && time.Since(last) < maxAge {
		return nil
	}
	s.mu.Lock()
	s.servers[key] = knownServer{uri: server, tls: tls}
	s.mu.Unlock()
	sctx, cancel := context.WithTimeout(ctx, s.opts.ScanTimeout)
	defer cancel()
	found, err := s.disc.Discover(sctx, server, tls)
	if err != nil {
		return err
	}
	now := time.Now()
	if err := s.store.SyncExports(key, found, now); err != nil {
		return err
	}
	s.mu.Lock()
	s.scanned[key] = now
	s.mu.Unlock()
	return nil
}

// ensureInventory scans when the inventory is stale; a failed scan is fatal
// only if nothing is known about the server yet.
func (s *ControllerService) ensureInventory(ctx context.Context, p *poolParams, tls *nbd.TLSOptions) error {
	err := s.scan(ctx, p.server, tls, s.opts.ScanMaxAge)
	if err == nil {
		return nil
	}
	all, serr := s.store.Exports()
	if serr == nil {
		for _, e := range all {
			if e.Server == p.server.String() {
				logger(ctx).Error(err, "Scan failed; using the last inventory", "server", e.Server)
				return nil
			}
		}
	}
	return statusError("scan server "+p.server.String(), unavailable(err))
}

// unavailable marks connection-level failures to a server as Unavailable.
func unavailable(err error) error {
	var oe *nbd.OptionError
	if errors.As(err, &oe) || errors.Is(err, nbd.ErrBadURI) || errors.Is(err, nbd.ErrBadArgument) ||
		errors.Is(err, nbd.ErrTLSRequired) || errors.Is(err, nbd.ErrTLSUnavailable) || errors.Is(err, nbd.ErrInventoryLimit) {
		return err
	}
	return status.Error(codes.Unavailable, err.Error())
}

// writable reports whether any capability writes.
func writable(caps []*csi.VolumeCapability) bool {
	for _, c := range caps {
		switch c.GetAccessMode().GetMode() {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		default:
			return true
		}
	}
	return false
}

// checkCapabilities validates capabilities for provisioning.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	for _, c := range caps {
		if _, err := parseCapability(c); err != nil {
			return err
		}
	}
	return nil
}

// checkMkfsForCapabilities validates the StorageClass's mkfsOptions for
// every filesystem the capabilities ask for; block-only volumes never run
// mkfs, so the options must suit ext4 or xfs.
func checkMkfsForCapabilities(raw string, caps []*csi.VolumeCapability) error {
	opts := strings.Fields(raw)
	if len(opts) == 0 {
		return nil
	}
	mounted := false
	for _, vc := range caps {
		if m := vc.GetMount(); m != nil {
			mounted = true
			fs := m.GetFsType()
			if fs == "" {
				fs = DefaultFSType
			}
			if err := CheckMkfsOptions(fs, opts); err != nil {
				return err
			}
		}
	}
	if mounted {
		return nil
	}
	if err := CheckMkfsOptions(FSExt4, opts); err != nil {
		if xerr := CheckMkfsOptions(FSXFS, opts); xerr != nil {
			return err
		}
	}
	return nil
}

// CreateVolume claims the smallest available export of the StorageClass's
// server that fits the request. Retries with the same name return the same
// export.
func (s *ControllerService) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume name is required")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	if req.GetVolumeContentSource() != nil {
		return nil, status.Error(codes.InvalidArgument, "volume content sources (snapshots, clones) are not supported: NBD exports are provisioned, not copied")
	}
	p, err := parsePoolParams(req.GetParameters())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := checkMkfsForCapabilities(p.nodeContext[KeyMkfsOptions], req.GetVolumeCapabilities()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	tls, err := tlsFromSecrets(req.GetSecrets())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	required, limit := req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes()
	if required < 0 || limit < 0 || (limit > 0 && limit < required) {
		return nil, status.Errorf(codes.InvalidArgument, "capacity range required=%d limit=%d is invalid", required, limit)
	}
	if !s.volumes.TryAcquire(name) {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %s is already in progress", name)
	}
	defer s.volumes.Release(name)
	if err := s.ensureInventory(ctx, p, tls); err != nil {
		return nil, err
	}
	writer := writable(req.GetVolumeCapabilities())
	e, err := s.store.Claim(store.ClaimRequest{
		VolumeName: name, VolumeID: volumeID(name), Server: p.server.String(), MinSize: uint64(required),
		VolumeContext: p.volumeContext, Wipe: p.wipe, KeepData: !p.wipe,
		Fits: func(e *store.Export) bool {
			if ok, _ := path.Match(p.filter, e.Name); !ok {
				return false
			}
			if writer && e.ReadOnly {
				return false
			}
			return limit == 0 || e.Size <= uint64(limit)
		},
	})
	var ce *store.CapacityError
	switch {
	case errors.As(err, &ce) && ce.Free == 0:
		return nil, status.Errorf(codes.ResourceExhausted, "no available export on %s matches (filter %q, writable=%v): all are claimed, missing or read-only", p.server, p.filter, writer)
	case errors.As(err, &ce):
		return nil, status.Errorf(codes.OutOfRange, "no available export on %s has %d bytes; the largest free one has %d (of %d free)", p.server, required, ce.LargestFree, ce.Free)
	case errors.Is(err, store.ErrConflict):
		return nil, status.Error(codes.AlreadyExists, err.Error())
	case err != nil:
		return nil, status.Errorf(codes.Internal, "claim: %v", err)
	}
	if limit > 0 && e.Size > uint64(limit) {
		return nil, status.Errorf(codes.AlreadyExists, "volume %s exists with %d bytes, above the limit %d", name, e.Size, limit)
	}
	logger(ctx).Info("Provisioned", "volume", e.VolumeID, "export", e.Name, "server", e.Server, "bytes", e.Size)
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId: e.VolumeID, CapacityBytes: int64(e.Size), VolumeContext: e.VolumeContext,
	}}, nil
}

// DeleteVolume wipes the export unless the StorageClass opted out
// (wipeOnDelete: "false"), then releases it. Unknown and static volumes
// succeed (nothing to release).
//
// The export stays Bound to the volume until its wipe has finished, so no
// claim can get it earlier, also when the controller restarts mid-wipe. A
// wipe runs for at most WipeBudget per call and records its progress in the
// store; when it needs longer, DeleteVolume returns Aborted and the retry
// continues from the recorded offset.
func (s *ControllerService) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	if !s.volumes.TryAcquire(id) {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %s is already in progress", id)
	}
	defer s.volumes.Release(id)
	e, err := s.store.Volume(id)
	if errors.Is(err, store.ErrNotFound) {
		return &csi.DeleteVolumeResponse{}, nil
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "look up volume: %v", err)
	}
	if holders, err := s.store.Holders(id); err == nil && len(holders) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is still published to node %s", id, holders[0].NodeID)
	}
	if e.KeepData {
		logger(ctx).Info("Releasing without a wipe: the StorageClass set wipeOnDelete to false", "volume", id, "export", e.Name, "server", e.Server)
	} else if err := s.wipe(ctx, req, e); err != nil {
		// Keep the claim: the next retry continues the wipe; the data
		// must never reach another tenant.
		return nil, err
	}
	if _, err := s.store.Release(id); err != nil {
		return nil, status.Errorf(codes.Internal, "release: %v", err)
	}
	logger(ctx).Info("Released", "volume", id, "export", e.Name, "server", e.Server)
	return &csi.DeleteVolumeResponse{}, nil
}

// wipe zeroes a deleted volume's export within the wipe budget, from where
// an earlier attempt stopped. It returns nil only when the whole export
// reads as zeroes.
func (s *ControllerService) wipe(ctx context.Context, req *csi.DeleteVolumeRequest, e *store.Export) error {
	id := e.VolumeID
	u, err := nbd.ParseURI(e.VolumeContext[KeyURI])
	if err != nil {
		return status.Errorf(codes.Internal, "recorded URI of volume %s: %v", id, err)
	}
	tls, err := tlsFromSecrets(req.GetSecrets())
	if err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	budget := s.opts.WipeBudget
	if dl, ok := ctx.Deadline(); ok {
		budget = min(budget, time.Until(dl)*3/4)
	}
	log := logger(ctx).WithValues("volume", id, "export", e.Name, "server", e.Server)
	if e.WipedTo > 0 {
		log.Info("Continuing wipe", "wipedTo", e.WipedTo, "bytes", e.Size)
	}
	start := time.Now()
	res, err := s.disc.Wipe(ctx, u, tls, nbd.WipeOptions{From: e.WipedTo, Until: start.Add(budget),
		Checkpoint: func(next uint64) error {
			if s.opts.Wipes != nil {
				s.opts.Wipes.WipeProgress(id, next, e.Size)
			}
			return s.store.WipeProgress(id, next)
		}})
	if err != nil {
		log.Error(err, "Wipe failed; the export stays claimed and DeleteVolume continues from the last checkpoint", "wipedTo", res.Next)
		if errors.Is(err, nbd.ErrUnknownExport) {
			// Not NotFound: the volume exists, its export is away.
			return status.Errorf(codes.FailedPrecondition, "wipe export %s: the server no longer has it; the claim is kept until it returns and is wiped: %v", e.Name, err)
		}
		return statusError("wipe export "+e.Name, unavailable(err))
	}
	if !res.Done() {
		log.Info("Wipe in progress", "wipedTo", res.Next, "bytes", res.Size, "zeroed", res.Zeroed, "skipped", res.Skipped, "duration", time.Since(start))
		return status.Errorf(codes.Aborted, "wipe of export %s in progress: %d of %d bytes read as zeroes; a retried DeleteVolume continues from there", e.Name, res.Next, res.Size)
	}
	if s.opts.Wipes != nil {
		s.opts.Wipes.WipeDone(id, res.Zeroed, res.Skipped)
	}
	log.Info("Wiped", "bytes", res.Size, "zeroed", res.Zeroed, "skipped", res.Skipped, "method", res.Method,
		"allocationAware", res.AllocationAware, "duration", time.Since(start))
	return nil
}

// isDynamic reports whether the controller made the volume ID.
func isDynamic(id string) bool { return strings.HasPrefix(id, DynamicVolumePrefix) }

// lookupVolume returns the record of a dynamic volume (NotFound if there is
// none) or nil for a static one.
func (s *ControllerService) lookupVolume(id string) (*store.Export, error) {
	e, err := s.store.Volume(id)
	switch {
	case err == nil:
		return e, nil
	case errors.Is(err, store.ErrNotFound) && isDynamic(id):
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist", id)
	case errors.Is(err, store.ErrNotFound):
		return nil, nil // possibly static: the caller decides
	}
	return nil, status.Errorf(codes.Internal, "look up volume: %v", err)
}
