//! A VM's disks and bitmaps in Cairn's terms, built from `query-block`.
//!
//! [`read_inventory`] asks QEMU; [`select_disks`] is the pure rule that
//! turns a user's disk list (or none) into the disks an operation touches.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::qmp::{BlockDeviceView, BlockNodeView, QmpClient, QmpError};

/// Filter drivers QEMU may insert above a disk's format node (a running
/// backup job puts `copy-before-write` there; `query-block` then shows the
/// filter, with an auto-generated node name, as the device's root).
const FILTER_DRIVERS: &[&str] = &[
    "copy-before-write",
    // A pull export's point-in-time view: it reports the disk's image file
    // too, but it is not the disk.
    "snapshot-access",
    "backup-top",
    "throttle",
    "compress",
    "preallocate",
    "copy-on-read",
    "blkdebug",
    "blklogwrites",
];
const PROTOCOL_DRIVERS: &[&str] = &["file", "host_device", "host_cdrom", "nbd"];

/// The format node under any filters: same image file, not a filter, not a protocol node.
fn format_node<'a>(top: &'a BlockNodeView, nodes: &'a [BlockNodeView]) -> &'a BlockNodeView {
    if !FILTER_DRIVERS.contains(&top.drv.as_str()) {
        return top;
    }
    nodes
        .iter()
        .find(|n| {
            n.file == top.file
                && !FILTER_DRIVERS.contains(&n.drv.as_str())
                && !PROTOCOL_DRIVERS.contains(&n.drv.as_str())
        })
        .unwrap_or(top)
}

/// Which VM, as the discovery layout names it (`<root>/<namespace>/<name>.sock`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmRef {
    /// Namespace, taken from the socket path only.
    pub namespace: String,
    /// VM name.
    pub name: String,
    /// QMP socket.
    pub socket: PathBuf,
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Image format of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2: supports persistent bitmaps.
    Qcow2,
    /// raw: no persistent bitmaps.
    Raw,
    /// Anything else, by QEMU's driver name.
    Other(String),
}

impl DiskFormat {
    /// Maps QEMU's driver name.
    pub fn from_driver(drv: &str) -> Self {
        match drv {
            "qcow2" => DiskFormat::Qcow2,
            "raw" => DiskFormat::Raw,
            other => DiskFormat::Other(other.to_string()),
        }
    }

    /// The driver name (`qcow2`, `raw`, ...).
    pub fn as_str(&self) -> &str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
            DiskFormat::Other(s) => s,
        }
    }
}

/// A dirty bitmap on a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    /// Bitmap name (a checkpoint name for Cairn's own bitmaps).
    pub name: String,
    /// Bytes per bit.
    pub granularity: u32,
    /// Recording writes.
    pub recording: bool,
    /// Stored in the image.
    pub persistent: bool,
    /// Used by a job or export.
    pub busy: bool,
    /// Left by an unclean shutdown; can only be removed.
    pub inconsistent: bool,
    /// Bytes written since the bitmap was created.
    pub dirty_bytes: u64,
}

/// A disk attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The name users know: the qdev id (`disk0`, `vda`), else the drive id, else the node name.
    pub name: String,
    /// The format node (where bitmaps live).
    pub node_name: String,
    /// Image file.
    pub file: PathBuf,
    /// Image format.
    pub format: DiskFormat,
    /// Guest visible size in bytes.
    pub virtual_size: u64,
    /// Attached read-only.
    pub read_only: bool,
    /// Named bitmaps on the format node.
    pub bitmaps: Vec<Bitmap>,
}

impl Disk {
    /// The named bitmap, if present.
    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// Everything Cairn knows about one running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInventory {
    /// Which VM.
    pub vm: VmRef,
    /// QEMU version, e.g. `10.0.2`.
    pub qemu_version: String,
    /// QEMU run state (`running`, `paused`, ...).
    pub run_state: String,
    /// Disks in QEMU's order.
    pub disks: Vec<Disk>,
}

impl VmInventory {
    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// Failures reading the inventory.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// QEMU could not be asked.
    #[error("cannot read the disks of VM {vm}")]
    Qmp {
        /// Which VM.
        vm: String,
        /// Transport or QEMU failure.
        #[source]
        source: QmpError,
    },
}

