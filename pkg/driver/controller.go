// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net/url"
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
	// Resolver resolves server names when identities are checked for
	// overlap (nil: net.DefaultResolver).
	Resolver nbd.Resolver
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
	scanned  map[string]time.Time // server identity → last successful scan
	scanLock map[string]*sync.Mutex
	// servers remembers each server seen in a request (by identity) with
	// the TLS material it came with (in memory only), for background scans.
	servers map[string]knownServer
	// endpoints maps each endpoint a known server resolved to (the
	// nbd.ResolveServer form) to the server's identity, to refuse a second
	// identity for an endpoint; seeded from the store's inventory once.
	endpoints map[string]string
	seed      sync.Once
}

// knownServer is a server to rescan in the background.
type knownServer struct {
	id  string
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
		scanned: map[string]time.Time{}, scanLock: map[string]*sync.Mutex{}, servers: map[string]knownServer{},
		endpoints: map[string]string{}}
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
				if err := s.scan(ctx, k.id, k.uri, k.tls, s.opts.ScanInterval/2); err != nil {
					logger(ctx).Error(err, "Background scan failed; the inventory keeps its last state", "server", k.uri.String())
				}
			}
		}
	}()
}

// Ready is the controller's part of Probe: the store must answer (its
// counters: constant time whatever the inventory's size).
func (s *ControllerService) Ready(context.Context) error {
	_, err := s.store.Stats()
	return err
}

// volumeID derives a dynamic volume's ID from its name, so that a retried
// CreateVolume maps to the same volume.
func volumeID(name string) string {
	h := sha256.Sum256([]byte(name))
	return DynamicVolumePrefix + hex.EncodeToString(h[:16])
}

