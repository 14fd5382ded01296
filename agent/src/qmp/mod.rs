//! Everything Cairn says to QEMU goes through this module; it is the only
//! place that imports `qapi`.
//!
//! [`transport`] owns the socket (ids, pipelining, events, timeouts,
//! reconnect). The methods on [`QmpClient`] defined here speak Cairn's terms
//! ([`BitmapSpec`], [`BackupSpec`], [`TransactionStep`]) and translate them
//! into the typed command structs of `qapi::qmp`, serialised with
//! `qapi::Command::NAME` + serde. Query replies are decoded into this
//! module's own lenient view structs instead of qapi's reply types, so a
//! field or enum value that QEMU added after the 9.1 schema the crate was
//! generated from (e.g. a new job type or image-info variant) is ignored
//! instead of failing the whole query.

pub mod transport;

use qapi::qmp;
use serde::Deserialize;
use serde_json::Value;

pub use transport::{ConnectionState, QmpClient, QmpError, QmpEvent, QmpOptions};

/// A dirty bitmap as QEMU reports it (`BlockDirtyInfo`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct DirtyBitmapView {
    /// Absent for the anonymous bitmap a running job uses.
    #[serde(default)]
    pub name: Option<String>,
    /// Bytes per bit.
    pub granularity: u32,
    /// Dirty bytes recorded.
    pub count: u64,
    /// Whether writes are being recorded.
    #[serde(default)]
    pub recording: bool,
    /// Stored in the qcow2 image on close.
    #[serde(default)]
    pub persistent: bool,
    /// In use by a job or export.
    #[serde(default)]
    pub busy: bool,
    /// Loaded from an image that was not closed cleanly; only removal works.
    #[serde(default)]
    pub inconsistent: bool,
}

/// Image facts of a block node (`ImageInfo`, the fields Cairn needs).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ImageView {
    /// Image file name.
    pub filename: String,
    /// Image format as QEMU probed it.
    pub format: String,
    /// Guest visible size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Backing file name, if any.
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    /// Bytes the image occupies on the host (allocated).
    #[serde(rename = "actual-size", default)]
    pub actual_size: Option<u64>,
}

/// A block node (`BlockDeviceInfo`, the fields Cairn needs).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct BlockNodeView {
    /// Node name; auto-generated (`#block123`) when not given.
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    /// Driver, e.g. `qcow2`, `raw`, `file`.
    pub drv: String,
    /// File name the node reads.
    pub file: String,
    /// Read-only node.
    pub ro: bool,
    /// Image information.
    pub image: ImageView,
    /// Bitmaps on this node.
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<DirtyBitmapView>,
}

/// A block backend with its device (`BlockInfo`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct BlockDeviceView {
    /// Legacy drive id; empty for `-blockdev` setups.
    pub device: String,
    /// qdev path or id of the attached device.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The root node, when a medium is inserted.
    #[serde(default)]
    pub inserted: Option<BlockNodeView>,
}

/// A job as `query-jobs` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct JobView {
    /// Job id.
    pub id: String,
    /// Job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Status, e.g. `running`, `concluded`.
    pub status: String,
    /// Progress so far (bytes for backup jobs).
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    /// Estimated total.
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// Error message of a failed job.
    #[serde(default)]
    pub error: Option<String>,
}

/// A block export as `query-block-exports` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ExportView {
    /// Export id.
    pub id: String,
    /// Exported node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Being removed.
    #[serde(rename = "shutting-down", default)]
    pub shutting_down: bool,
}

/// A bitmap to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSpec {
    /// Node that gets the bitmap (the qcow2 format node for persistent ones).
    pub node: String,
    /// Bitmap name.
    pub name: String,
    /// Stored in the image.
    pub persistent: bool,
    /// Created disabled (not recording).
    pub disabled: bool,
}

/// What a backup job copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupSync {
    /// Everything.
    Full,
    /// Clusters dirty in `bitmap`, which is left untouched (`bitmap-mode: never`).
    Bitmap {
        /// The base bitmap on the source node.
        bitmap: String,
    },
    /// Nothing up front; only copy-before-write of guest writes (fleecing).
    None,
}

