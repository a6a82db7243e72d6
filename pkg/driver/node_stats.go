// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"errors"
	"io/fs"
	"os"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// NodeGetVolumeStats reports bytes and inodes of a filesystem volume, or
// the size of a block volume.
func (s *NodeService) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	volumeID := req.GetVolumeId()
	if volumeID == "" || req.GetVolumePath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID and volume path are required")
	}
	path, _, err := s.ownedPath(volumeID, req.GetVolumePath(), useVolume)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil, status.Errorf(codes.NotFound, "volume path %s does not exist", path)
	}
	if _, err := s.state.Get(volumeID); errors.Is(err, errNoRecord) {
		return nil, status.Errorf(codes.NotFound, "volume %s is not staged on this node", volumeID)
	}
	block, err := s.mounter.IsBlockDevice(path)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "inspect %s: %v", path, err)
	}
	if block {
		size, err := s.mounter.BlockSize(path)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "size of %s: %v", path, err)
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: int64(size)}}}, nil
	}
	st, err := s.mounter.Stats(path)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "statfs %s: %v", path, err)
	}
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: st.TotalBytes, Available: st.AvailableBytes, Used: st.UsedBytes},
		{Unit: csi.VolumeUsage_INODES, Total: st.TotalInodes, Available: st.FreeInodes, Used: st.UsedInodes},
	}}, nil
}

// NodeGetVolumeHealth reports INACCESSIBLE when the volume has no device on
// this node, and DEGRADED while its connection is dead or reconnecting
// (I/O stalls until the reconnect or the dead-connection timeout).
func (s *NodeService) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	volumeID := req.GetVolumeId()
	if volumeID == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	if _, err := s.state.Get(volumeID); errors.Is(err, errNoRecord) {
		return nil, status.Errorf(codes.NotFound, "volume %s is not staged on this node", volumeID)
	}
	h := &csi.VolumeHealth{VolumeId: volumeID}
	att, err := s.attacher.Lookup(ctx, volumeID)
	switch {
	case errors.Is(err, ErrNotAttached):
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: "DeviceMissing",
			Message: "the volume is staged but its NBD device is not attached"})
	case err != nil:
		return nil, statusError("look up device", err)
	case !att.Healthy:
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_DEGRADED, Reason: "ConnectionDead", Message: att.Condition})
	}
	if e := s.mappingHealth(ctx, volumeID, att); e != nil {
		h.HealthStatuses = append(h.HealthStatuses, e)
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: h}, nil
}

// NodeExpandVolume asks the server for the export size again, resizes the
// device and grows the filesystem online.
func (s *NodeService) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	volumeID := req.GetVolumeId()
	if volumeID == "" || req.GetVolumePath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID and volume path are required")
	}
	path, _, err := s.ownedPath(volumeID, req.GetVolumePath(), useVolume)
	if err != nil {
		return nil, err
	}
	if req.GetStagingTargetPath() != "" {
		if _, _, err := s.ownedPath(volumeID, req.GetStagingTargetPath(), useStaging); err != nil {
			return nil, err
		}
	}
	if !s.volumes.TryAcquire(volumeID) {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %s is already in progress", volumeID)
	}
	defer s.volumes.Release(volumeID)
	rec, err := s.state.Get(volumeID)
	if errors.Is(err, errNoRecord) {
		return nil, status.Errorf(codes.NotFound, "volume %s is not staged on this node", volumeID)
	}
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	params, err := ParseVolumeContext(rec.VolumeContext)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "state record: %v", err)
	}
	size, err := s.attacher.Resize(ctx, volumeID, AttachSpec{VolumeID: volumeID, URI: params.URI,
		Connections: params.Connections, BlockSize: params.BlockSize})
	if err != nil {
		return nil, statusError("resize device", err)
	}
	size = usableSize(rec.VolumeContext, size) // an encrypted volume: minus its LUKS2 header
	if want := req.GetCapacityRange().GetRequiredBytes(); want > 0 && uint64(want) > size {
		return nil, status.Errorf(codes.OutOfRange, "the volume offers %d bytes, less than the requested %d: grow the export on the NBD server first", size, want)
	}
	if rec.encrypted() {
		if err := s.resizeEncrypted(ctx, rec); err != nil {
			return nil, err
		}
	}
	if !rec.Block {
		att, err := s.attacher.Lookup(ctx, volumeID)
		if err != nil {
			return nil, statusError("look up device", err)
		}
		att.Device = s.dataDevice(rec, att.Device)
		mountPath := rec.StagingPath
		if _, err := os.Stat(path); err == nil {
			mountPath = path
		}
		if err := s.mounter.ResizeFS(att.Device, mountPath); err != nil {
			return nil, status.Errorf(codes.Internal, "grow filesystem: %v", err)
		}
	}
	logger(ctx).Info("Expanded", "bytes", size)
	return &csi.NodeExpandVolumeResponse{CapacityBytes: int64(size)}, nil
}
