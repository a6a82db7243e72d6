// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"errors"
	"io/fs"
	"path/filepath"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
)

// NodePublishVolume bind-mounts the staged filesystem (or, for block
// volumes, the device node) at the target path. It never binds an empty
// directory: if the staging mount is gone (e.g. after a node reboot) it
// re-stages from the state record, or fails with FailedPrecondition.
func (s *NodeService) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	volumeID := req.GetVolumeId()
	if volumeID == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	if req.GetStagingTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "staging target path is required (the driver stages volumes)")
	}
	if req.GetTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "target path is required")
	}
	staging, _, err := s.ownedPath(volumeID, req.GetStagingTargetPath(), useStaging)
	if err != nil {
		return nil, err
	}
	target, _, err := s.ownedPath(volumeID, req.GetTargetPath(), useTarget)
	if err != nil {
		return nil, err
	}
	c, err := parseCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	if !s.targets.TryAcquire(target) {
		return nil, status.Errorf(codes.Aborted, "an operation on target %s is already in progress", target)
	}
	defer s.targets.Release(target)

	rec, err := s.state.Get(volumeID)
	if errors.Is(err, errNoRecord) {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged on this node", volumeID)
	}
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if !sameStaging(rec.StagingPath, staging) {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s is staged at %s, not %s", volumeID, rec.StagingPath, staging)
	}
	if rec.Block != c.block {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s was staged as %s and cannot be published as %s", volumeID, kind(rec.Block), kind(c.block))
	}
	if c.mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		for _, other := range rec.Targets {
			if other != target {
				return nil, status.Errorf(codes.FailedPrecondition, "volume %s is single-writer and already published at %s", volumeID, other)
			}
		}
	}
	att, err := s.ensureStaged(ctx, rec)
	if err != nil {
		return nil, err
	}

	readOnly := req.GetReadonly() || c.readOnly
	opts := []string{"bind"}
	if readOnly {
		opts = append(opts, "ro")
	}
	source := rec.StagingPath
	if rec.Block {
		source = s.dataDevice(rec, att.Device)
		if err := s.mounter.MakeDir(filepath.Dir(target)); err != nil {
			return nil, status.Errorf(codes.Internal, "create target parent: %v", err)
		}
		// The target goes into the record before the file is made: the
		// record is what allows NodeUnpublishVolume to delete the file
		// again, also after a publish that failed half-way.
		if err := s.updateTargets(volumeID, target, true); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if err := s.mounter.MakeFile(target); err != nil {
			return nil, status.Errorf(codes.Internal, "create target file: %v", err)
		}
	} else {
		opts = append(opts, c.mountFlags...)
		if err := s.mounter.MakeDir(target); err != nil {
			return nil, status.Errorf(codes.Internal, "create target directory: %v", err)
		}
	}
	mounted, err := s.mounter.IsMountPoint(target)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "check target: %v", err)
	}
	if !mounted {
		if err := s.mounter.Mount(source, target, "", opts); err != nil {
			return nil, status.Errorf(codes.Internal, "bind %s to %s: %v", source, target, err)
		}
	}
	if err := s.updateTargets(volumeID, target, true); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	logger(ctx).V(2).Info("Published", "target", target, "readOnly", readOnly)
	return &csi.NodePublishVolumeResponse{}, nil
}