/// A `blockdev-backup` job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSpec {
    /// Job id.
    pub job_id: String,
    /// Source node.
    pub device: String,
    /// Target node (added with `blockdev-add`, same size as the source).
    pub target: String,
    /// What to copy.
    pub sync: BackupSync,
    /// Optional rate limit in bytes per second.
    pub speed: Option<u64>,
}

/// One action of an atomic `transaction`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransactionStep {
    /// `block-dirty-bitmap-add`.
    AddBitmap(BitmapSpec),
    /// `block-dirty-bitmap-merge` of `sources` (on `node`) into `target`.
    MergeBitmaps {
        /// Node of all bitmaps.
        node: String,
        /// Destination bitmap.
        target: String,
        /// Source bitmaps.
        sources: Vec<String>,
    },
    /// `blockdev-backup` (with `auto-dismiss: false`).
    Backup(BackupSpec),
}

fn bitmap_add(spec: &BitmapSpec) -> qmp::BlockDirtyBitmapAdd {
    qmp::BlockDirtyBitmapAdd {
        node: spec.node.clone(),
        name: spec.name.clone(),
        persistent: Some(spec.persistent),
        disabled: Some(spec.disabled),
        granularity: None,
    }
}

fn backup_args(spec: &BackupSpec) -> qmp::BlockdevBackup {
    let (sync, bitmap, bitmap_mode) = match &spec.sync {
        BackupSync::Full => (qmp::MirrorSyncMode::full, None, None),
        BackupSync::Bitmap { bitmap } => (
            qmp::MirrorSyncMode::bitmap,
            Some(bitmap.clone()),
            Some(qmp::BitmapSyncMode::never),
        ),
        BackupSync::None => (qmp::MirrorSyncMode::none, None, None),
    };
    qmp::BlockdevBackup {
        target: spec.target.clone(),
        base: qmp::BackupCommon {
            job_id: Some(spec.job_id.clone()),
            device: spec.device.clone(),
            sync,
            bitmap,
            bitmap_mode,
            auto_dismiss: Some(false),
            auto_finalize: Some(true),
            compress: None,
            discard_source: None,
            filter_node_name: None,
            on_source_error: None,
            on_target_error: None,
            speed: spec.speed.map(|s| s as i64),
            x_perf: None,
        },
    }
}

fn blockdev_base(node: Option<&str>, read_only: bool, direct: bool) -> qmp::BlockdevOptionsBase {
    qmp::BlockdevOptionsBase {
        auto_read_only: None,
        cache: direct.then_some(qmp::BlockdevCacheOptions {
            direct: Some(true),
            no_flush: None,
        }),
        detect_zeroes: None,
        discard: Some(qmp::BlockdevDiscardOptions::unmap),
        force_share: None,
        node_name: node.map(str::to_string),
        read_only: Some(read_only),
    }
}

/// How a qcow2 image node gets its backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingChoice {
    /// Do not open any backing file (`backing: null`), even if the header names one.
    Detached,
    /// Use this existing node as the backing (fleecing scratch in front of a live disk).
    Node(String),
}

