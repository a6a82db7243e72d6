// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"errors"
	"path"
	"sort"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// ControllerGetCapabilities lists the controller capabilities.
func (s *ControllerService) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, c := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES_PUBLISHED_NODES,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_PUBLISH_READONLY,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: c}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// ControllerPublishVolume records that a node holds the volume. A writer
// holds it alone: a second node gets FailedPrecondition naming the holder.
// Read-only holders may be many. Static volumes are fenced the same way.
func (s *ControllerService) ControllerPublishVolume(ctx context.Context, req *csi.ControllerPublishVolumeRequest) (*csi.ControllerPublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	if id == "" || node == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID and node ID are required")
	}
	c, err := parseCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	if err := errors.Join(store.CheckName("volume ID", id), store.CheckName("node ID", node)); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	e, err := s.lookupVolume(id)
	if err != nil {
		return nil, err
	}
	// Fencing is by export: every volume naming one export (dynamic or
	// static, whatever the spelling of its server) shares one identity.
	var export string
	if e == nil {
		// A static volume (a hand-written PV) is known by its volume
		// context; an ID with neither a record nor a URI does not exist.
		if _, perr := ParseVolumeContext(req.GetVolumeContext()); perr != nil {
			return nil, status.Errorf(codes.NotFound, "volume %s does not exist (no provisioned volume, and no valid static volume context: %v)", id, perr)
		}
		if export, err = s.staticExportIdentity(ctx, req.GetVolumeContext()); err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s: %v", id, err)
		}
	} else {
		export = store.ExportKey(store.ServerIdentity(e.Server), e.Name)
	}
	readOnly := req.GetReadonly() || c.readOnly
	if e != nil && e.ReadOnly && !readOnly {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s is a read-only export and cannot be published read-write", id)
	}
	if !s.volumes.TryAcquire(id) {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %s is already in progress", id)
	}
	defer s.volumes.Release(id)
	err = s.store.Publish(store.Attachment{VolumeID: id, NodeID: node, ReadOnly: readOnly, Export: export})
	var he *store.HeldError
	switch {
	case errors.As(err, &he) && he.Holder != "" && he.Holder != id:
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s names an export that volume %s holds on node %s: an NBD export can have one writing node", id, he.Holder, he.NodeID)
	case errors.As(err, &he):
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is held by node %s: an NBD export can have one writing node", id, he.NodeID)
	case errors.Is(err, store.ErrConflict):
		return nil, status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, store.ErrInvalid):
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case err != nil:
		return nil, status.Errorf(codes.Internal, "record publish: %v", err)
	}
	logger(ctx).V(2).Info("Published to node", "node", node, "readOnly", readOnly)
	return &csi.ControllerPublishVolumeResponse{}, nil
}

// ControllerUnpublishVolume forgets a holder; repeating it is fine.
func (s *ControllerService) ControllerUnpublishVolume(ctx context.Context, req *csi.ControllerUnpublishVolumeRequest) (*csi.ControllerUnpublishVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	if !s.volumes.TryAcquire(id) {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %s is already in progress", id)
	}
	defer s.volumes.Release(id)
	node := req.GetNodeId()
	if node == "" {
		// No node: unpublish from every node (CSI spec).
		holders, err := s.store.Holders(id)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "holders: %v", err)
		}
		for _, h := range holders {
			if err := s.store.Unpublish(id, h.NodeID); err != nil {
				return nil, status.Errorf(codes.Internal, "record unpublish: %v", err)
			}
		}
		return &csi.ControllerUnpublishVolumeResponse{}, nil
	}
	if err := s.store.Unpublish(id, node); err != nil {
		return nil, status.Errorf(codes.Internal, "record unpublish: %v", err)
	}
	return &csi.ControllerUnpublishVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities a volume supports:
