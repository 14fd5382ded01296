//! Checkpoints: one persistent dirty bitmap per selected disk, named after
//! the checkpoint, created atomically across disks.
//!
//! Live operations talk to QEMU ([`create_checkpoint`], [`redefine_checkpoint`],
//! [`delete_checkpoint`], [`inspect_checkpoint`]); the offline variants work on
//! a stopped VM's images with `qemu-img bitmap` and need the recorded
//! [`Domain`]. Every bitmap of a checkpoint records all writes since it was
//! made, so checkpoints are independent: deleting one never breaks another.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::image::{self, ImageError};
use crate::inventory::{
    Bitmap, Disk, DiskFormat, InventoryError, SelectionError, VmInventory, VmRef, read_inventory,
    select_disks,
};
use crate::qmp::{BitmapSpec, QmpClient, QmpError, TransactionStep};

/// Prefix reserved for Cairn's temporary QEMU-side names.
pub const RESERVED_PREFIX: &str = "cairn-";

/// What to checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointRequest {
    /// Checkpoint name; also the bitmap name on every disk.
    pub name: String,
    /// Disk names; `None` = every writable qcow2 disk.
    pub disks: Option<Vec<String>>,
}

/// One disk of a recorded VM definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainDisk {
    /// Name users know (`disk0`, `vda`).
    pub name: String,
    /// Format node name.
    pub node_name: String,
    /// Image file.
    pub file: PathBuf,
    /// Image format (`qcow2`, `raw`).
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
}

/// The VM's disk layout as observed when a checkpoint was made; what makes
/// offline work possible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Domain {
    /// All disks of the VM, in QEMU's order.
    pub disks: Vec<DomainDisk>,
}

impl Domain {
    /// Records the layout of a running VM.
    pub fn observe(inventory: &VmInventory) -> Self {
        Self {
            disks: inventory
                .disks
                .iter()
                .map(|d| DomainDisk {
                    name: d.name.clone(),
                    node_name: d.node_name.clone(),
                    file: d.file.clone(),
                    format: d.format.as_str().to_string(),
                    virtual_size: d.virtual_size,
                })
                .collect(),
        }
    }
}

/// A checkpoint's bitmap on one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointDisk {
    /// Disk name.
    pub disk: String,
    /// Bitmap name.
    pub bitmap: String,
    /// Bytes per bit.
    pub granularity: u32,
    /// Bytes written since the checkpoint (libvirt's checkpoint size).
    pub dirty_bytes: u64,
    /// Still recording.
    pub recording: bool,
    /// Unusable after an unclean QEMU exit.
    pub inconsistent: bool,
}

/// A checkpoint as found in QEMU or in the images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Checkpoint name.
    pub name: String,
    /// Per-disk bitmaps.
    pub disks: Vec<CheckpointDisk>,
    /// Disk layout recorded at creation (`None` after a redefine without one).
    pub domain: Option<Domain>,
}

