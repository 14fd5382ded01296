//! `VirtualMachineCheckpoint`: libvirt's checkpoint as a resource — a set of
//! persistent dirty bitmaps, one per selected disk, that every later write is
//! recorded in. Any checkpoint can be the base of an incremental backup.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, DomainSnapshot};

/// Desired checkpoint. Immutable after creation: create a new checkpoint instead.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "VirtualMachineCheckpoint",
    plural = "virtualmachinecheckpoints",
    shortname = "vmcheckpoint",
    shortname = "vmcp",
    category = "cairn",
    label("app.kubernetes.io/part-of", "cairn"),
    namespaced,
    status = "VirtualMachineCheckpointStatus",
    doc = "A checkpoint of a QEMU VM: persistent dirty bitmaps that record every write made after it, usable as the base of incremental backups.",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.virtualMachine"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the object is usable now (the Ready condition), whatever the phase"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why it is (not) Ready"
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "Parent", type_ = "string", json_path = ".status.parent"),
    printcolumn(
        name = "Size",
        type_ = "integer",
        format = "int64",
        json_path = ".status.size",
        description = "Bytes written since the checkpoint, over all its disks"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new VirtualMachineCheckpoint instead"))]
#[x_kube(validation = Rule::new("!(self.quiesce && self.redefine)").message("quiesce applies to creating bitmaps; redefine adopts existing ones"))]
#[x_kube(validation = Rule::new("!has(self.domain) || self.redefine").message("domain can only be given with redefine: true; on a normal create the agent records it in status.domain"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineCheckpointSpec {
    /// Name of the VM (its QemuInstance) in the same namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub virtual_machine: String,

    /// Disks to include, by device name. When omitted, every writable qcow2 disk of the
    /// VM gets a bitmap named after the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Option<Vec<CheckpointDisk>>,

    /// Free text shown in `kubectl describe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Adopt bitmaps that already exist in the images (made offline with
    /// `qemu-img bitmap --add`, or left from before a cluster rebuild) instead of
    /// creating them. Each must exist, be persistent and consistent.
    #[serde(default)]
    pub redefine: bool,

    /// The VM definition at checkpoint time, for redefined checkpoints. Optional: without
    /// it the checkpoint still serves incremental backups, but offline operations are
    /// unavailable and the DomainRecorded condition says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainSnapshot>,

    /// Freeze guest filesystems through the QEMU guest agent (`<ns>/<vm>.qga.sock`
    /// beside the monitor) around bitmap creation, then thaw them. Fails
    /// `QuiesceUnavailable` when there is no guest agent, `QuiesceTimeout` when it
    /// does not answer in time (the guest is thawed and no bitmap is left).
    #[serde(default)]
    pub quiesce: bool,
}

/// Whether a disk takes part in a checkpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CheckpointMode {
    /// Track changes on this disk with a dirty bitmap.
    #[default]
    Bitmap,
    /// Leave this disk out.
    None,
}

/// One disk of a checkpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.bitmap) || !has(self.checkpoint) || self.checkpoint == 'Bitmap'").message("bitmap can only be set when checkpoint is Bitmap"))]
#[serde(rename_all = "camelCase")]
pub struct CheckpointDisk {
    /// Device name as the user knows it (e.g. `vda`, `disk0`): see the QemuInstance's disks.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// `Bitmap` (the default when omitted) tracks the disk, `None` leaves it out. Not
    /// defaulted in the stored object, so re-applying a manifest is a no-op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointMode>,
    /// Bitmap name in the image; defaults to the checkpoint's name. Redefine adopts this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1023), regex(pattern = r"^[A-Za-z0-9._:+-]+$"))]
    pub bitmap: Option<String>,
}

/// Lifecycle phase of a checkpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CheckpointPhase {
    /// Accepted, waiting for the VM's node.
    #[default]
    Pending,
    /// The agent is creating or adopting the bitmaps.
    Creating,
    /// Bitmaps exist and record writes.
    Ready,
    /// The checkpoint could not be made; see the conditions.
    Failed,
    /// Bitmaps are being removed.
    Deleting,
}

/// Observed state of a checkpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineCheckpointStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CheckpointPhase>,
    /// Conditions: `Ready`, `Reconciling` (work in progress), `Stalled` (a
    /// terminal failure, with its reason), `DomainRecorded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Node of the VM when the checkpoint was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The previous checkpoint of the same VM, as libvirt computes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// When the bitmaps were created (or adopted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Per-disk bitmaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Vec<CheckpointDiskStatus>,
    /// Bytes written since the checkpoint over all disks (libvirt's checkpoint size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// The VM definition the agent observed (normal create) or the one given (redefine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainSnapshot>,
    /// Set when the bitmaps were created with the guest's filesystems frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<crate::common::QuiesceStatus>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// State of a checkpoint's bitmap on one disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointDiskStatus {
    /// Device name.
    pub name: String,
    /// Bitmap name in the image.
    pub bitmap: String,
    /// Bytes covered by one bit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<i64>,
    /// Bytes written since the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<i64>,
    /// Whether the bitmap is present and consistent in the image right now.
    #[serde(default)]
    pub present: bool,
    /// True when QEMU did not close the image cleanly and the bitmap cannot be trusted.
    #[serde(default)]
    pub inconsistent: bool,
}

impl CheckpointDisk {
    /// Whether this disk gets a bitmap.
    pub fn tracked(&self) -> bool {
        self.checkpoint.unwrap_or_default() == CheckpointMode::Bitmap
    }
}

impl VirtualMachineCheckpointSpec {
    /// The bitmap name this checkpoint uses on `disk` (explicit or the checkpoint's name).
    pub fn bitmap_for<'a>(&'a self, checkpoint_name: &'a str, disk: &str) -> &'a str {
        self.disks
            .iter()
            .flatten()
            .find(|d| d.name == disk)
            .and_then(|d| d.bitmap.as_deref())
            .unwrap_or(checkpoint_name)
    }
}

impl CheckpointPhase {
    /// The phase's name as it appears in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Creating => "Creating",
            Self::Ready => "Ready",
            Self::Failed => "Failed",
            Self::Deleting => "Deleting",
        }
    }
}

impl crate::conditions::LifecycleStatus for VirtualMachineCheckpointStatus {
    /// `Pending`, `Creating`, `Deleting`: in progress. `Failed`: failed.
    /// `Ready`: current while the `Ready` condition is not False; a bitmap
    /// that went missing or inconsistent afterwards is a failure (the
    /// checkpoint can never be an incremental base again).
    fn lifecycle(&self) -> (crate::conditions::Lifecycle, &'static str) {
        use crate::conditions::{Lifecycle, find};
        let phase = self.phase.unwrap_or_default();
        let lifecycle = match phase {
            CheckpointPhase::Pending | CheckpointPhase::Creating | CheckpointPhase::Deleting => {
                Lifecycle::InProgress
            }
            CheckpointPhase::Failed => Lifecycle::Failed,
            CheckpointPhase::Ready => match find(&self.conditions, crate::condition_types::READY) {
                Some(c) if c.status == "False" => Lifecycle::Failed,
                _ => Lifecycle::Current,
            },
        };
        (lifecycle, phase.as_str())
    }
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn observed_generation_mut(&mut self) -> &mut Option<i64> {
        &mut self.observed_generation
    }
}