// ensureStaged checks that the volume's device is attached and, for mount
// volumes, mounted at the staging path; it re-stages from the record when
// it can (no TLS material or passphrase is kept on disk, so TLS and
// encrypted volumes cannot be).
func (s *NodeService) ensureStaged(ctx context.Context, rec *VolumeRecord) (*Attachment, error) {
	att, err := s.attacher.Lookup(ctx, rec.VolumeID)
	if errors.Is(err, ErrNotAttached) {
		if rec.TLS || rec.encrypted() {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s lost its device and needs its node-stage secret to re-stage; unstage and stage it again", rec.VolumeID)
		}
		params, perr := ParseVolumeContext(rec.VolumeContext)
		if perr != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "state record of %s: %v", rec.VolumeID, perr)
		}
		logger(ctx).Info("Device missing, re-attaching from state record")
		att, err = s.attacher.Attach(ctx, AttachSpec{VolumeID: rec.VolumeID, URI: params.URI, Connections: params.Connections,
			Timeout: params.Timeout, DeadConnTimeout: params.DeadConnTimeout, BlockSize: params.BlockSize, TLSMode: params.TLSMode, ReadOnly: rec.ReadOnly})
		if err != nil {
			return nil, statusError("re-attach", err)
		}
		rec.Device = att.Device
		if err := s.state.Put(rec); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	} else if err != nil {
		return nil, statusError("look up device", err)
	}
	if err := s.checkMapping(ctx, rec, att.Device); err != nil {
		return nil, err
	}
	if rec.Block {
		return att, nil
	}
	mounted, err := s.mounter.IsMountPoint(rec.StagingPath)
	switch {
	case err == nil, errors.Is(err, fs.ErrNotExist):
	case mount.IsCorruptedMnt(err):
		// A dead mount (e.g. the device vanished under it) is cleared and
		// mounted again.
		if uerr := s.mounter.Unmount(rec.StagingPath); uerr != nil {
			return nil, status.Errorf(codes.Internal, "clear corrupted staging mount: %v", uerr)
		}
		mounted = false
	default:
		return nil, status.Errorf(codes.Internal, "check staging mount: %v", err)
	}
	if !mounted {
		logger(ctx).Info("Staging mount missing, mounting again", "stagingPath", rec.StagingPath)
		params, _ := ParseVolumeContext(rec.VolumeContext)
		var mkfs []string
		if params != nil {
			mkfs = params.MkfsOptions
		}
		if err := s.mountStaging(ctx, s.dataDevice(rec, att.Device), rec, mkfs); err != nil {
			return nil, err
		}
	}
	return att, nil
}

// NodeUnpublishVolume unmounts and removes the target path; a target that
// is not mounted or does not exist is fine. It removes only the empty
// directory or the empty block-target file a publish made, never other
// files, and unmounts only what this driver's record or the kubelet's ties
// to the volume.
func (s *NodeService) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	volumeID := req.GetVolumeId()
	if volumeID == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	if req.GetTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "target path is required")
	}
	target, confirmed, err := s.ownedPath(volumeID, req.GetTargetPath(), useTarget)
	if err != nil {
		return nil, err
	}
	if !s.targets.TryAcquire(target) {
		return nil, status.Errorf(codes.Aborted, "an operation on target %s is already in progress", target)
	}
	defer s.targets.Release(target)
	recorded := false
	switch rec, err := s.state.Get(volumeID); {
	case err == nil:
		recorded = slices.Contains(rec.Targets, target)
	case !errors.Is(err, errNoRecord):
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := s.removeOwned(target, confirmed || recorded, confirmed || recorded); err != nil {
		return nil, err
	}
	if err := s.updateTargets(volumeID, target, false); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	logger(ctx).V(2).Info("Unpublished", "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// updateTargets adds or removes target in the volume's record; a volume
// with no record (already unstaged) is fine.
func (s *NodeService) updateTargets(volumeID, target string, add bool) error {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	rec, err := s.state.Get(volumeID)
	if errors.Is(err, errNoRecord) {
		return nil
	}
	if err != nil {
		return err
	}
	has := slices.Contains(rec.Targets, target)
	switch {
	case add && !has:
		rec.Targets = append(rec.Targets, target)
	case !add && has:
		rec.Targets = slices.DeleteFunc(rec.Targets, func(t string) bool { return t == target })
	default:
		return nil
	}
	return s.state.Put(rec)
}

func kind(block bool) string {
	if block {
		return "block"
	}
	return "filesystem"
}