/// Failures of checkpoint operations.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The disk selection is invalid.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// The checkpoint name cannot be a bitmap name.
    #[error("checkpoint name {name:?} is not usable: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A bitmap with the checkpoint's name already exists.
    #[error(
        "disk {disk} of VM {vm} already has a bitmap {bitmap}; pick another checkpoint name or redefine the existing one"
    )]
    AlreadyExists {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Bitmap name.
        bitmap: String,
    },
    /// Redefine: the bitmap is not there.
    #[error(
        "disk {disk} of VM {vm} has no bitmap {bitmap} to adopt; create the checkpoint instead of redefining it"
    )]
    Missing {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Bitmap name.
        bitmap: String,
    },
    /// Redefine: the bitmap would be lost at shutdown.
    #[error(
        "bitmap {bitmap} on disk {disk} of VM {vm} is not persistent, so it cannot back a checkpoint"
    )]
    NotPersistent {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Bitmap name.
        bitmap: String,
    },
    /// The bitmap was left inconsistent by an unclean QEMU exit.
    #[error(
        "bitmap {bitmap} on disk {disk} of VM {vm} is inconsistent (QEMU was not shut down cleanly); delete the checkpoint and take a full backup"
    )]
    Inconsistent {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Bitmap name.
        bitmap: String,
    },
    /// The bitmap is disabled: it stopped recording writes, so changes since
    /// the checkpoint would be missed.
    #[error(
        "bitmap {bitmap} on disk {disk} of VM {vm} is disabled (not recording writes), so it cannot stand for every change since the checkpoint; enable it (`block-dirty-bitmap-enable`, or `qemu-img bitmap --enable` while stopped) or create a new checkpoint"
    )]
    Disabled {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Bitmap name.
        bitmap: String,
    },
    /// A redefine's `domain` names disks or files the VM does not use.
    #[error(
        "the domain given for checkpoint {name} does not match VM {vm}: {problem}; give the VM's real disk layout (names and image files as `kubectl get qemuinstance {vm_name} -o yaml` shows them) or omit the domain"
    )]
    DomainMismatch {
        /// Which VM.
        vm: String,
        /// The VM's name alone.
        vm_name: String,
        /// Checkpoint name.
        name: String,
        /// What does not match.
        problem: String,
    },
    /// A job or export uses the bitmap.
    #[error(
        "bitmap {bitmap} on disk {disk} of VM {vm} is in use by a backup or export; retry when it finished"
    )]
    Busy {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Bitmap name.
        bitmap: String,
    },
    /// No disk carries the checkpoint.
    #[error("VM {vm} has no checkpoint {name} on any disk")]
    NotFound {
        /// Which VM.
        vm: String,
        /// Checkpoint name.
        name: String,
    },
    /// Reading the VM's disks failed.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    /// QEMU refused or the session failed.
    #[error("checkpoint {name} on VM {vm} failed in QEMU")]
    Qmp {
        /// Which VM.
        vm: String,
        /// Checkpoint name.
        name: String,
        /// The QMP failure.
        #[source]
        source: QmpError,
    },
    /// An offline `qemu-img` step failed.
    #[error("offline checkpoint {name} on disk {disk} failed")]
    Image {
        /// Disk name.
        disk: String,
        /// Checkpoint name.
        name: String,
        /// The tool failure.
        #[source]
        source: ImageError,
    },
}

/// Checks that a checkpoint name can be used as a bitmap name.
pub fn validate_name(name: &str) -> Result<(), CheckpointError> {
    let bad = |reason: &str| {
        Err(CheckpointError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 1023 {
        return bad("QEMU bitmap names are at most 1023 bytes");
    }
    if name.starts_with(RESERVED_PREFIX) {
        return bad("the prefix `cairn-` is reserved for temporary bitmaps");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("it contains control characters");
    }
    Ok(())
}

fn checkpoint_disk(disk: &Disk, bitmap: &Bitmap) -> CheckpointDisk {
    CheckpointDisk {
        disk: disk.name.clone(),
        bitmap: bitmap.name.clone(),
        granularity: bitmap.granularity,
        dirty_bytes: bitmap.dirty_bytes,
        recording: bitmap.recording,
        inconsistent: bitmap.inconsistent,
    }
}

/// Why a bitmap cannot stand for a checkpoint, if it cannot: a usable
/// checkpoint bitmap exists, is persistent, consistent and recording.
pub fn bitmap_problem(bitmap: Option<&Bitmap>) -> Option<BitmapProblem> {
    match bitmap {
        None => Some(BitmapProblem::Missing),
        Some(b) if b.inconsistent => Some(BitmapProblem::Inconsistent),
        Some(b) if !b.persistent => Some(BitmapProblem::NotPersistent),
        Some(b) if !b.recording => Some(BitmapProblem::Disabled),
        Some(_) => None,
    }
}

/// What makes a bitmap unusable as a checkpoint ([`bitmap_problem`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapProblem {
    /// The disk has no bitmap of that name.
    Missing,
    /// Left inconsistent by an unclean QEMU exit.
    Inconsistent,
    /// Would be lost when QEMU stops.
    NotPersistent,
    /// Not recording writes.
    Disabled,
}

impl BitmapProblem {
    /// A short explanation for messages about an incremental base.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Missing => "the disk has no such bitmap",
            Self::Inconsistent => "its bitmap is inconsistent after an unclean QEMU exit",
            Self::NotPersistent => "its bitmap is not persistent",
            Self::Disabled => {
                "its bitmap is disabled (not recording), so it misses writes since the checkpoint"
            }
        }
    }

    fn into_error(self, vm: &str, disk: &str, bitmap: &str) -> CheckpointError {
        let (vm, disk, bitmap) = (vm.to_string(), disk.to_string(), bitmap.to_string());
        match self {
            Self::Missing => CheckpointError::Missing { vm, disk, bitmap },
            Self::Inconsistent => CheckpointError::Inconsistent { vm, disk, bitmap },
            Self::NotPersistent => CheckpointError::NotPersistent { vm, disk, bitmap },
            Self::Disabled => CheckpointError::Disabled { vm, disk, bitmap },
        }
    }
}

