// SPDX-License-Identifier: Apache-2.0

// Command demo-lifecycle walks one volume through the CSI lifecycle against
// a running `nbd-csi serve` and prints each step: (provision,) stage,
// publish, write, read back, unpublish, unstage(, delete). make demo runs it
// on the host when the kernel has nbd, else inside the test/vm rig.
//
//	demo-lifecycle --endpoint unix:///run/csi.sock --kubelet-dir DIR (--uri URI | --server URI --size BYTES)
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	endpoint := flag.String("endpoint", "unix:///tmp/csi.sock", "CSI endpoint of nbd-csi serve")
	kubelet := flag.String("kubelet-dir", "/var/lib/kubelet", "kubelet directory the plugin was started with")
	uri := flag.String("uri", "", "export URI for a static volume (no controller)")
	server := flag.String("server", "", "server URI for dynamic provisioning through the controller")
	size := flag.Int64("size", 1<<30, "requested capacity for dynamic provisioning")
	fsType := flag.String("fs-type", "ext4", "filesystem: ext4 or xfs")
	flag.Parse()
	if err := run(*endpoint, *kubelet, *uri, *server, *size, *fsType); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) func(error) error {
	fmt.Printf("==> "+format+" ... ", args...)
	start := time.Now()
	return func(err error) error {
		if err != nil {
			fmt.Println("FAILED")
			return err
		}
		fmt.Printf("ok (%v)\n", time.Since(start).Round(time.Millisecond))
		return nil
	}
}

func run(endpoint, kubelet, uri, server string, size int64, fsType string) error {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ident, node, ctrl := csi.NewIdentityClient(conn), csi.NewNodeClient(conn), csi.NewControllerClient(conn)

	done := step("GetPluginInfo / Probe")
	info, err := ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err == nil {
		_, err = ident.Probe(ctx, &csi.ProbeRequest{})
	}
	if err := done(err); err != nil {
		return err
	}
	fmt.Printf("    driver %s %s\n", info.Name, info.VendorVersion)
	nodeInfo, err := node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		return err
	}

	capability := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	volID, volCtx := "demo-static", map[string]string{"uri": uri}
	var pubCtx map[string]string
	if server != "" {
		done = step("CreateVolume (provision %d bytes from %s)", size, server)
		v, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "demo-pvc", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{capability}, Parameters: map[string]string{"server": server}})
		if err := done(err); err != nil {
			return err
		}
		volID, volCtx = v.Volume.VolumeId, v.Volume.VolumeContext
		fmt.Printf("    volume %s, %d bytes, uri %s\n", volID, v.Volume.CapacityBytes, volCtx["uri"])
		done = step("ControllerPublishVolume to node %s", nodeInfo.NodeId)
		p, err := ctrl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: volID, NodeId: nodeInfo.NodeId,
			VolumeCapability: capability, VolumeContext: volCtx})
		if err := done(err); err != nil {
			return err
		}
		pubCtx = p.PublishContext
	}

	staging := filepath.Join(kubelet, "plugins", "kubernetes.io", "csi", "demo", "globalmount")
	target := filepath.Join(kubelet, "pods", "demo-pod", "volumes", "kubernetes.io~csi", "demo", "mount")
	done = step("NodeStageVolume (negotiate, attach, mkfs.%s, mount at %s)", fsType, staging)
	_, err = node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: volID, StagingTargetPath: staging,
		VolumeCapability: capability, VolumeContext: volCtx, PublishContext: pubCtx})
	if err := done(err); err != nil {
		return err
	}
	done = step("NodePublishVolume (bind mount into the pod at %s)", target)
	_, err = node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: volID, StagingTargetPath: staging, TargetPath: target,
		VolumeCapability: capability, VolumeContext: volCtx, PublishContext: pubCtx})
	if err := done(err); err != nil {
		return err
	}

	data := make([]byte, 8<<20)
	_, _ = rand.Read(data)
	file := filepath.Join(target, "hello.bin")
	done = step("Write 8 MiB through the filesystem and fsync")
	if err := done(writeSync(file, data)); err != nil {
		return err
	}
	st, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: volID, VolumePath: target})
	if err == nil && len(st.Usage) > 0 {
		fmt.Printf("    NodeGetVolumeStats: %d of %d bytes used\n", st.Usage[0].Used, st.Usage[0].Total)
	}
	done = step("NodeUnpublishVolume + NodeUnstageVolume (unmount, disconnect)")
	_, err = node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: volID, TargetPath: target})
	if err == nil {
		_, err = node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: volID, StagingTargetPath: staging})
	}
	if err := done(err); err != nil {
		return err
	}
	done = step("Stage and publish again, read back and compare checksums")
	_, err = node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: volID, StagingTargetPath: staging,
		VolumeCapability: capability, VolumeContext: volCtx, PublishContext: pubCtx})
	if err == nil {
		_, err = node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: volID, StagingTargetPath: staging, TargetPath: target,
			VolumeCapability: capability, VolumeContext: volCtx, PublishContext: pubCtx})
	}
	var back []byte
	if err == nil {
		back, err = os.ReadFile(file)
	}
	if err == nil && !bytes.Equal(back, data) {
		err = fmt.Errorf("data read back differs")
	}
	if err := done(err); err != nil {
		return err
	}
	fmt.Printf("    sha256 %x matches\n", sha256.Sum256(back))
	done = step("NodeUnpublishVolume + NodeUnstageVolume")
	_, err = node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: volID, TargetPath: target})
	if err == nil {
		_, err = node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: volID, StagingTargetPath: staging})
	}
	if err := done(err); err != nil {
		return err
	}
	if server != "" {
		done = step("ControllerUnpublishVolume + DeleteVolume")
		_, err = ctrl.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: volID, NodeId: nodeInfo.NodeId})
		if err == nil {
			_, err = ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: volID})
		}
		if err := done(err); err != nil {
			return err
		}
	}
	fmt.Println("==> Volume lifecycle complete")
	return nil
}

func writeSync(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