// scan refreshes the inventory of the server with identity key (reached
// at server) when it is older than max (0: always).
func (s *ControllerService) scan(ctx context.Context, key string, server *nbd.URI, tls *nbd.TLSOptions, maxAge time.Duration) error {
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
	sctx, cancel := context.WithTimeout(ctx, s.opts.ScanTimeout)
	defer cancel()
	if err := s.checkEndpoints(sctx, key, server); err != nil {
		return err
	}
	s.mu.Lock()
	s.servers[key] = knownServer{id: key, uri: server, tls: tls}
	s.mu.Unlock()
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
// only if nothing is known about the server yet. An identity conflict and
// an inventory over budget are always fatal.
func (s *ControllerService) ensureInventory(ctx context.Context, p *poolParams, tls *nbd.TLSOptions) error {
	err := s.scan(ctx, p.id, p.server, tls, s.opts.ScanMaxAge)
	if err == nil {
		return nil
	}
	var ie *identityError
	if errors.As(err, &ie) || errors.Is(err, store.ErrBudget) {
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	all, serr := s.store.Exports()
	if serr == nil {
		for _, e := range all {
			if e.Server == p.id {
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
	if err := store.CheckName("volume name", name); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
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
	if err := checkAccessibility(req.GetAccessibilityRequirements()); err != nil {
		return nil, err
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
		VolumeName: name, VolumeID: volumeID(name), Server: p.id, MinSize: claimSize(p, required),
		VolumeContext: p.volumeContext, Wipe: p.wipe, KeepData: !p.wipe,
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
	case errors.Is(err, store.ErrInvalid):
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case err != nil:
		return nil, status.Errorf(codes.Internal, "claim: %v", err)
	}
	usable := usableSize(e.VolumeContext, e.Size)
	if limit > 0 && usable > uint64(limit) {
		return nil, status.Errorf(codes.AlreadyExists, "volume %s exists with %d bytes, above the limit %d", name, usable, limit)
	}
	logger(ctx).Info("Provisioned", "volume", e.VolumeID, "export", e.Name, "server", e.Server, "bytes", e.Size)
	return &csi.CreateVolumeResponse{Volume: csiVolume(ctx, e)}, nil
}

// csiVolume describes a provisioned volume, accessible from every node that
// can attach NBD devices (an export is reached over the network from any
// of them).
func csiVolume(ctx context.Context, e *store.Export) *csi.Volume {
	return &csi.Volume{VolumeId: e.VolumeID, CapacityBytes: capacity(ctx, e), VolumeContext: e.VolumeContext,
		AccessibleTopology: []*csi.Topology{{Segments: map[string]string{TopologyKeyCapable: TopologyCapable}}}}
}

// checkAccessibility refuses, with ResourceExhausted (the spec's code for
// topology constraints that cannot be met), a request whose requisite
// topologies include no nbd-capable segment: the volume would be accessible
// from none of them. No requisite means anywhere.
func checkAccessibility(req *csi.TopologyRequirement) error {
	requisite := req.GetRequisite()
	if len(requisite) == 0 {
		return nil
	}
	for _, t := range requisite {
		if t.GetSegments()[TopologyKeyCapable] == TopologyCapable {
			return nil
		}
	}
	return status.Errorf(codes.ResourceExhausted, "no requisite topology has %s=%s: NBD volumes are accessible only from nodes whose kernel can attach (requisite %v)",
		TopologyKeyCapable, TopologyCapable, requisite)
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

// capacity is an export's size as CSI's int64, clamped (and logged) for
// exports of 2^63 bytes or more.
func capacity(ctx context.Context, e *store.Export) int64 {
	return clampSize(ctx, "export "+e.Name+" of "+e.Server, usableSize(e.VolumeContext, e.Size))
}

// clampSize converts a byte count to int64, clamping at math.MaxInt64 and
// saying so.
func clampSize(ctx context.Context, what string, n uint64) int64 {
	if n > math.MaxInt64 {
		logger(ctx).Info("Size exceeds what CSI can express; reporting math.MaxInt64", "what", what, "bytes", n, "reported", int64(math.MaxInt64))
		return math.MaxInt64
	}
	return int64(n)
}

// addSize adds without wrapping (saturates at the uint64 maximum).
func addSize(a, b uint64) uint64 {
	if a > math.MaxUint64-b {
		return math.MaxUint64
	}
	return a + b
}

// identityError: one endpoint reached under two server identities.
type identityError struct {
	server, id, endpoint, other string
}

func (e *identityError) Error() string {
	return fmt.Sprintf("server %s (identity %s) reaches %s, which the server with identity %s also reaches: "+
		"NBD cannot tell whether they are one server, and one export must never be claimed twice; "+
		"name the server the same way in every StorageClass and PersistentVolume, or declare one serverID for both", e.server, e.id, e.endpoint, e.other)
}

// checkEndpoints resolves server and refuses it when an endpoint it
// reaches belongs to another known identity (e.g. nbd://localhost:P beside
// nbd://127.0.0.1:P, a symbolic link to a socket beside the socket). The
// identities recorded in the store are resolved once per process, so a
// restart does not forget them.
func (s *ControllerService) checkEndpoints(ctx context.Context, key string, server *nbd.URI) error {
	s.seed.Do(func() {
		if all, err := s.store.Exports(); err == nil {
			seen := map[string]bool{}
			for _, e := range all {
				if seen[e.Server] || e.Server == key {
					continue
				}
				seen[e.Server] = true
				if u := uriOfIdentity(e.Server); u != nil {
					if eps, err := nbd.ResolveServer(ctx, u, s.opts.Resolver); err == nil {
						s.mu.Lock()
						for _, ep := range eps {
							if _, taken := s.endpoints[ep]; !taken {
								s.endpoints[ep] = e.Server
							}
						}
						s.mu.Unlock()
					}
				}
			}
		}
	})
	eps, err := nbd.ResolveServer(ctx, server, s.opts.Resolver)
	if err != nil {
		// A name that does not resolve cannot be dialled either: the scan
		// fails at Discover, and claims keep to the inventory checked
		// when it last resolved.
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ep := range eps {
		if other, ok := s.endpoints[ep]; ok && other != key {
			return &identityError{server: server.String(), id: key, endpoint: ep, other: other}
		}
	}
	for _, ep := range eps {
		s.endpoints[ep] = key
	}
	return nil
}

// uriOfIdentity returns a URI reaching a derived server identity
// (tcp:HOST:PORT, unix:PATH), or nil for a declared one (id:NAME).
func uriOfIdentity(id string) *nbd.URI {
	var raw string
	switch {
	case strings.HasPrefix(id, "tcp:"):
		raw = "nbd://" + strings.TrimPrefix(id, "tcp:")
	case strings.HasPrefix(id, "unix:@"):
		raw = "nbd+unix:///?socket=" + url.QueryEscape("\x00"+strings.TrimPrefix(id, "unix:@"))
	case strings.HasPrefix(id, "unix:"):
		raw = "nbd+unix:///?socket=" + url.QueryEscape(strings.TrimPrefix(id, "unix:"))
	default:
		return nil
	}
	u, err := nbd.ParseURI(raw)
	if err != nil {
		return nil
	}
	return u
}

// staticExportIdentity is the export identity of a static volume's
// context: its declared serverID, else the identity of a known server its
// URI reaches (so nbd://localhost:P/e fences against a pool named
// nbd://127.0.0.1:P), else its URI's own.
func (s *ControllerService) staticExportIdentity(ctx context.Context, vc map[string]string) (string, error) {
	key, err := exportIdentity(vc)
	if err != nil || vc[KeyServerID] != "" {
		return key, err
	}
	p, _ := ParseVolumeContext(vc)
	rctx, cancel := context.WithTimeout(ctx, s.opts.ScanTimeout)
	defer cancel()
	eps, err := nbd.ResolveServer(rctx, p.URI, s.opts.Resolver)
	if err != nil {
		return key, nil // unresolvable now: its own identity
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	known := ""
	for _, ep := range eps {
		if id, ok := s.endpoints[ep]; ok {
			if known != "" && id != known {
				return "", &identityError{server: p.URI.String(), id: p.URI.ServerKey(), endpoint: ep, other: id + " and " + known}
			}
			known = id
		}
	}
	if known != "" {
		return nbd.JoinExportKey(known, p.URI.Export), nil
	}
	return key, nil
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