/// Checks that `bitmap` on each disk can be adopted (exists, persistent,
/// consistent, recording).
pub fn verify_adoptable(vm: &str, disks: &[&Disk], bitmap: &str) -> Result<(), CheckpointError> {
    for d in disks {
        if let Some(problem) = bitmap_problem(d.bitmap(bitmap)) {
            return Err(problem.into_error(vm, &d.name, bitmap));
        }
    }
    Ok(())
}

/// Checks a redefine's claimed domain against the VM's live disks and returns
/// the domain as QEMU sees it for the claimed disks: a claim is not a fact,
/// so only disks whose name and image file (and format, when given) match a
/// disk the VM really uses are recorded, and a claim naming anything else is
/// refused as a whole.
pub fn verify_claimed_domain(
    vm: &VmRef,
    checkpoint: &str,
    claimed: &Domain,
    live: &VmInventory,
) -> Result<Domain, CheckpointError> {
    let mismatch = |problem: String| CheckpointError::DomainMismatch {
        vm: vm.to_string(),
        vm_name: vm.name.clone(),
        name: checkpoint.to_string(),
        problem,
    };
    let observed = Domain::observe(live);
    let mut verified = Vec::new();
    for c in &claimed.disks {
        let Some(real) = observed.disks.iter().find(|d| d.name == c.name) else {
            return Err(mismatch(format!("the VM has no disk {:?}", c.name)));
        };
        if !same_file(&c.file, &real.file) {
            return Err(mismatch(format!(
                "disk {} uses {}, not {}",
                c.name,
                real.file.display(),
                c.file.display()
            )));
        }
        if !c.format.is_empty() && c.format != real.format {
            return Err(mismatch(format!(
                "disk {} is {}, not {}",
                c.name, real.format, c.format
            )));
        }
        if verified.iter().any(|d: &DomainDisk| d.name == c.name) {
            return Err(mismatch(format!("disk {} is listed twice", c.name)));
        }
        verified.push(real.clone());
    }
    Ok(Domain { disks: verified })
}

