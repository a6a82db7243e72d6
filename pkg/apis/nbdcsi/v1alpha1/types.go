// SPDX-License-Identifier: Apache-2.0

package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// NBDExport is one export of one NBD server, as the controller's inventory
// last saw it, and the volume that claims it. The controller owns these
// objects; admins read them (kubectl get nbdexports).
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=nbdexp,categories=nbd-csi
// +kubebuilder:printcolumn:name="Server",type=string,JSONPath=`.spec.server`
// +kubebuilder:printcolumn:name="Export",type=string,JSONPath=`.spec.export`
// +kubebuilder:printcolumn:name="Size",type=string,JSONPath=`.spec.capacity`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Volume",type=string,JSONPath=`.status.volumeName`
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.status.nodes`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NBDExport struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   NBDExportSpec   `json:"spec"`
	Status NBDExportStatus `json:"status,omitempty"`
}

// NBDExportSpec is what the server says about the export.
type NBDExportSpec struct {
	// Server is the identity of the server (tcp:HOST:PORT, unix:PATH or
	// id:NAME; see docs/architecture.md, "Server identity").
	// +kubebuilder:validation:MinLength=1
	Server string `json:"server"`
	// Export is the export name.
	Export string `json:"export"`
	// Description is the server's description of the export.
	// +optional
	Description string `json:"description,omitempty"`
	// Size is the export size in bytes.
	// +kubebuilder:validation:Minimum=0
	Size int64 `json:"size"`
	// Capacity is Size for humans (e.g. 10Gi).
	// +optional
	Capacity string `json:"capacity,omitempty"`
	// Flags are the NBD transmission flags.
	// +optional
	Flags int32 `json:"flags,omitempty"`
	// ReadOnly is true when the server refuses writes.
	// +optional
	ReadOnly bool `json:"readOnly,omitempty"`
}

// NBDExportStatus is the export's state in the inventory.
type NBDExportStatus struct {
	// Phase is Available (listed, unclaimed), Bound (claimed by a volume)
	// or Missing (no longer listed by its server; the claim is kept).
	// +kubebuilder:validation:Enum=Available;Bound;Missing
	// +optional
	Phase string `json:"phase,omitempty"`
	// VolumeName is the CO's name of the claiming volume (the PV name).
	// +optional
	VolumeName string `json:"volumeName,omitempty"`
	// VolumeID is the CSI volume ID of the claiming volume.
	// +optional
	VolumeID string `json:"volumeID,omitempty"`
	// VolumeContext is what the node plugin needs, fixed at claim time.
	// +optional
	VolumeContext map[string]string `json:"volumeContext,omitempty"`
	// Wipe asks for the export to be wiped when the volume is deleted.
	// +optional
	Wipe bool `json:"wipe,omitempty"`
	// KeepData records that the StorageClass opted out of wiping
	// (wipeOnDelete: "false"); without it the export is wiped before it
	// is released.
	// +optional
	KeepData bool `json:"keepData,omitempty"`
	// WipedTo is how far the wipe of a deleted volume has got, in bytes
	// from the start: a retried DeleteVolume continues there.
	// +kubebuilder:validation:Minimum=0
	// +optional
	WipedTo int64 `json:"wipedTo,omitempty"`
	// Nodes lists the nodes holding the claiming volume, comma-separated
	// (a copy of the NBDVolume's holders for kubectl get).
	// +optional
	Nodes string `json:"nodes,omitempty"`
	// SeenAt is when a scan last listed the export (updated at most every
	// few minutes when nothing else changes).
	// +optional
	SeenAt metav1.Time `json:"seenAt,omitempty"`
}

// NBDExportList is a list of NBDExport.
//
// +kubebuilder:object:root=true
type NBDExportList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NBDExport `json:"items"`
}

// NBDVolume is one CSI volume the controller knows: for a dynamically
// provisioned volume, the export it claims; for any volume, the nodes that
// hold it (ControllerPublishVolume), which is how read-write volumes are
// fenced to one node. Its name is derived from the volume ID.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=nbdvol,categories=nbd-csi
// +kubebuilder:printcolumn:name="Volume",type=string,JSONPath=`.spec.volumeName`
// +kubebuilder:printcolumn:name="Server",type=string,JSONPath=`.spec.server`
// +kubebuilder:printcolumn:name="Export",type=string,JSONPath=`.spec.export`
// +kubebuilder:printcolumn:name="Nodes",type=string,JSONPath=`.status.holders[*].node`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NBDVolume struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   NBDVolumeSpec   `json:"spec"`
	Status NBDVolumeStatus `json:"status,omitempty"`
}

// NBDVolumeSpec identifies the volume and its claim.
type NBDVolumeSpec struct {
	// VolumeID is the CSI volume ID.
	// +kubebuilder:validation:MinLength=1
	VolumeID string `json:"volumeID"`
	// VolumeName is the CO's name for a dynamically provisioned volume;
	// empty for a static volume.
	// +optional
	VolumeName string `json:"volumeName,omitempty"`
	// Server is the identity of the server the volume was provisioned
	// from (tcp:HOST:PORT, unix:PATH or id:NAME).
	// +optional
	Server string `json:"server,omitempty"`
	// Export is the export the claim chose; ExportObject its NBDExport.
	// Empty while a claim is being made.
	// +optional
	Export string `json:"export,omitempty"`
	// +optional
	ExportObject string `json:"exportObject,omitempty"`
	// ExportKey is the identity of the export the volume's holders hold
	// (server identity, NUL, export name), set by the first publish;
	// fencing is by export, across every volume naming it.
	// +optional
	ExportKey string `json:"exportKey,omitempty"`
}

// NBDVolumeStatus records the nodes holding the volume.
type NBDVolumeStatus struct {
	// Holders are the nodes the volume is published to. A read-write
	// holder is alone; read-only holders may be many.
	// +optional
	// +listType=map
	// +listMapKey=node
	Holders []Holder `json:"holders,omitempty"`
}

// Holder is one node holding a volume.
type Holder struct {
	// Node is the CSI node ID.
	Node string `json:"node"`
	// ReadOnly is true for a read-only publication.
	// +optional
	ReadOnly bool `json:"readOnly,omitempty"`
}

// NBDVolumeList is a list of NBDVolume.
//
// +kubebuilder:object:root=true
type NBDVolumeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NBDVolume `json:"items"`
}