/// Why a disk selection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// A requested disk does not exist.
    #[error("VM {vm} has no disk {disk} (disks: {known}); fix the disk name")]
    UnknownDisk {
        /// Which VM.
        vm: String,
        /// Requested name.
        disk: String,
        /// Existing disk names, comma separated.
        known: String,
    },
    /// A requested disk is not qcow2, so it cannot hold a persistent bitmap.
    #[error(
        "disk {disk} of VM {vm} is {format}, not qcow2: it cannot carry a checkpoint; leave it out of the disk list or convert it to qcow2"
    )]
    NotQcow2 {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Its format.
        format: String,
    },
    /// A requested disk is attached read-only.
    #[error("disk {disk} of VM {vm} is read-only; leave it out of the disk list")]
    ReadOnly {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
    },
    /// A disk was named twice.
    #[error("disk {disk} of VM {vm} is listed twice")]
    Duplicate {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
    },
    /// Nothing to do.
    #[error("VM {vm} has no writable qcow2 disk to work on")]
    NoDisks {
        /// Which VM.
        vm: String,
    },
}

/// Chooses the disks of an incremental backup from checkpoint `base`: the
/// named ones, or by default the writable qcow2 disks that carry the base
/// bitmap (a disk added since the checkpoint has no changes to take from it).
/// When no disk carries it, the default is every writable qcow2 disk, so the
/// caller reports the missing base (or falls back to full) for each.
pub fn select_incremental_disks<'a>(
    vm: &str,
    disks: &'a [Disk],
    requested: Option<&[String]>,
    base: &str,
) -> Result<Vec<&'a Disk>, SelectionError> {
    let all = select_disks(vm, disks, requested)?;
    if requested.is_some() {
        return Ok(all);
    }
    let with_base: Vec<&Disk> = all
        .iter()
        .copied()
        .filter(|d| d.bitmap(base).is_some())
        .collect();
    Ok(if with_base.is_empty() { all } else { with_base })
}

/// Chooses the disks an operation works on: the named ones (each must exist,
/// be qcow2 and writable), or by default every writable qcow2 disk.
pub fn select_disks<'a>(
    vm: &str,
    disks: &'a [Disk],
    requested: Option<&[String]>,
) -> Result<Vec<&'a Disk>, SelectionError> {
    let selected: Vec<&Disk> = match requested {
        None => disks
            .iter()
            .filter(|d| d.format == DiskFormat::Qcow2 && !d.read_only)
            .collect(),
        Some(names) => {
            let mut out: Vec<&Disk> = Vec::new();
            for name in names {
                let disk = disks.iter().find(|d| &d.name == name).ok_or_else(|| {
                    SelectionError::UnknownDisk {
                        vm: vm.to_string(),
                        disk: name.clone(),
                        known: disks
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                })?;
                if out.iter().any(|d| d.name == disk.name) {
                    return Err(SelectionError::Duplicate {
                        vm: vm.to_string(),
                        disk: name.clone(),
                    });
                }
                if disk.format != DiskFormat::Qcow2 {
                    return Err(SelectionError::NotQcow2 {
                        vm: vm.to_string(),
                        disk: name.clone(),
                        format: disk.format.as_str().to_string(),
                    });
                }
                if disk.read_only {
                    return Err(SelectionError::ReadOnly {
                        vm: vm.to_string(),
                        disk: name.clone(),
                    });
                }
                out.push(disk);
            }
            out
        }
    };
    if selected.is_empty() {
        return Err(SelectionError::NoDisks { vm: vm.to_string() });
    }
    Ok(selected)
}

/// The name users know a device by.
fn disk_name(dev: &BlockDeviceView, node: &str) -> String {
    if let Some(qdev) = dev.qdev.as_deref() {
        // `/machine/peripheral/<id>/virtio-backend` or a bare id.
        if let Some(rest) = qdev.strip_prefix("/machine/peripheral/") {
            if let Some(id) = rest.split('/').next().filter(|s| !s.is_empty()) {
                return id.to_string();
            }
        } else if !qdev.starts_with('/') && !qdev.is_empty() {
            return qdev.to_string();
        }
    }
    if !dev.device.is_empty() {
        return dev.device.clone();
    }
    node.to_string()
}

/// Converts `query-block` output into disks (devices without a medium are
/// skipped). `nodes` (`query-named-block-nodes`) resolves filters sitting
/// above a format node; it may be empty when no filter is present.
pub fn disks_from_devices(devices: &[BlockDeviceView], nodes: &[BlockNodeView]) -> Vec<Disk> {
    devices
        .iter()
        .filter_map(|dev| {
            let node = format_node(dev.inserted.as_ref()?, nodes);
            let node_name = node.node_name.clone().unwrap_or_default();
            Some(Disk {
                name: disk_name(dev, &node_name),
                node_name,
                file: PathBuf::from(&node.image.filename),
                format: DiskFormat::from_driver(&node.drv),
                virtual_size: node.image.virtual_size,
                read_only: node.ro,
                bitmaps: node
                    .dirty_bitmaps
                    .iter()
                    .filter_map(|b| {
                        Some(Bitmap {
                            name: b.name.clone()?,
                            granularity: b.granularity,
                            recording: b.recording,
                            persistent: b.persistent,
                            busy: b.busy,
                            inconsistent: b.inconsistent,
                            dirty_bytes: b.count,
                        })
                    })
                    .collect(),
            })
        })
        .collect()
}