// every single-node and reader-only mode, block and ext4/xfs, and no
// writers for a read-only export.
func (s *ControllerService) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	e, err := s.existingVolume(id)
	if err != nil {
		return nil, err
	}
	for _, c := range req.GetVolumeCapabilities() {
		if _, err := parseCapability(c); err != nil {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
		}
	}
	if e.ReadOnly && writable(req.GetVolumeCapabilities()) {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: "the export is read-only"}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext: req.GetVolumeContext(), VolumeCapabilities: req.GetVolumeCapabilities(), Parameters: req.GetParameters(),
	}}, nil
}

// ListVolumes lists the provisioned volumes in volume ID order. The
// starting token is the position in that order.
func (s *ControllerService) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	all, err := s.store.Exports()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list: %v", err)
	}
	var vols []store.Export
	for _, e := range all {
		if e.VolumeID != "" {
			vols = append(vols, e)
		}
	}
	sort.Slice(vols, func(i, j int) bool { return vols[i].VolumeID < vols[j].VolumeID })
	start := 0
	if t := req.GetStartingToken(); t != "" {
		n, err := strconv.Atoi(t)
		if err != nil || n < 0 || n > len(vols) {
			return nil, status.Errorf(codes.Aborted, "starting token %q is not valid", t)
		}
		start = n
	}
	end := len(vols)
	if m := int(req.GetMaxEntries()); m > 0 && start+m < end {
		end = start + m
	}
	resp := &csi.ListVolumesResponse{}
	for _, e := range vols[start:end] {
		nodes, err := s.nodeIDs(e.VolumeID)
		if err != nil {
			return nil, err
		}
		st := &csi.ListVolumesResponse_VolumeStatus{PublishedNodeIds: nodes}
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{
			Volume: csiVolume(ctx, &e),
			Status: st,
		})
	}
	if end < len(vols) {
		resp.NextToken = strconv.Itoa(end)
	}
	return resp, nil
}

// GetCapacity reports the free capacity of a StorageClass's pool (the sum
// of its available fitting exports) and the largest volume it can make.
// Without parameters it sums every available export known.
func (s *ControllerService) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	for _, c := range req.GetVolumeCapabilities() {
		if _, err := parseCapability(c); err != nil {
			return nil, err
		}
	}
	var p *poolParams
	if len(req.GetParameters()) > 0 {
		var err error
		if p, err = parsePoolParams(req.GetParameters()); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		if err := s.ensureInventory(ctx, p, nil); err != nil {
			return nil, err
		}
	}
	all, err := s.store.Exports()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list: %v", err)
	}
	writer := writable(req.GetVolumeCapabilities())
	var total, largest uint64
	for _, e := range all {
		if e.Phase != store.PhaseAvailable || (writer && e.ReadOnly) {
			continue
		}
		if p != nil {
			if ok, _ := path.Match(p.filter, e.Name); !ok || e.Server != p.id {
				continue
			}
		}
		size := e.Size
		if p != nil && p.encrypted() {
			// What an encrypted volume on the export can offer: its
			// size less the LUKS2 header (CreateVolume claims as much).
			if size = usableSize(map[string]string{KeyEncrypted: "true"}, size); size == 0 {
				continue
			}
		}
		total = addSize(total, size)
		largest = max(largest, size)
	}
	resp := &csi.GetCapacityResponse{AvailableCapacity: clampSize(ctx, "available capacity", total)}
	resp.MaximumVolumeSize = wrapperspb.Int64(clampSize(ctx, "largest available export", largest))
	return resp, nil
}

// ControllerGetVolume returns a volume and the nodes holding it.
func (s *ControllerService) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	e, err := s.existingVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	nodes, err := s.nodeIDs(e.VolumeID)
	if err != nil {
		return nil, err
	}
	st := &csi.ControllerGetVolumeResponse_VolumeStatus{PublishedNodeIds: nodes}
	return &csi.ControllerGetVolumeResponse{
		Volume: csiVolume(ctx, e), Status: st,
	}, nil
}

