// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nbd-csi/nbd-csi/pkg/crypt"
)

// VolumeEncryptor puts a LUKS2 mapping between an attached device and the
// filesystem or block consumer of an encrypted volume. The real one is
// crypt.Volumes (cryptsetup); tests run it on crypttest's fake tools.
type VolumeEncryptor interface {
	// Open opens the volume's mapping on device, formatting the device
	// first only if it is blank; it returns the mapping's device node.
	Open(ctx context.Context, volumeID, device string, key []byte, readOnly bool) (path string, formatted bool, err error)
	// Close closes the volume's mapping; an inactive one is fine.
	Close(ctx context.Context, volumeID string) error
	// Resize grows the volume's mapping to its resized device.
	Resize(ctx context.Context, volumeID string) error
	// Path is the device node of the volume's mapping.
	Path(volumeID string) string
	// Active reports whether the volume's mapping is open.
	Active(ctx context.Context, volumeID string) (crypt.Mapping, error)
}

var _ VolumeEncryptor = crypt.Volumes{}

// NodeOption configures optional parts of the node service.
type NodeOption func(*NodeService)

// WithEncryption enables encrypted volumes: enc opens the mappings, keys
// provides passphrases (crypt.SecretKeySource reads the node-stage secret).
func WithEncryption(enc VolumeEncryptor, keys crypt.KeySource) NodeOption {
	return func(s *NodeService) { s.enc, s.keys = enc, keys }
}

// encrypted tells whether a stored volume context asks for encryption.
func (r *VolumeRecord) encrypted() bool {
	b, _ := strconv.ParseBool(r.VolumeContext[KeyEncrypted])
	return b
}

// volumeKey returns the passphrase of an encrypted volume, before anything
// is attached, so that a missing key fails fast and touches nothing.
func (s *NodeService) volumeKey(ctx context.Context, volumeID string, secrets map[string]string) ([]byte, error) {
	if s.enc == nil || s.keys == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is encrypted and this node plugin has no encryption support", volumeID)
	}
	key, err := s.keys.Passphrase(ctx, volumeID, secrets)
	if err != nil {
		return nil, statusError("encryption passphrase", err)
	}
	return key, nil
}

// openEncrypted opens the volume's LUKS mapping on device (formatting a
// blank device first) and returns the device to use instead of device.
func (s *NodeService) openEncrypted(ctx context.Context, volumeID, device string, key []byte, readOnly bool) (string, error) {
	path, formatted, err := s.enc.Open(ctx, volumeID, device, key, readOnly)
	if errors.Is(err, crypt.ErrWrongKey) {
		return "", status.Errorf(codes.FailedPrecondition, "the passphrase in node-stage secret key %q does not open the LUKS header of volume %s; the volume is left untouched: %v",
			SecretEncryptionPassphrase, volumeID, err)
	}
	if err != nil {
		return "", statusError(fmt.Sprintf("open encrypted volume on %s", device), err)
	}
	if formatted {
		logger(ctx).Info("Formatted blank device with LUKS2", "device", device)
	}
	logger(ctx).V(2).Info("Opened encrypted volume", "device", device, "mapping", path)
	return path, nil
}

// closeEncrypted closes the volume's mapping, if the node has encryption
// support and a mapping is open; it runs before the device is detached.
func (s *NodeService) closeEncrypted(ctx context.Context, volumeID string) error {
	if s.enc == nil {
		return nil
	}
	if err := s.enc.Close(ctx, volumeID); err != nil {
		return statusError("close encrypted volume", err)
	}
	return nil
}

// dataDevice is the device holding a volume's data: the LUKS mapping of an
// encrypted volume, else the NBD device itself.
func (s *NodeService) dataDevice(rec *VolumeRecord, device string) string {
	if rec.encrypted() && s.enc != nil {
		return s.enc.Path(rec.VolumeID)
	}
	return device
}

// checkMapping makes sure an encrypted volume's mapping is open on device:
// it can only be reopened with the node-stage secret, so a missing one is
// FailedPrecondition.
func (s *NodeService) checkMapping(ctx context.Context, rec *VolumeRecord, device string) error {
	if !rec.encrypted() {
		return nil
	}
	if s.enc == nil {
		return status.Errorf(codes.FailedPrecondition, "volume %s is encrypted and this node plugin has no encryption support", rec.VolumeID)
	}
	m, err := s.enc.Active(ctx, rec.VolumeID)
	if err != nil {
		return statusError("encrypted volume status", err)
	}
	if !m.Active || m.Device != device {
		return status.Errorf(codes.FailedPrecondition, "encrypted volume %s has no open mapping on %s; it needs its node-stage secret: unstage and stage it again", rec.VolumeID, device)
	}
	return nil
}

// resizeEncrypted grows an encrypted volume's mapping after its device
// grew (no passphrase needed: the mapping was opened without keyring).
func (s *NodeService) resizeEncrypted(ctx context.Context, rec *VolumeRecord) error {
	if s.enc == nil {
		return status.Errorf(codes.FailedPrecondition, "volume %s is encrypted and this node plugin has no encryption support", rec.VolumeID)
	}
	if err := s.enc.Resize(ctx, rec.VolumeID); err != nil {
		return statusError("resize encrypted mapping", err)
	}
	return nil
}

// mappingHealth reports an encrypted volume whose device is attached but
// whose mapping is not open on it; nil when there is nothing to report.
func (s *NodeService) mappingHealth(ctx context.Context, volumeID string, att *Attachment) *csi.VolumeHealth_VolumeHealthEntry {
	if att == nil || s.enc == nil {
		return nil
	}
	rec, err := s.state.Get(volumeID)
	if err != nil || !rec.encrypted() {
		return nil
	}
	m, err := s.enc.Active(ctx, volumeID)
	switch {
	case err != nil:
		return &csi.VolumeHealth_VolumeHealthEntry{Status: csi.VolumeHealthErrorType_INACCESSIBLE,
			Reason: "MappingUnknown", Message: err.Error()}
	case !m.Active || m.Device != att.Device:
		return &csi.VolumeHealth_VolumeHealthEntry{Status: csi.VolumeHealthErrorType_INACCESSIBLE,
			Reason: "MappingMissing", Message: "the encrypted volume's LUKS mapping is not open on its NBD device"}
	}
	return nil
}