impl QmpClient {
    async fn execute<C: qapi::Command>(&self, command: &C) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(command).map_err(|source| QmpError::Decode {
            command: C::NAME.to_string(),
            source,
        })?;
        let ret = self.execute_raw(C::NAME, Some(args)).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Decode {
            command: C::NAME.to_string(),
            source,
        })
    }

    async fn query<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        args: Option<Value>,
    ) -> Result<T, QmpError> {
        let ret = self.execute_raw(name, args).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Decode {
            command: name.to_string(),
            source,
        })
    }

    /// `query-block`: devices and their root nodes.
    pub async fn query_block(&self) -> Result<Vec<BlockDeviceView>, QmpError> {
        let cmd = serde_json::to_value(qmp::query_block {}).ok();
        self.query(<qmp::query_block as qapi::Command>::NAME, cmd)
            .await
    }

    /// `query-named-block-nodes` (flat): every named node.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockNodeView>, QmpError> {
        let cmd = serde_json::to_value(qmp::query_named_block_nodes { flat: Some(true) }).ok();
        self.query(<qmp::query_named_block_nodes as qapi::Command>::NAME, cmd)
            .await
    }

    /// `query-jobs`.
    pub async fn query_jobs(&self) -> Result<Vec<JobView>, QmpError> {
        self.query(<qmp::query_jobs as qapi::Command>::NAME, None)
            .await
    }

    /// `query-block-exports`.
    pub async fn query_block_exports(&self) -> Result<Vec<ExportView>, QmpError> {
        self.query(<qmp::query_block_exports as qapi::Command>::NAME, None)
            .await
    }

    /// `query-status`: the run state as QEMU names it (`running`, `paused`, ...).
    pub async fn query_run_state(&self) -> Result<String, QmpError> {
        #[derive(Deserialize)]
        struct Status {
            status: String,
        }
        let s: Status = self
            .query(<qmp::query_status as qapi::Command>::NAME, None)
            .await?;
        Ok(s.status)
    }

    /// One atomic `transaction`: all steps happen or none.
    pub async fn transaction(&self, steps: &[TransactionStep]) -> Result<(), QmpError> {
        let actions = steps
            .iter()
            .map(|s| match s {
                TransactionStep::AddBitmap(b) => qmp::TransactionAction::from(bitmap_add(b)),
                TransactionStep::MergeBitmaps {
                    node,
                    target,
                    sources,
                } => qmp::TransactionAction::from(qmp::BlockDirtyBitmapMerge {
                    node: node.clone(),
                    target: target.clone(),
                    bitmaps: sources
                        .iter()
                        .map(|n| qmp::BlockDirtyBitmapOrStr::local(n.clone()))
                        .collect(),
                }),
                TransactionStep::Backup(b) => qmp::TransactionAction::from(backup_args(b)),
            })
            .collect();
        self.execute(&qmp::transaction {
            actions,
            properties: None,
        })
        .await?;
        Ok(())
    }

    /// `block-dirty-bitmap-add`.
    pub async fn add_bitmap(&self, spec: &BitmapSpec) -> Result<(), QmpError> {
        self.execute(&qmp::block_dirty_bitmap_add(bitmap_add(spec)))
            .await?;
        Ok(())
    }

    /// `block-dirty-bitmap-remove`.
    pub async fn remove_bitmap(&self, node: &str, name: &str) -> Result<(), QmpError> {
        self.execute(&qmp::block_dirty_bitmap_remove(qmp::BlockDirtyBitmap {
            node: node.to_string(),
            name: name.to_string(),
        }))
        .await?;
        Ok(())
    }

    /// `blockdev-add` of a qcow2 image at `filename` as node `node` (the
    /// protocol child is defined inline and goes away with it). `direct`
    /// opens the file with O_DIRECT (`cache.direct`).
    pub async fn add_qcow2_node(
        &self,
        node: &str,
        filename: &str,
        direct: bool,
        read_only: bool,
        backing: &BackingChoice,
    ) -> Result<(), QmpError> {
        let file = qmp::BlockdevOptions::file {
            base: blockdev_base(None, read_only, direct),
            file: qmp::BlockdevOptionsFile {
                filename: filename.to_string(),
                aio: None,
                aio_max_batch: None,
                drop_cache: None,
                locking: None,
                pr_manager: None,
                x_check_cache_dropped: None,
            },
        };
        let backing = match backing {
            BackingChoice::Detached => qmp::BlockdevRefOrNull::null(()),
            BackingChoice::Node(n) => qmp::BlockdevRefOrNull::reference(n.clone()),
        };
        let opts = qmp::BlockdevOptions::qcow2 {
            base: blockdev_base(Some(node), read_only, direct),
            qcow2: qmp::BlockdevOptionsQcow2 {
                base: qmp::BlockdevOptionsGenericCOWFormat {
                    base: qmp::BlockdevOptionsGenericFormat {
                        file: qmp::BlockdevRef::definition(Box::new(file)),
                    },
                    backing: Some(backing),
                },
                cache_clean_interval: None,
                cache_size: None,
                data_file: None,
                discard_no_unref: None,
                encrypt: None,
                l2_cache_entry_size: None,
                l2_cache_size: None,
                lazy_refcounts: None,
                overlap_check: None,
                pass_discard_other: None,
                pass_discard_request: None,
                pass_discard_snapshot: None,
                refcount_cache_size: None,
            },
        };
        self.execute(&qmp::blockdev_add(opts)).await?;
        Ok(())
    }

    /// `blockdev-del`.
    pub async fn blockdev_del(&self, node: &str) -> Result<(), QmpError> {
        self.execute(&qmp::blockdev_del {
            node_name: node.to_string(),
        })
        .await?;
        Ok(())
    }

    /// `blockdev-backup` outside a transaction (`auto-dismiss: false`).
    pub async fn blockdev_backup(&self, spec: &BackupSpec) -> Result<(), QmpError> {
        self.execute(&qmp::blockdev_backup(backup_args(spec)))
            .await?;
        Ok(())
    }

    /// `job-cancel`.
    pub async fn job_cancel(&self, id: &str) -> Result<(), QmpError> {
        self.execute(&qmp::job_cancel { id: id.to_string() })
            .await?;
        Ok(())
    }

    /// `job-dismiss` of a concluded job.
    pub async fn job_dismiss(&self, id: &str) -> Result<(), QmpError> {
        self.execute(&qmp::job_dismiss { id: id.to_string() })
            .await?;
        Ok(())
    }

    /// `nbd-server-start` on a unix socket.
    pub async fn nbd_server_start_unix(&self, path: &str) -> Result<(), QmpError> {
        let addr = qmp::SocketAddressLegacy::unix(qmp::UnixSocketAddressWrapper {
            data: qmp::UnixSocketAddress {
                path: path.to_string(),
                abstract_: None,
                tight: None,
            },
        });
        self.execute(&qmp::nbd_server_start {
            addr,
            max_connections: None,
            tls_authz: None,
            tls_creds: None,
        })
        .await?;
        Ok(())
    }

    /// `nbd-server-stop`.
    pub async fn nbd_server_stop(&self) -> Result<(), QmpError> {
        self.execute(&qmp::nbd_server_stop {}).await?;
        Ok(())
    }

    /// `block-export-add` of a read-only NBD export named `name` with the
    /// given `(node, bitmap)` pairs exposed as `qemu:dirty-bitmap:<bitmap>`.
    pub async fn nbd_export_add(
        &self,
        id: &str,
        node: &str,
        name: &str,
        bitmaps: &[(String, String)],
    ) -> Result<(), QmpError> {
        let opts = qmp::BlockExportOptions::nbd {
            base: qmp::BlockExportOptionsBase {
                id: id.to_string(),
                node_name: node.to_string(),
                writable: Some(false),
                writethrough: None,
                fixed_iothread: None,
                iothread: None,
            },
            nbd: qmp::BlockExportOptionsNbd {
                base: qmp::BlockExportOptionsNbdBase {
                    name: Some(name.to_string()),
                    description: None,
                },
                allocation_depth: Some(true),
                bitmaps: Some(
                    bitmaps
                        .iter()
                        .map(|(node, name)| {
                            qmp::BlockDirtyBitmapOrStr::external(qmp::BlockDirtyBitmap {
                                node: node.clone(),
                                name: name.clone(),
                            })
                        })
                        .collect(),
                ),
            },
        };
        self.execute(&qmp::block_export_add(opts)).await?;
        Ok(())
    }

    /// `block-export-del` with `mode: hard` (drops connected clients).
    pub async fn block_export_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute(&qmp::block_export_del {
            id: id.to_string(),
            mode: Some(qmp::BlockExportRemoveMode::hard),
        })
        .await?;
        Ok(())
    }

    /// `human-monitor-command`; returns HMP's output text.
    pub async fn hmp(&self, command_line: &str) -> Result<String, QmpError> {
        self.execute(&qmp::human_monitor_command {
            command_line: command_line.to_string(),
            cpu_index: None,
        })
        .await
    }

    /// `blockdev-add` of a `copy-before-write` filter over `file` that copies
    /// old data to `target` before a write reaches `file`. With
    /// `on-cbw-error: break-snapshot` a failed (or, after `cbw_timeout_seconds`,
    /// slow) copy drops the point-in-time view instead of failing the guest's
    /// write.
    pub async fn add_copy_before_write(
        &self,
        node: &str,
        file: &str,
        target: &str,
        cbw_timeout_seconds: u32,
    ) -> Result<(), QmpError> {
        let args = serde_json::json!({
            "driver": "copy-before-write",
            "node-name": node,
            "file": file,
            "target": target,
            "on-cbw-error": "break-snapshot",
            "cbw-timeout": cbw_timeout_seconds,
        });
        self.execute_raw("blockdev-add", Some(args)).await.map(drop)
    }

    /// `blockdev-add` of a `snapshot-access` node reading the point-in-time
    /// view of the `copy-before-write` filter `file`.
    pub async fn add_snapshot_access(&self, node: &str, file: &str) -> Result<(), QmpError> {
        let args = serde_json::json!({
            "driver": "snapshot-access",
            "node-name": node,
            "file": file,
        });
        self.execute_raw("blockdev-add", Some(args)).await.map(drop)
    }

    /// `qom-set <qdev> drive <node>`: attaches a running device to another
    /// root node (inserting or removing a filter above its disk).
    pub async fn set_device_drive(&self, qdev: &str, node: &str) -> Result<(), QmpError> {
        let path = if qdev.starts_with('/') {
            qdev.to_string()
        } else {
            format!("/machine/peripheral/{qdev}")
        };
        let args = serde_json::json!({"path": path, "property": "drive", "value": node});
        self.execute_raw("qom-set", Some(args)).await.map(drop)
    }

    /// The node attached as child `role` (e.g. `file`) of `parent`, from
    /// `x-debug-query-block-graph`.
    pub async fn child_node(&self, parent: &str, role: &str) -> Result<Option<String>, QmpError> {
        #[derive(Deserialize)]
        struct Node {
            id: u64,
            name: String,
        }
        #[derive(Deserialize)]
        struct Edge {
            parent: u64,
            child: u64,
            name: String,
        }
        #[derive(Deserialize)]
        struct Graph {
            nodes: Vec<Node>,
            edges: Vec<Edge>,
        }
        let g: Graph = self.query("x-debug-query-block-graph", None).await?;
        let Some(pid) = g.nodes.iter().find(|n| n.name == parent).map(|n| n.id) else {
            return Ok(None);
        };
        Ok(g.edges
            .iter()
            .find(|e| e.parent == pid && e.name == role)
            .and_then(|e| g.nodes.iter().find(|n| n.id == e.child))
            .map(|n| n.name.clone()))
    }

    /// `add-fd`: hands QEMU an open file (SCM_RIGHTS) in fd set `fdset` (a
    /// new one when `None`), tagged `opaque`; QEMU then opens it as
    /// `/dev/fdset/<id>`, never by a path. Returns the fd set id.
    pub async fn add_fd(
        &self,
        fd: std::os::fd::OwnedFd,
        fdset: Option<u64>,
        opaque: &str,
    ) -> Result<u64, QmpError> {
        #[derive(Deserialize)]
        struct Added {
            #[serde(rename = "fdset-id")]
            fdset_id: u64,
        }
        let mut args = serde_json::json!({ "opaque": opaque });
        if let Some(id) = fdset {
            args["fdset-id"] = id.into();
        }
        let v = self.execute_with_fd("add-fd", Some(args), fd).await?;
        let added: Added = serde_json::from_value(v).map_err(|source| QmpError::Decode {
            command: "add-fd".into(),
            source,
        })?;
        Ok(added.fdset_id)
    }

    /// `query-fdsets`: `(fd set id, opaque tags of its fds)`.
    pub async fn query_fdsets(&self) -> Result<Vec<(u64, Vec<String>)>, QmpError> {
        #[derive(Deserialize)]
        struct Fd {
            #[serde(default)]
            opaque: Option<String>,
        }
        #[derive(Deserialize)]
        struct Set {
            #[serde(rename = "fdset-id")]
            id: u64,
            fds: Vec<Fd>,
        }
        let sets: Vec<Set> = self.query("query-fdsets", None).await?;
        Ok(sets
            .into_iter()
            .map(|s| (s.id, s.fds.into_iter().filter_map(|f| f.opaque).collect()))
            .collect())
    }

    /// `remove-fd` of a whole fd set (QEMU closes its fds once nothing uses them).
    pub async fn remove_fdset(&self, fdset: u64) -> Result<(), QmpError> {
        self.execute_raw("remove-fd", Some(serde_json::json!({ "fdset-id": fdset })))
            .await
            .map(drop)
    }

    /// `getfd`: hands QEMU an open descriptor under `name` (SCM_RIGHTS).
    pub async fn getfd(&self, name: &str, fd: std::os::fd::OwnedFd) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(serde_json::json!({ "fdname": name })), fd)
            .await
            .map(drop)
    }

    /// `closefd`: drops a descriptor passed with [`Self::getfd`] that was not used.
    pub async fn closefd(&self, name: &str) -> Result<(), QmpError> {
        self.execute_raw("closefd", Some(serde_json::json!({ "fdname": name })))
            .await
            .map(drop)
    }

    /// `nbd-server-start` on a listening socket passed earlier with [`Self::getfd`].
    pub async fn nbd_server_start_fd(&self, fd_name: &str) -> Result<(), QmpError> {
        let args = serde_json::json!({ "addr": { "type": "fd", "data": { "str": fd_name } } });
        self.execute_raw("nbd-server-start", Some(args))
            .await
            .map(drop)
    }

    /// `nbd-server-start` listening on TCP `host:port`, requiring TLS with
    /// the credentials object `tls_creds`.
    pub async fn nbd_server_start_tcp_tls(
        &self,
        host: &str,
        port: u16,
        tls_creds: &str,
    ) -> Result<(), QmpError> {
        let args = serde_json::json!({
            "addr": { "type": "inet", "data": { "host": host, "port": port.to_string() } },
            "tls-creds": tls_creds,
        });
        self.execute_raw("nbd-server-start", Some(args))
            .await
            .map(drop)
    }

    /// `object-add` of a server-side `tls-creds-psk` object that reads
    /// `<dir>/keys.psk` (lines `username:hexkey`).
    pub async fn add_tls_creds_psk(&self, id: &str, dir: &str) -> Result<(), QmpError> {
        let args = serde_json::json!({
            "qom-type": "tls-creds-psk",
            "id": id,
            "endpoint": "server",
            "dir": dir,
        });
        self.execute_raw("object-add", Some(args)).await.map(drop)
    }

    /// `object-del`.
    pub async fn object_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute_raw("object-del", Some(serde_json::json!({ "id": id })))
            .await
            .map(drop)
    }

    /// Ids of the user-created objects (`qom-list /objects`).
    pub async fn list_objects(&self) -> Result<Vec<String>, QmpError> {
        #[derive(Deserialize)]
        struct Prop {
            name: String,
        }
        let props: Vec<Prop> = self
            .query("qom-list", Some(serde_json::json!({ "path": "/objects" })))
            .await?;
        Ok(props.into_iter().map(|p| p.name).collect())
    }

    /// `stop`: pauses the vCPUs and drains in-flight I/O.
    pub async fn stop_vm(&self) -> Result<(), QmpError> {
        self.execute_raw("stop", None).await.map(drop)
    }

    /// `cont`: resumes the vCPUs.
    pub async fn cont_vm(&self) -> Result<(), QmpError> {
        self.execute_raw("cont", None).await.map(drop)
    }

    /// `quit`: QEMU closes images cleanly (persistent bitmaps are stored) and exits.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(&qmp::quit {}).await {
            Ok(_) => Ok(()),
            // QEMU may close the socket before the reply arrives.
            Err(e) if e.is_disconnect() => Ok(()),
            Err(e) => Err(e),
        }
    }
}