/// The same image file: equal paths, or the same inode once resolved.
fn same_file(claimed: &std::path::Path, real: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if claimed == real {
        return true;
    }
    match (std::fs::metadata(claimed), std::fs::metadata(real)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The bitmap-add steps of a new checkpoint on `disks` (used alone, or inside
/// a backup's transaction). Fails if a disk already has the bitmap.
pub fn plan_checkpoint(
    vm: &str,
    disks: &[&Disk],
    name: &str,
) -> Result<Vec<TransactionStep>, CheckpointError> {
    validate_name(name)?;
    disks
        .iter()
        .map(|d| {
            if d.bitmap(name).is_some() {
                return Err(CheckpointError::AlreadyExists {
                    vm: vm.to_string(),
                    disk: d.name.clone(),
                    bitmap: name.to_string(),
                });
            }
            Ok(TransactionStep::AddBitmap(BitmapSpec {
                node: d.node_name.clone(),
                name: name.to_string(),
                persistent: true,
                disabled: false,
            }))
        })
        .collect()
}

/// Checks that `request` could be created now (disks exist, no selected disk
/// has the bitmap yet) without changing anything, returning the inventory
/// and the transaction steps. A caller that records "creating" only after
/// this succeeds knows that a bitmap found later is its own.
pub async fn plan_create(
    client: &QmpClient,
    vm: &VmRef,
    request: &CheckpointRequest,
) -> Result<(VmInventory, Vec<TransactionStep>), CheckpointError> {
    let inv = read_inventory(client, vm).await?;
    let vm_name = vm.to_string();
    let disks = select_disks(&vm_name, &inv.disks, request.disks.as_deref())?;
    let steps = plan_checkpoint(&vm_name, &disks, &request.name)?;
    Ok((inv, steps))
}

/// Creates a checkpoint: one `transaction` adding a persistent bitmap to
/// every selected disk (all or nothing). Records the observed domain.
pub async fn create_checkpoint(
    client: &QmpClient,
    vm: &VmRef,
    request: &CheckpointRequest,
) -> Result<CheckpointInfo, CheckpointError> {
    let (inv, steps) = plan_create(client, vm, request).await?;
    let vm_name = vm.to_string();
    let disks = select_disks(&vm_name, &inv.disks, request.disks.as_deref())?;
    let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
    client
        .transaction(&steps)
        .await
        .map_err(|source| CheckpointError::Qmp {
            vm: vm_name.clone(),
            name: request.name.clone(),
            source,
        })?;
    info!(vm = %vm, checkpoint = %request.name, disks = ?names, "checkpoint created");
    let mut info = inspect_checkpoint(client, vm, &request.name).await?;
    info.domain = Some(Domain::observe(&inv));
    Ok(info)
}

/// Adopts existing persistent bitmaps named `request.name` as a checkpoint,
/// after verifying that each selected disk has one that is persistent,
/// consistent and recording. A `claimed` domain is checked against the live
/// VM ([`verify_claimed_domain`]) and only its verified form is returned.
/// Changes nothing in QEMU.
pub async fn redefine_checkpoint(
    client: &QmpClient,
    vm: &VmRef,
    request: &CheckpointRequest,
    claimed: Option<&Domain>,
) -> Result<CheckpointInfo, CheckpointError> {
    let inv = read_inventory(client, vm).await?;
    let vm_name = vm.to_string();
    let disks = select_disks(&vm_name, &inv.disks, request.disks.as_deref())?;
    verify_adoptable(&vm_name, &disks, &request.name)?;
    let domain = claimed
        .map(|c| verify_claimed_domain(vm, &request.name, c, &inv))
        .transpose()?;
    info!(vm = %vm, checkpoint = %request.name, "checkpoint redefined");
    Ok(CheckpointInfo {
        name: request.name.clone(),
        disks: disks
            .iter()
            .filter_map(|d| Some(checkpoint_disk(d, d.bitmap(&request.name)?)))
            .collect(),
        domain,
    })
}

/// Reports the checkpoint's bitmaps (dirty bytes per disk).
pub async fn inspect_checkpoint(
    client: &QmpClient,
    vm: &VmRef,
    name: &str,
) -> Result<CheckpointInfo, CheckpointError> {
    let inv = read_inventory(client, vm).await?;
    found_in(&vm.to_string(), &inv.disks, name, None)
}

/// The checkpoint `name` as found on `disks`; `NotFound` when no disk has it.
fn found_in(
    vm: &str,
    disks: &[Disk],
    name: &str,
    domain: Option<&Domain>,
) -> Result<CheckpointInfo, CheckpointError> {
    let found: Vec<CheckpointDisk> = disks
        .iter()
        .filter_map(|d| Some(checkpoint_disk(d, d.bitmap(name)?)))
        .collect();
    if found.is_empty() {
        return Err(CheckpointError::NotFound {
            vm: vm.to_string(),
            name: name.to_string(),
        });
    }
    Ok(CheckpointInfo {
        name: name.to_string(),
        disks: found,
        domain: domain.cloned(),
    })
}

/// Removes the checkpoint's bitmap from every disk that has it (or from the
/// named disks). Idempotent: returns the disks it removed a bitmap from.
pub async fn delete_checkpoint(
    client: &QmpClient,
    vm: &VmRef,
    name: &str,
    disks: Option<&[String]>,
) -> Result<Vec<String>, CheckpointError> {
    let inv = read_inventory(client, vm).await?;
    let mut removed = Vec::new();
    for d in &inv.disks {
        if disks.is_some_and(|only| !only.contains(&d.name)) {
            continue;
        }
        let Some(b) = d.bitmap(name) else { continue };
        if b.busy {
            return Err(CheckpointError::Busy {
                vm: vm.to_string(),
                disk: d.name.clone(),
                bitmap: name.to_string(),
            });
        }
        match client.remove_bitmap(&d.node_name, name).await {
            Ok(()) => removed.push(d.name.clone()),
            // Gone meanwhile: that is what we wanted.
            Err(QmpError::Command { desc, .. }) if desc.contains("not found") => {}
            Err(source) => {
                return Err(CheckpointError::Qmp {
                    vm: vm.to_string(),
                    name: name.to_string(),
                    source,
                });
            }
        }
    }
    info!(vm = %vm, checkpoint = %name, disks = ?removed, "checkpoint deleted");
    Ok(removed)
}

async fn offline_disks(domain: &Domain) -> Result<Vec<Disk>, CheckpointError> {
    let mut out = Vec::new();
    for d in &domain.disks {
        let bitmaps = if d.format == "qcow2" {
            image::image_info(&d.file, false)
                .await
                .map_err(|source| CheckpointError::Image {
                    disk: d.name.clone(),
                    name: String::new(),
                    source,
                })?
                .bitmaps
                .into_iter()
                .map(|b| Bitmap {
                    inconsistent: b.flags.iter().any(|f| f == "in-use"),
                    recording: b.flags.iter().any(|f| f == "auto"),
                    name: b.name,
                    granularity: b.granularity,
                    persistent: true,
                    busy: false,
                    dirty_bytes: 0,
                })
                .collect()
        } else {
            Vec::new()
        };
        out.push(Disk {
            name: d.name.clone(),
            node_name: d.node_name.clone(),
            file: d.file.clone(),
            format: DiskFormat::from_driver(&d.format),
            virtual_size: d.virtual_size,
            read_only: false,
            bitmaps,
        });
    }
    Ok(out)
}

/// Creates a checkpoint on a stopped VM with `qemu-img bitmap --add` on
/// each selected image; if one fails, the bitmaps already added are removed.
pub async fn create_checkpoint_offline(
    vm: &str,
    domain: &Domain,
    request: &CheckpointRequest,
) -> Result<CheckpointInfo, CheckpointError> {
    let all = offline_disks(domain).await?;
    let disks = select_disks(vm, &all, request.disks.as_deref())?;
    plan_checkpoint(vm, &disks, &request.name)?;
    let mut done: Vec<&Disk> = Vec::new();
    for d in &disks {
        if let Err(source) = image::bitmap_add(&d.file, &request.name).await {
            for undo in &done {
                let _ = image::bitmap_remove(&undo.file, &request.name).await;
            }
            return Err(CheckpointError::Image {
                disk: d.name.clone(),
                name: request.name.clone(),
                source,
            });
        }
        done.push(d);
    }
    let after = offline_disks(domain).await?;
    Ok(CheckpointInfo {
        name: request.name.clone(),
        disks: after
            .iter()
            .filter_map(|d| Some(checkpoint_disk(d, d.bitmap(&request.name)?)))
            .collect(),
        domain: Some(domain.clone()),
    })
}

/// Checks that `request` could be created offline now (disks exist, no
/// selected image has the bitmap yet) without changing anything.
pub async fn plan_create_offline(
    vm: &str,
    domain: &Domain,
    request: &CheckpointRequest,
) -> Result<(), CheckpointError> {
    let all = offline_disks(domain).await?;
    let disks = select_disks(vm, &all, request.disks.as_deref())?;
    plan_checkpoint(vm, &disks, &request.name).map(drop)
}

/// Reports a checkpoint's bitmaps in a stopped VM's images (no dirty counts:
/// only a running QEMU knows them).
pub async fn inspect_checkpoint_offline(
    vm: &str,
    domain: &Domain,
    name: &str,
) -> Result<CheckpointInfo, CheckpointError> {
    found_in(vm, &offline_disks(domain).await?, name, Some(domain))
}

/// Removes a checkpoint's bitmaps from a stopped VM's images; idempotent.
pub async fn delete_checkpoint_offline(
    domain: &Domain,
    name: &str,
) -> Result<Vec<String>, CheckpointError> {
    let mut removed = Vec::new();
    for d in offline_disks(domain).await? {
        if d.bitmap(name).is_some() {
            image::bitmap_remove(&d.file, name)
                .await
                .map_err(|source| CheckpointError::Image {
                    disk: d.name.clone(),
                    name: name.to_string(),
                    source,
                })?;
            removed.push(d.name.clone());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(recording: bool, persistent: bool, inconsistent: bool) -> Bitmap {
        Bitmap {
            name: "cp".into(),
            granularity: 65536,
            recording,
            persistent,
            busy: false,
            inconsistent,
            dirty_bytes: 0,
        }
    }

    #[test]
    fn a_usable_bitmap_is_persistent_consistent_and_recording() {
        assert_eq!(bitmap_problem(Some(&bitmap(true, true, false))), None);
        assert_eq!(bitmap_problem(None), Some(BitmapProblem::Missing));
        assert_eq!(
            bitmap_problem(Some(&bitmap(false, true, false))),
            Some(BitmapProblem::Disabled)
        );
        assert_eq!(
            bitmap_problem(Some(&bitmap(true, false, false))),
            Some(BitmapProblem::NotPersistent)
        );
        // An inconsistent bitmap also stops recording: inconsistency is the news.
        assert_eq!(
            bitmap_problem(Some(&bitmap(false, true, true))),
            Some(BitmapProblem::Inconsistent)
        );
    }

    fn inventory(disks: &[(&str, &str)]) -> VmInventory {
        VmInventory {
            vm: VmRef {
                namespace: "ns".into(),
                name: "vm".into(),
                socket: PathBuf::from("/run/cairn/qmp/ns/vm.sock"),
            },
            qemu_version: "10.0.2".into(),
            run_state: "running".into(),
            disks: disks
                .iter()
                .map(|(name, file)| Disk {
                    name: name.to_string(),
                    node_name: format!("{name}-fmt"),
                    file: PathBuf::from(file),
                    format: DiskFormat::Qcow2,
                    virtual_size: 1 << 20,
                    read_only: false,
                    bitmaps: vec![],
                })
                .collect(),
        }
    }

    fn claim(disks: &[(&str, &str)]) -> Domain {
        Domain {
            disks: disks
                .iter()
                .map(|(name, file)| DomainDisk {
                    name: name.to_string(),
                    node_name: String::new(),
                    file: PathBuf::from(file),
                    format: String::new(),
                    virtual_size: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_claimed_domain_is_recorded_only_as_the_vm_really_is() {
        let live = inventory(&[("vda", "/img/ns/vm-a.qcow2"), ("vdb", "/img/ns/vm-b.qcow2")]);
        let vm = live.vm.clone();
        let ok = verify_claimed_domain(&vm, "cp", &claim(&[("vda", "/img/ns/vm-a.qcow2")]), &live)
            .unwrap();
        assert_eq!(ok.disks.len(), 1);
        assert_eq!(ok.disks[0].node_name, "vda-fmt", "facts come from QEMU");
        // Another tenant's image under a real disk name.
        let e = verify_claimed_domain(
            &vm,
            "cp",
            &claim(&[("vda", "/img/other/victim.qcow2")]),
            &live,
        )
        .unwrap_err();
        assert!(matches!(e, CheckpointError::DomainMismatch { .. }), "{e}");
        assert!(e.to_string().contains("/img/other/victim.qcow2"), "{e}");
        // A disk the VM does not have.
        let e = verify_claimed_domain(&vm, "cp", &claim(&[("vdz", "/img/ns/vm-a.qcow2")]), &live)
            .unwrap_err();
        assert!(matches!(e, CheckpointError::DomainMismatch { .. }), "{e}");
        // Listed twice.
        let e = verify_claimed_domain(
            &vm,
            "cp",
            &claim(&[("vda", "/img/ns/vm-a.qcow2"), ("vda", "/img/ns/vm-a.qcow2")]),
            &live,
        )
        .unwrap_err();
        assert!(matches!(e, CheckpointError::DomainMismatch { .. }), "{e}");
    }

    #[test]
    fn names() {
        assert!(validate_name("daily-1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("cairn-x").is_err());
        assert!(validate_name(&"a".repeat(1024)).is_err());
    }
}
