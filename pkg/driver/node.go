// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/nbd-csi/nbd-csi/pkg/crypt"
)

// NodeOptions configure the node service. Every field is a flag of
// `nbd-csi serve` (docs/cli.md).
type NodeOptions struct {
	// NodeID is this node's name as the controller knows it.
	NodeID string
	// DriverName is the CSI driver name (the kubelet names its staging
	// directories after it); empty means DefaultDriverName.
	DriverName string
	// KubeletDir is the kubelet root directory: every staging and target
	// path must be one the kubelet makes under it (node_paths.go).
	KubeletDir string
	// PathRoot, when set, replaces the kubelet layout: staging and target
	// paths may be anywhere strictly below it (csi-sanity makes its own
	// directories). Never set in a cluster.
	PathRoot string
	// StateDir holds one record per staged volume.
	StateDir string
	// MaxVolumesPerNode is reported by NodeGetInfo (0: no limit).
	MaxVolumesPerNode int64
	// OrphanGracePeriod is how long a device of ours with no record and no
	// mount is left alone before it is detached.
	OrphanGracePeriod time.Duration
}

// NodeService implements the CSI node service.
type NodeService struct {
	csi.UnimplementedNodeServer
	opts     NodeOptions
	attacher VolumeAttacher
	mounter  Mounter
	state    *stateStore
	volumes  *inflight // keyed by volume ID: stage, unstage, expand
	targets  *inflight // keyed by target path: publish, unpublish
	// recMu serialises read-modify-write of the records' target lists
	// (publishes of one volume at two targets run in parallel).
	recMu sync.Mutex
	// enc and keys serve encrypted volumes (nil: not supported).
	enc  VolumeEncryptor
	keys crypt.KeySource
}

var _ csi.NodeServer = (*NodeService)(nil)

// NewNodeService builds the node service.
func NewNodeService(opts NodeOptions, attacher VolumeAttacher, mounter Mounter, options ...NodeOption) (*NodeService, error) {
	if opts.NodeID == "" {
		return nil, fmt.Errorf("node ID is required")
	}
	if opts.KubeletDir == "" || !filepath.IsAbs(opts.KubeletDir) {
		return nil, fmt.Errorf("kubelet directory %q must be an absolute path", opts.KubeletDir)
	}
	st, err := newStateStore(opts.StateDir)
	if err != nil {
		return nil, err
	}
	opts.KubeletDir = filepath.Clean(opts.KubeletDir)
	if opts.PathRoot != "" {
		if !filepath.IsAbs(opts.PathRoot) {
			return nil, fmt.Errorf("path root %q must be an absolute path", opts.PathRoot)
		}
		opts.PathRoot = filepath.Clean(opts.PathRoot)
	}
	s := &NodeService{opts: opts, attacher: attacher, mounter: mounter, state: st,
		volumes: newInflight(), targets: newInflight()}
	for _, o := range options {
		o(s)
	}
	return s, nil
}

// Ready is the node's part of Probe.
func (s *NodeService) Ready(ctx context.Context) error { return s.attacher.Ready(ctx) }

// NodeGetInfo returns the node ID, the volume limit and the topology: the
// node's segment, plus TopologyKeyCapable when the kernel can attach. A node
// that cannot attach still registers (its Probe says why), but without the
// capable segment no provisioned volume is accessible from it. Kubelet asks
// once, at registration; the attacher's kernel check is made once, when the
// plugin starts, so a node that gains nbd reports it after a plugin restart.
func (s *NodeService) NodeGetInfo(ctx context.Context, _ *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	segments := map[string]string{TopologyKeyNode: s.opts.NodeID}
	if err := s.attacher.Ready(ctx); err != nil {
		logger(ctx).Error(err, "Node cannot attach NBD devices; registering it without the capable topology segment, so no NBD volume is scheduled here", "topologyKey", TopologyKeyCapable)
	} else {
		segments[TopologyKeyCapable] = TopologyCapable
	}
	return &csi.NodeGetInfoResponse{
		NodeId:             s.opts.NodeID,
		MaxVolumesPerNode:  s.opts.MaxVolumesPerNode,
		AccessibleTopology: &csi.Topology{Segments: segments},
	}, nil
}

// NodeGetCapabilities lists the node capabilities.
func (s *NodeService) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, c := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: c}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// capability is a validated volume capability.
type capability struct {
	block      bool
	fsType     string
	mountFlags []string
	readOnly   bool
	mode       csi.VolumeCapability_AccessMode_Mode
}

// parseCapability validates a volume capability for this node.
func parseCapability(vc *csi.VolumeCapability) (*capability, error) {
	if vc == nil {
		return nil, status.Error(codes.InvalidArgument, "volume capability is required")
	}
	c := &capability{}
	if vc.GetAccessMode() == nil {
		return nil, status.Error(codes.InvalidArgument, "volume capability has no access mode")
	}
	c.mode = vc.GetAccessMode().GetMode()
	switch c.mode {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		c.readOnly = true
	default:
		return nil, status.Errorf(codes.InvalidArgument, "access mode %s is not supported: an NBD export can have one writing node", c.mode)
	}
	switch {
	case vc.GetBlock() != nil:
		c.block = true
	case vc.GetMount() != nil:
		m := vc.GetMount()
		c.fsType = m.GetFsType()
		if c.fsType == "" {
			c.fsType = DefaultFSType
		}
		if c.fsType != FSExt4 && c.fsType != FSXFS {
			return nil, status.Errorf(codes.InvalidArgument, "fsType %q is not supported (ext4 or xfs)", c.fsType)
		}
		c.mountFlags = m.GetMountFlags()
		for _, f := range c.mountFlags {
			if strings.ContainsAny(f, "\x00\n") {
				return nil, status.Errorf(codes.InvalidArgument, "mount flag %q contains a control character", f)
			}
		}
	default:
		return nil, status.Error(codes.InvalidArgument, "volume capability must be block or mount")
	}
	return c, nil
}

// logger returns the request's logger.
func logger(ctx context.Context) klog.Logger { return klog.FromContext(ctx) }
