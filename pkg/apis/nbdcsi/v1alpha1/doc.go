// SPDX-License-Identifier: Apache-2.0

// Package v1alpha1 holds the custom resources in which the controller keeps
// its metadata when it runs with the Kubernetes store: NBDExport (one export
// of one NBD server: the inventory, and which volume claims it) and NBDVolume
// (one volume: its claim and which nodes hold it, for fencing). Both are
// cluster-scoped. The CRD manifests in charts/nbd-csi/crds are generated from
// these types by controller-gen (make generate).
//
// +kubebuilder:object:generate=false
// +groupName=nbd-csi.io
package v1alpha1

import "k8s.io/apimachinery/pkg/runtime/schema"

// Group and version of the resources.
const (
	Group   = "nbd-csi.io"
	Version = "v1alpha1"
)

// Resources, as the dynamic client addresses them.
var (
	NBDExportResource = schema.GroupVersionResource{Group: Group, Version: Version, Resource: "nbdexports"}
	NBDVolumeResource = schema.GroupVersionResource{Group: Group, Version: Version, Resource: "nbdvolumes"}
)

// Labels the store sets.
const (
	// LabelServer holds a hash of an export's server identity, so that one
	// server's exports are listed with a selector.
	LabelServer = "nbd-csi.io/server"
	// LabelExport holds a hash of the export identity an NBDVolume names
	// (spec.exportKey), so that fencing by export finds every volume
	// naming one export with a selector.
	LabelExport = "nbd-csi.io/export"
	// LabelPhase mirrors status.phase for selectors.
	LabelPhase = "nbd-csi.io/phase"
)
