// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// NodeStageVolume negotiates with the export, attaches it, and for mount
// volumes formats it (only if it holds no filesystem) and mounts it at the
// staging path. A repeated identical request succeeds without side effects;
// a different export or capability at the same volume is AlreadyExists.
func (s *NodeService) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	volumeID := req.GetVolumeId()
	if volumeID == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	staging, _, err := s.ownedPath(volumeID, req.GetStagingTargetPath(), useStaging)
	if err != nil {
		return nil, err
	}
	c, err := parseCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	params, err := ParseVolumeContext(req.GetVolumeContext())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if !c.block {
		if err := CheckMkfsOptions(c.fsType, params.MkfsOptions); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
	}
	tlsOpts, err := tlsFromSecrets(req.GetSecrets())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if params.URI.TLS() && tlsOpts == nil {
		tlsOpts = &nbd.TLSOptions{}
	}
	var key []byte
	if params.Encrypted {
		if key, err = s.volumeKey(ctx, volumeID, req.GetSecrets()); err != nil {
			return nil, err
		}
		defer crypt.Wipe(key)
	}
	// A node whose kernel cannot attach says so at once (the kubelet puts
	// it in the pod's events) instead of failing deeper with a vaguer error.
	if err := s.attacher.Ready(ctx); err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "node %s cannot attach NBD devices: %v", s.opts.NodeID, err)
	}
	if !s.volumes.TryAcquire(volumeID) {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %s is already in progress", volumeID)
	}
	defer s.volumes.Release(volumeID)
	log := logger(ctx)

	rec := &VolumeRecord{
		VolumeID: volumeID, StagingPath: staging, VolumeContext: nodeContext(req.GetVolumeContext()),
		Block: c.block, FSType: c.fsType, MountFlags: c.mountFlags, ReadOnly: c.readOnly,
		AccessMode: c.mode.String(), TLS: tlsOpts != nil,
	}
	old, err := s.state.Get(volumeID)
	switch {
	case err == nil:
		if sameStaging(old.StagingPath, staging) {
			old.StagingPath = staging
		}
		if !old.sameStage(rec) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s is already staged at %s with a different export, capability or staging path", volumeID, old.StagingPath)
		}
		rec.StagedAt, rec.Targets = old.StagedAt, old.Targets
	case !errors.Is(err, errNoRecord):
		return nil, status.Error(codes.Internal, err.Error())
	default:
		rec.StagedAt = time.Now().UTC()
	}

	att, err := s.attacher.Lookup(ctx, volumeID)
	if errors.Is(err, ErrNotAttached) {
		spec := AttachSpec{VolumeID: volumeID, URI: params.URI, TLS: tlsOpts, Connections: params.Connections,
			Timeout: params.Timeout, DeadConnTimeout: params.DeadConnTimeout, BlockSize: params.BlockSize, TLSMode: params.TLSMode, ReadOnly: c.readOnly}
		log.V(2).Info("Attaching", "uri", params.URI.String(), "connections", params.Connections)
		att, err = s.attacher.Attach(ctx, spec)
		if err != nil {
			return nil, statusError("attach "+params.URI.String(), err)
		}
		log.Info("Attached", "device", att.Device, "size", att.Size)
	} else if err != nil {
		return nil, statusError("look up device", err)
	}
	rec.Device = att.Device
	// The record goes to disk before the mount, so that an unstage after a
	// failed mount still finds and detaches the device.
	if err := s.state.Put(rec); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	device := att.Device
	if params.Encrypted {
		// A read-only export opens read-only too (and a blank one is refused
		// with a clear error instead of a failed luksFormat).
		if device, err = s.openEncrypted(ctx, volumeID, att.Device, key, c.readOnly || att.ReadOnly); err != nil {
			return nil, err
		}
	}
	if c.block {
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if err := s.mountStaging(ctx, device, rec, params.MkfsOptions); err != nil {
		return nil, err
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// mountStaging formats (if empty) and mounts device at the staging path,
// or accepts an existing mount of the same device.
func (s *NodeService) mountStaging(ctx context.Context, device string, rec *VolumeRecord, mkfsOptions []string) error {
	staging := rec.StagingPath
	if err := s.mounter.MakeDir(staging); err != nil {
		return status.Errorf(codes.Internal, "create staging directory: %v", err)
	}
	mounted, err := s.mounter.IsMountPoint(staging)
	if err != nil {
		return status.Errorf(codes.Internal, "check staging path: %v", err)
	}
	if mounted {
		dev, _, err := mountDevice(s.mounter, staging)
		if err != nil {
			return status.Errorf(codes.Internal, "inspect staging mount: %v", err)
		}
		if dev != device {
			return status.Errorf(codes.AlreadyExists, "staging path %s has %s mounted, not %s", staging, dev, device)
		}
		return nil
	}
	opts := slices.Clone(rec.MountFlags)
	if rec.ReadOnly {
		opts = append(opts, "ro")
	}
	if rec.FSType == FSXFS {
		// A filesystem cloned from another volume would collide by UUID.
		opts = append(opts, "nouuid")
	}
	// The last guard before mkfs runs as root: whatever path led here.
	if err := CheckMkfsOptions(rec.FSType, mkfsOptions); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	logger(ctx).V(2).Info("Formatting if needed and mounting", "device", device, "fsType", rec.FSType, "stagingPath", staging)
	if err := s.mounter.FormatAndMount(device, staging, rec.FSType, opts, mkfsOptions); err != nil {
		return status.Errorf(codes.Internal, "format and mount %s at %s: %v", device, staging, err)
	}
	return nil
}

// mountDevice returns the device mounted at path and how many other mount
// points it has.
func mountDevice(m Mounter, path string) (string, int, error) {
	mps, err := m.List()
	if err != nil {
		return "", 0, err
	}
	dev := ""
	for _, mp := range mps {
		if mp.Path == path {
			dev = mp.Device
		}
	}
	if dev == "" {
		return "", 0, fmt.Errorf("%s is not mounted", path)
	}
	refs := 0
	for _, mp := range mps {
		if mp.Device == dev && mp.Path != path {
			refs++
		}
	}
	return dev, refs, nil
}

// NodeUnstageVolume unmounts the staging path, detaches the device and
// forgets the volume. It succeeds when any of those is already done, when
// the server is gone, after a plugin restart, and for a volume this node
// never staged. It refuses to detach a device still mounted elsewhere.
func (s *NodeService) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	volumeID := req.GetVolumeId()
	if volumeID == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	staging, confirmed, err := s.ownedPath(volumeID, req.GetStagingTargetPath(), useStaging)
	if err != nil {
		return nil, err
	}
	if !s.volumes.TryAcquire(volumeID) {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %s is already in progress", volumeID)
	}
	defer s.volumes.Release(volumeID)
	log := logger(ctx)

	rec, err := s.state.Get(volumeID)
	switch {
	case errors.Is(err, errNoRecord):
		rec = nil
	case err != nil:
		return nil, status.Error(codes.Internal, err.Error())
	case !sameStaging(rec.StagingPath, staging):
		// Unmounting here and detaching would pull the device from under
		// the staging mount the record names.
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is staged at %s, not %s", volumeID, rec.StagingPath, staging)
	}
	if err := s.removeOwned(staging, confirmed || rec != nil, false); err != nil {
		return nil, err
	}
	if rec == nil {
		if rerr := s.attacher.Ready(ctx); rerr != nil {
			// No record and no kernel support: nothing was staged here.
			log.V(2).Info("Unstaged a volume this node never staged", "reason", rerr.Error())
			return &csi.NodeUnstageVolumeResponse{}, nil
		}
	}
	if rec != nil && !rec.Block {
		if err := s.stillMounted(ctx, volumeID); err != nil {
			return nil, err
		}
	}
	if err := s.closeEncrypted(ctx, volumeID); err != nil {
		return nil, err
	}
	if err := s.attacher.Detach(ctx, volumeID); err != nil {
		return nil, statusError("detach", err)
	}
	if err := s.state.Delete(volumeID); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	log.Info("Unstaged")
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// stillMounted refuses with FailedPrecondition while the volume's device is
// mounted anywhere (a publish not yet undone): detaching it would fail
// that mount's I/O.
func (s *NodeService) stillMounted(ctx context.Context, volumeID string) error {
	att, err := s.attacher.Lookup(ctx, volumeID)
	if errors.Is(err, ErrNotAttached) {
		return nil
	}
	if err != nil {
		return statusError("look up device", err)
	}
	mps, err := s.mounter.List()
	if err != nil {
		return status.Errorf(codes.Internal, "list mounts: %v", err)
	}
	for _, mp := range mps {
		if mp.Device == att.Device {
			return status.Errorf(codes.FailedPrecondition, "device %s of volume %s is still mounted at %s; unpublish it first", att.Device, volumeID, mp.Path)
		}
	}
	return nil
}

// sameStaging reports whether a recorded staging path is the resolved path
// (records written before paths were resolved hold the request's path).
func sameStaging(recorded, resolved string) bool {
	if recorded == resolved {
		return true
	}
	r, err := resolvePath(recorded)
	return err == nil && r == resolved
}

// sameStage reports whether two stage requests are the same.
func (r *VolumeRecord) sameStage(o *VolumeRecord) bool {
	return r.StagingPath == o.StagingPath && maps.Equal(r.VolumeContext, o.VolumeContext) &&
		r.Block == o.Block && r.FSType == o.FSType && slices.Equal(r.MountFlags, o.MountFlags) &&
		r.ReadOnly == o.ReadOnly
}

// nodeContext keeps the node keys of a volume context (the rest is
// Kubernetes metadata that may change between calls).
func nodeContext(vc map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range vc {
		if nodeKeys[k] {
			out[k] = v
		}
	}
	return out
}

// tlsFromSecrets reads TLS material from node-stage secrets (ca.crt,
// tls.crt, tls.key). No keys: nil. Errors never include secret values.
func tlsFromSecrets(sec map[string]string) (*nbd.TLSOptions, error) {
	ca, cert, key := sec[SecretCA], sec[SecretCert], sec[SecretKey]
	if ca == "" && cert == "" && key == "" {
		return nil, nil
	}
	if (cert == "") != (key == "") {
		return nil, fmt.Errorf("TLS secret: %q and %q must be given together", SecretCert, SecretKey)
	}
	// Parse the material here, so that a bad secret is the caller's error
	// (InvalidArgument) and not mistaken for an unreachable server.
	o := &nbd.TLSOptions{}
	if ca != "" {
		o.CAPEM = []byte(ca)
		if !x509.NewCertPool().AppendCertsFromPEM(o.CAPEM) {
			return nil, fmt.Errorf("TLS secret: %q holds no PEM certificate", SecretCA)
		}
	}
	if cert != "" {
		o.CertPEM, o.KeyPEM = []byte(cert), []byte(key)
		if _, err := tls.X509KeyPair(o.CertPEM, o.KeyPEM); err != nil {
			// crypto/tls errors do not include key material.
			return nil, fmt.Errorf("TLS secret: %q and %q are not a valid PEM certificate and key: %v", SecretCert, SecretKey, err)
		}
	}
	return o, nil
}
