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
	if errors.As(err, &oe) || errors.Is(err, nbd.ErrBadURI) || errors.Is(err, nbd.ErrTLSRequired) || errors.Is(err, nbd.ErrTLSUnavailable) {
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
	if err := checkEncryption(p, req.GetVolumeCapabilities()); err != nil {
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
		VolumeName: name, VolumeID: volumeID(name), Server: p.server.String(), MinSize: claimSize(p, required),
		VolumeContext: p.volumeContext, Wipe: p.wipe,
		Fits: func(e *store.Export) bool {
			if ok, _ := path.Match(p.filter, e.Name); !ok {
				return false
			}
			if writer && e.ReadOnly {
				return false
			}
			return limit == 0 || e.Size-claimSize(p, 0) <= uint64(limit)
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
	capacity := usableSize(e.VolumeContext, e.Size)
	if limit > 0 && capacity > uint64(limit) {
		return nil, status.Errorf(codes.AlreadyExists, "volume %s exists with %d bytes, above the limit %d", name, capacity, limit)
	}
	logger(ctx).Info("Provisioned", "volume", e.VolumeID, "export", e.Name, "server", e.Server, "bytes", e.Size)
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId: e.VolumeID, CapacityBytes: int64(capacity), VolumeContext: e.VolumeContext,
	}}, nil
}

// DeleteVolume wipes the export when the StorageClass asked for it, then
// releases it. Unknown and static volumes succeed (nothing to release).
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
	if e.Wipe {
		u, err := nbd.ParseURI(e.VolumeContext[KeyURI])
		if err != nil {
			return nil, status.Errorf(codes.Internal, "recorded URI: %v", err)
		}
		tls, err := tlsFromSecrets(req.GetSecrets())
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		start := time.Now()
		if err := s.disc.Wipe(ctx, u, tls); err != nil {
			// Keep the claim: the next retry wipes again; the data must
			// never reach another tenant.
			return nil, statusError("wipe export "+e.Name, unavailable(err))
		}
		logger(ctx).Info("Wiped", "export", e.Name, "bytes", e.Size, "duration", time.Since(start))
	}
	if _, err := s.store.Release(id); err != nil {
		return nil, status.Errorf(codes.Internal, "release: %v", err)
	}
	logger(ctx).Info("Released", "export", e.Name, "server", e.Server)
	return &csi.DeleteVolumeResponse{}, nil
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