/// Reads the VM's disks, bitmaps and run state from QEMU.
pub async fn read_inventory(client: &QmpClient, vm: &VmRef) -> Result<VmInventory, InventoryError> {
    let wrap = |source| InventoryError::Qmp {
        vm: vm.to_string(),
        source,
    };
    let devices = client.query_block().await.map_err(wrap)?;
    let run_state = client.query_run_state().await.map_err(wrap)?;
    let filtered = devices
        .iter()
        .filter_map(|d| d.inserted.as_ref())
        .any(|n| FILTER_DRIVERS.contains(&n.drv.as_str()));
    let nodes = if filtered {
        client.query_named_block_nodes().await.map_err(wrap)?
    } else {
        Vec::new()
    };
    Ok(VmInventory {
        vm: vm.clone(),
        qemu_version: client.qemu_version().unwrap_or_default(),
        run_state,
        disks: disks_from_devices(&devices, &nodes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, format: DiskFormat, ro: bool) -> Disk {
        Disk {
            name: name.into(),
            node_name: format!("{name}-fmt"),
            file: PathBuf::from(format!("/img/{name}")),
            format,
            virtual_size: 1 << 20,
            read_only: ro,
            bitmaps: vec![],
        }
    }

    #[test]
    fn default_selection_takes_writable_qcow2_only() {
        let disks = vec![
            disk("a", DiskFormat::Qcow2, false),
            disk("b", DiskFormat::Raw, false),
            disk("c", DiskFormat::Qcow2, true),
        ];
        let sel = select_disks("ns/vm", &disks, None).unwrap();
        assert_eq!(
            sel.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
    }

    #[test]
    fn incremental_default_selection_takes_disks_with_the_base_bitmap() {
        let bitmap = |name: &str| Bitmap {
            name: name.into(),
            granularity: 65536,
            recording: true,
            persistent: true,
            busy: false,
            inconsistent: false,
            dirty_bytes: 0,
        };
        let mut with = disk("a", DiskFormat::Qcow2, false);
        with.bitmaps.push(bitmap("cp1"));
        let added_later = disk("b", DiskFormat::Qcow2, false);
        let disks = vec![with, added_later];
        let names = |v: Vec<&Disk>| v.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
        let sel = select_incremental_disks("ns/vm", &disks, None, "cp1").unwrap();
        assert_eq!(names(sel), ["a"]);
        // Nobody carries the base: every disk, so each reports it (or falls back).
        let sel = select_incremental_disks("ns/vm", &disks, None, "other").unwrap();
        assert_eq!(names(sel), ["a", "b"]);
        // An explicit selection is kept as given.
        let sel = select_incremental_disks("ns/vm", &disks, Some(&["b".into()]), "cp1").unwrap();
        assert_eq!(names(sel), ["b"]);
    }

    #[test]
    fn explicit_selection_errors() {
        let disks = vec![
            disk("a", DiskFormat::Qcow2, false),
            disk("b", DiskFormat::Raw, false),
        ];
        let e = select_disks("ns/vm", &disks, Some(&["b".into()])).unwrap_err();
        assert!(matches!(e, SelectionError::NotQcow2 { .. }), "{e}");
        assert!(e.to_string().contains("disk b"));
        let e = select_disks("ns/vm", &disks, Some(&["zz".into()])).unwrap_err();
        assert!(matches!(e, SelectionError::UnknownDisk { .. }));
        let e = select_disks("ns/vm", &disks, Some(&["a".into(), "a".into()])).unwrap_err();
        assert!(matches!(e, SelectionError::Duplicate { .. }));
        let e = select_disks("ns/vm", &disks[1..], None).unwrap_err();
        assert!(matches!(e, SelectionError::NoDisks { .. }));
    }

    #[test]
    fn names_from_qdev_paths() {
        let json = r#"[{"device":"","qdev":"/machine/peripheral/vda/virtio-backend","inserted":{"node-name":"n1","drv":"qcow2","file":"/x","ro":false,"image":{"filename":"/x","format":"qcow2","virtual-size":10,"new-field":1},"dirty-bitmaps":[{"name":"c1","granularity":65536,"count":0,"recording":true,"persistent":true,"busy":false},{"granularity":65536,"count":0,"recording":true,"persistent":false,"busy":true}]}},{"device":"ide0","locked":false}]"#;
        let devs: Vec<BlockDeviceView> = serde_json::from_str(json).unwrap();
        let disks = disks_from_devices(&devs, &[]);
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].name, "vda");
        assert_eq!(disks[0].bitmaps.len(), 1);
    }
}