// ControllerGetVolumeHealth reports INACCESSIBLE when the export is missing
// from its server's listing or does not answer.
func (s *ControllerService) ControllerGetVolumeHealth(ctx context.Context, req *csi.ControllerGetVolumeHealthRequest) (*csi.ControllerGetVolumeHealthResponse, error) {
	e, err := s.existingVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	h := &csi.VolumeHealth{VolumeId: e.VolumeID}
	bad := func(reason, msg string) {
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: reason, Message: msg})
	}
	if e.Phase == store.PhaseMissing {
		bad("ExportMissing", "the server no longer lists export "+e.Name)
	} else if u, err := nbd.ParseURI(e.VolumeContext[KeyURI]); err == nil {
		pctx, cancel := context.WithTimeout(ctx, s.opts.ScanTimeout)
		// The request carries no secrets: use the TLS material this
		// controller was given for the server (CreateVolume); without it a
		// TLS-only server's answer says nothing about the export.
		info, perr := s.disc.Probe(pctx, u, s.knownTLS(e.Server))
		cancel()
		switch {
		case perr != nil && !errors.Is(perr, nbd.ErrTLSRequired):
			bad("ServerUnreachable", perr.Error())
		case perr == nil && info.Size < e.Size:
			bad("ExportShrank", "the export is smaller than when it was provisioned")
		}
	}
	return &csi.ControllerGetVolumeHealthResponse{VolumeHealth: h}, nil
}

// ControllerExpandVolume succeeds when the export is already at least the
// requested size (grown on the server); NBD has no resize command that
// servers implement, so the controller cannot grow it.
func (s *ControllerService) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	required, limit := req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes()
	if required < 0 || limit < 0 || (limit > 0 && limit < required) {
		return nil, status.Errorf(codes.InvalidArgument, "capacity range required=%d limit=%d is invalid", required, limit)
	}
	e, err := s.existingVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	tls, err := tlsFromSecrets(req.GetSecrets())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if tls == nil {
		tls = s.knownTLS(e.Server)
	}
	size := e.Size
	if u, err := nbd.ParseURI(e.VolumeContext[KeyURI]); err == nil {
		if info, err := s.disc.Probe(ctx, u, tls); err == nil {
			size = info.Size
		} else {
			logger(ctx).V(2).Info("Could not ask the server for the export's size; using the recorded one", "export", e.Name, "err", err)
		}
	}
	// An encrypted volume offers its export minus the LUKS2 header.
	size = usableSize(e.VolumeContext, size)
	if uint64(required) > size {
		return nil, status.Errorf(codes.OutOfRange, "export %s offers %d bytes, less than the %d requested: NBD servers cannot be asked to grow an export; grow it on the server, then expand again", e.Name, size, required)
	}
	// Node expansion also for raw block volumes: the kernel device keeps
	// the size negotiated at attach until NodeExpandVolume renews its
	// connections (the kubelet calls it for block volumes too).
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: clampSize(ctx, "export "+e.Name, size), NodeExpansionRequired: true}, nil
}

// knownTLS returns the TLS material last used for a server (from a
// CreateVolume's provisioner secret), or nil.
func (s *ControllerService) knownTLS(server string) *nbd.TLSOptions {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.servers[server].tls
}

// existingVolume returns a provisioned volume's record: InvalidArgument for
// an empty ID, NotFound for an unknown one.
func (s *ControllerService) existingVolume(id string) (*store.Export, error) {
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	e, err := s.store.Volume(id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist", id)
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "look up volume: %v", err)
	}
	return e, nil
}

// nodeIDs lists the nodes holding a volume.
func (s *ControllerService) nodeIDs(id string) ([]string, error) {
	holders, err := s.store.Holders(id)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "holders: %v", err)
	}
	var nodes []string
	for _, h := range holders {
		nodes = append(nodes, h.NodeID)
	}
	return nodes, nil
}
