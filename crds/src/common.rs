//! Types shared by several resources: the recorded VM definition ("domain"),
//! disk descriptions and the metav1.Condition shape.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// A snapshot of the VM definition: what a checkpoint records so the image files
/// of a stopped VM are known, and so a restore knows the disk layout.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainSnapshot {
    /// The VM's disks at checkpoint time.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub disks: Vec<DomainDisk>,
    /// Free-form facts about the VM definition (machine type, launcher, …), kept as given.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extras: BTreeMap<String, String>,
}

/// One disk of a recorded VM definition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainDisk {
    /// Device name as the user knows it (the QEMU device id, e.g. `vda` or `disk0`).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// QEMU block node name of the disk's format node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub node_name: Option<String>,
    /// Absolute path of the image file on the node.
    #[schemars(length(min = 1, max = 4096))]
    pub file: String,
    /// Image format, e.g. `qcow2` or `raw`.
    #[schemars(length(min = 1, max = 32))]
    pub format: String,
    /// Virtual size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub virtual_size: Option<i64>,
}

/// Standard condition types used across Cairn's resources.
pub mod condition_types {
    /// The resource is usable (kstatus-compatible readiness).
    pub const READY: &str = "Ready";
    /// The VM definition was recorded with the checkpoint.
    pub const DOMAIN_RECORDED: &str = "DomainRecorded";
    /// The spec was rejected as invalid or unworkable (terminal until the spec changes).
    pub const FAILED: &str = "Failed";
    /// Work is in progress.
    pub const PROGRESSING: &str = "Progressing";
    /// kstatus: the controller is still working towards the spec (abnormal-true:
    /// present only while True means something; written False otherwise).
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: the controller gave up: a terminal failure that needs a person
    /// (reason and message are the failure's, as in `Ready=False`).
    pub const STALLED: &str = "Stalled";
    /// A push backup's file checksums were computed after the job and recorded
    /// (`status.disks[].sha256` and the manifest), or why not.
    pub const VERIFIED: &str = "Verified";
}

/// How the guest's filesystems were frozen for a checkpoint or backup
/// (`spec.quiesce`): the data is application-consistent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuiesceStatus {
    /// Filesystems the guest agent froze.
    pub frozen_filesystems: i64,
    /// From the freeze to the thaw, in milliseconds.
    pub frozen_milliseconds: i64,
}
