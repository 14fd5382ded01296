//! `QemuInstance`: one per QEMU process an agent discovered on its node.
//!
//! Written only by agents (RBAC keeps tenants out); read by the operator to
//! route work and by users to see what can be checkpointed.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A QEMU process the Cairn agent of a node manages. The object carries no
/// spec: everything is observed state, published by the agent. Its name is the
/// VM name and its namespace the one its QMP socket path names
/// (`<socket-dir>/<namespace>/<vm>.sock`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "QemuInstance",
    plural = "qemuinstances",
    shortname = "qemu",
    category = "cairn",
    label("app.kubernetes.io/part-of", "cairn"),
    namespaced,
    no_spec,
    doc = "A QEMU process that the Cairn agent of a node discovered through its QMP socket; written only by agents.",
    status = "QemuInstanceStatus",
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.runState"),
    printcolumn(name = "QEMU", type_ = "string", json_path = ".status.qemuVersion"),
    printcolumn(name = "Disks", type_ = "integer", json_path = ".status.diskCount"),
    printcolumn(name = "Last-Seen", type_ = "date", json_path = ".status.lastSeen"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct QemuInstanceFields {}

/// What the agent observed of a QEMU process.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QemuInstanceStatus {
    /// Node whose agent manages this QEMU process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Path of the QMP socket on that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp_socket: Option<String>,
    /// QEMU version, e.g. `10.0.2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// QEMU run state (`running`, `paused`, …), or `disconnected` when the socket stopped answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_state: Option<String>,
    /// Number of disks (for the printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_count: Option<i32>,
    /// The VM's disks with their bitmaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<InstanceDisk>,
    /// When the agent last heard from QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// A disk of a QEMU process.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceDisk {
    /// Device name as the user knows it (the QEMU device id, e.g. `vda` or `disk0`).
    pub name: String,
    /// QEMU block node name of the format node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Image file on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Image format (`qcow2`, `raw`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Virtual size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<i64>,
    /// Whether the disk is read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Dirty bitmaps on the disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<InstanceBitmap>,
}

/// A dirty bitmap on a disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceBitmap {
    /// Bitmap name.
    pub name: String,
    /// Bytes covered by one bit.
    #[serde(default)]
    pub granularity: i64,
    /// Whether writes are being recorded.
    #[serde(default)]
    pub recording: bool,
    /// Whether the bitmap is stored in the image and survives a clean QEMU exit.
    #[serde(default)]
    pub persistent: bool,
    /// Whether a job or export is using it right now.
    #[serde(default)]
    pub busy: bool,
    /// True when QEMU did not close the image cleanly: the bitmap can no longer be trusted.
    #[serde(default)]
    pub inconsistent: bool,
    /// Bytes written since the bitmap was created.
    #[serde(default)]
    pub dirty_bytes: i64,
}
