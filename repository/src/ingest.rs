//! Ingest: turns disks into a snapshot.
//!
//! A [`SnapshotWriter`] holds an ingest lock (so prune and GC know a backup
//! runs), the set of chunk ids already stored in the namespace, and the packs
//! being uploaded. Each [`SnapshotWriter::add_disk`] reads the chunks that
//! overlap dirty extents (all chunks for a full backup) through a bounded
//! window of `read_ahead` chunks; hashing, compression and encryption run on
//! blocking threads; new chunks fill a pack of `pack_size` bytes, and at most
//! `uploads` packs upload at once. [`SnapshotWriter::commit`] waits for the
//! uploads, writes the disk indexes and last the manifest (create-only).
//! Dropping the writer (or its future) aborts the uploads and publishes
//! nothing.

use crate::format::{self, ChunkId, DiskIndex, NamespaceKey, ObjectKind, PackEntry};
use crate::repo::{
    CheckpointRef, DiskManifest, LockRecord, Manifest, RepoError, Repository, SnapshotId,
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::collections::HashSet;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;

/// A disk to read from: the caller implements it over an NBD export, a file…
pub trait DiskSource: Send + Sync {
    /// Reads exactly `len` bytes at `offset` (never past the disk's end).
    fn read_at(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = std::io::Result<Vec<u8>>> + Send;
}

/// A byte range of a disk that changed since the base checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// What the snapshot is of.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    /// Namespace of the VM; chunk ids are keyed with it.
    pub namespace: String,
    /// VM name.
    pub vm: String,
    /// VM UID, when known.
    pub vm_uid: Option<String>,
    /// UID of the VirtualMachineBackup.
    pub backup_uid: String,
    /// Checkpoint taken with this backup.
    pub checkpoint: Option<CheckpointRef>,
    /// Base snapshot of an incremental backup.
    pub base: Option<SnapshotId>,
    /// Backup time (default: now).
    pub time: Option<DateTime<Utc>>,
}

/// Counters reported while ingesting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestProgress {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to storage (packs and their indexes).
    pub bytes_uploaded: u64,
    /// Chunks stored for the first time.
    pub chunks_new: u64,
    /// Chunks already in the repository (from the base or deduplicated).
    pub chunks_reused: u64,
    /// Chunks of zeros (not stored).
    pub chunks_zero: u64,
}

/// Progress callback.
pub type ProgressFn = Arc<dyn Fn(&IngestProgress) + Send + Sync>;

/// Tuning of an ingest.
#[derive(Clone)]
pub struct IngestOptions {
    /// Chunks read and processed at once (memory: `read_ahead × chunk size`).
    pub read_ahead: usize,
    /// Packs uploading at once (memory: `uploads × pack size`).
    pub uploads: usize,
    /// How often the lock is refreshed.
    pub heartbeat: Duration,
    /// Called after each chunk and each pack upload.
    pub progress: Option<ProgressFn>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            read_ahead: 8,
            uploads: 3,
            heartbeat: Duration::from_secs(60),
            progress: None,
        }
    }
}

impl std::fmt::Debug for IngestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestOptions")
            .field("read_ahead", &self.read_ahead)
            .field("uploads", &self.uploads)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    bytes_uploaded: AtomicU64,
    chunks_new: AtomicU64,
    chunks_reused: AtomicU64,
    chunks_zero: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> IngestProgress {
        IngestProgress {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_uploaded: self.bytes_uploaded.load(Ordering::Relaxed),
            chunks_new: self.chunks_new.load(Ordering::Relaxed),
            chunks_reused: self.chunks_reused.load(Ordering::Relaxed),
            chunks_zero: self.chunks_zero.load(Ordering::Relaxed),
        }
    }
}

struct PackBuilder {
    data: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes one snapshot. See the module docs for the pipeline.
pub struct SnapshotWriter {
    repo: Repository,
    spec: SnapshotSpec,
    id: SnapshotId,
    lock_id: String,
    ns_key: NamespaceKey,
    known: Arc<Mutex<HashSet<ChunkId>>>,
    base: Option<Manifest>,
    disks: Vec<(DiskManifest, Vec<u8>)>,
    pack: PackBuilder,
    uploads: JoinSet<Result<(), RepoError>>,
    counters: Arc<Counters>,
    options: IngestOptions,
    _heartbeat: AbortOnDrop,
    lock_released: bool,
}

impl Drop for SnapshotWriter {
    /// A writer dropped before commit (its future cancelled) removes its
    /// lock in the background, best effort; otherwise the lock goes stale.
    fn drop(&mut self) {
        if self.lock_released {
            return;
        }
        self.uploads.abort_all();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let storage = self.repo.storage.clone();
            let key = format::lock_key(&self.lock_id);
            handle.spawn(async move {
                let _ = storage.delete(&key).await;
            });
        }
    }
}

impl std::fmt::Debug for SnapshotWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn new_snapshot_id(time: DateTime<Utc>) -> SnapshotId {
    format!(
        "{}-{}",
        time.format("%Y%m%dT%H%M%SZ"),
        &format::random_id()[..8]
    )
}

fn overlaps(dirty: &[Extent], range: Range<u64>) -> bool {
    dirty
        .iter()
        .any(|e| e.length > 0 && e.offset < range.end && e.offset + e.length > range.start)
}

enum ChunkOutcome {
    Zero,
    Reused(ChunkId),
    New(ChunkId, Vec<u8>, u32),
}

impl Repository {
    /// Starts a snapshot: takes the ingest lock, loads the base manifest and
    /// the namespace's known chunks.
    pub async fn begin_snapshot(
        &self,
        spec: SnapshotSpec,
        options: IngestOptions,
    ) -> Result<SnapshotWriter, RepoError> {
        let time = spec.time.unwrap_or_else(Utc::now);
        let id = new_snapshot_id(time);
        let lock_id = format::random_id();
        let record = LockRecord {
            id: lock_id.clone(),
            started: Utc::now(),
            base: spec.base.clone(),
        };
        // The lock goes first: a GC that condemns packs after this point
        // sees it and waits; condemnations before it are read below.
        let lock_bytes = self.seal_json(ObjectKind::Lock, &record);
        let lock_key = format::lock_key(&lock_id);
        self.storage.put(&lock_key, lock_bytes.clone()).await?;
        let heartbeat = {
            let storage = self.storage.clone();
            let every = options.heartbeat;
            let key = lock_key.clone();
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = storage.put(&key, lock_bytes.clone()).await {
                        tracing::warn!(error = %e, "refreshing the ingest lock failed");
                    }
                }
            }))
        };
        let base = match &spec.base {
            Some(b) => {
                let m = self.manifest(b).await?;
                if m.namespace != spec.namespace {
                    return Err(RepoError::InvalidRequest(format!(
                        "the base snapshot {b} belongs to namespace {:?}, not {:?}",
                        m.namespace, spec.namespace
                    )));
                }
                Some(m)
            }
            None => None,
        };
        let condemned = self.condemned_packs().await?;
        let index = self.load_chunk_index(&condemned).await?;
        let known: HashSet<ChunkId> = index.chunks.into_keys().collect();
        Ok(SnapshotWriter {
            ns_key: self.keys.namespace_key(&spec.namespace),
            repo: self.clone(),
            spec,
            id,
            lock_id,
            known: Arc::new(Mutex::new(known)),
            base,
            disks: Vec::new(),
            pack: PackBuilder {
                data: Vec::new(),
                entries: Vec::new(),
            },
            uploads: JoinSet::new(),
            counters: Arc::new(Counters::default()),
            options,
            _heartbeat: heartbeat,
            lock_released: false,
        })
    }
}

impl SnapshotWriter {
    /// The id the snapshot will have once committed.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Progress so far.
    pub fn progress(&self) -> IngestProgress {
        self.counters.snapshot()
    }

    fn report(&self) {
        if let Some(p) = &self.options.progress {
            p(&self.counters.snapshot());
        }
    }

    /// Adds a disk. With a base snapshot and `dirty` extents, only chunks
    /// overlapping them are read; the others take their id from the base's
    /// index of the disk with the same name. `dirty: None`, or a disk the
    /// base lacks, reads every chunk.
    pub async fn add_disk<S: DiskSource>(
        &mut self,
        name: &str,
        size: u64,
        source: &S,
        dirty: Option<&[Extent]>,
    ) -> Result<(), RepoError> {
        if self.disks.iter().any(|(d, _)| d.name == name) {
            return Err(RepoError::InvalidRequest(format!(
                "the disk {name:?} was added twice"
            )));
        }
        let cs = self.repo.chunk_size() as u64;
        let n = size.div_ceil(cs) as usize;
        let mut ids = vec![ChunkId::ZERO; n];
        let mut to_read: Vec<usize> = Vec::new();
        let base_index = match (&self.base, dirty) {
            (Some(base), Some(_)) if base.disks.iter().any(|d| d.name == name) => {
                Some(self.repo.disk_index(base, name).await?)
            }
            _ => None,
        };
        for (i, id) in ids.iter_mut().enumerate() {
            let start = i as u64 * cs;
            let end = (start + cs).min(size);
            let from_base = match (&base_index, dirty) {
                (Some(b), Some(d)) => {
                    let same_extent = i < b.chunks.len() && (start + cs).min(b.size) == end;
                    if same_extent && !overlaps(d, start..end) {
                        Some(b.chunks[i])
                    } else {
                        None
                    }
                }
                _ => None,
            };
            match from_base {
                Some(b) => {
                    *id = b;
                    if b.is_zero() {
                        self.counters.chunks_zero.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.counters.chunks_reused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => to_read.push(i),
            }
        }
        tracing::debug!(
            disk = name,
            chunks = n,
            reading = to_read.len(),
            "ingesting disk"
        );
        let compression = self.repo.config.compression;
        let keys = self.repo.keys.clone();
        let ns_key = self.ns_key;
        let known = self.known.clone();
        let counters = self.counters.clone();
        let disk_name = name.to_owned();
        let mut results =
            futures::stream::iter(to_read)
                .map(|i| {
                    let keys = keys.clone();
                    let known = known.clone();
                    let counters = counters.clone();
                    let disk_name = disk_name.clone();
                    async move {
                        let offset = i as u64 * cs;
                        let len = (size - offset).min(cs) as usize;
                        let data = source.read_at(offset, len).await.map_err(|source| {
                            RepoError::Source {
                                disk: disk_name.clone(),
                                offset,
                                source,
                            }
                        })?;
                        if data.len() != len {
                            return Err(RepoError::Source {
                                disk: disk_name,
                                offset,
                                source: std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    format!("the source returned {} of {len} bytes", data.len()),
                                ),
                            });
                        }
                        counters.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                        let outcome = tokio::task::spawn_blocking(move || {
                            if data.iter().all(|&b| b == 0) {
                                return ChunkOutcome::Zero;
                            }
                            let id = ns_key.chunk_id(&data);
                            if !known.lock().expect("known set").insert(id) {
                                return ChunkOutcome::Reused(id);
                            }
                            let sealed = keys.seal(ObjectKind::Chunk, &data, compression, &id.0);
                            ChunkOutcome::New(id, sealed, data.len() as u32)
                        })
                        .await
                        .map_err(|e| RepoError::Task(e.to_string()))?;
                        Ok::<_, RepoError>((i, outcome))
                    }
                })
                .buffered(self.options.read_ahead.max(1));
        while let Some(r) = results.next().await {
            let (i, outcome) = r?;
            match outcome {
                ChunkOutcome::Zero => {
                    self.counters.chunks_zero.fetch_add(1, Ordering::Relaxed);
                }
                ChunkOutcome::Reused(id) => {
                    ids[i] = id;
                    self.counters.chunks_reused.fetch_add(1, Ordering::Relaxed);
                }
                ChunkOutcome::New(id, sealed, raw_length) => {
                    ids[i] = id;
                    self.counters.chunks_new.fetch_add(1, Ordering::Relaxed);
                    self.pack.entries.push(PackEntry {
                        id,
                        offset: self.pack.data.len() as u64,
                        length: sealed.len() as u32,
                        raw_length,
                    });
                    self.pack.data.extend_from_slice(&sealed);
                    if self.pack.data.len() >= self.repo.config.pack_size as usize {
                        self.flush_pack().await?;
                    }
                }
            }
            self.report();
        }
        drop(results);
        let zero_chunks = ids.iter().filter(|c| c.is_zero()).count() as u64;
        let index = DiskIndex {
            size,
            chunk_size: cs as u32,
            chunks: ids,
        };
        let sealed = self.repo.keys.seal(
            ObjectKind::DiskIndex,
            &index.encode(),
            self.repo.config.compression,
            self.id.as_bytes(),
        );
        let position = self.disks.len();
        self.disks.push((
            DiskManifest {
                name: name.into(),
                size,
                index: format::disk_index_key(&self.id, position),
                index_hash: blake3::hash(&sealed).to_hex().to_string(),
                chunks: n as u64,
                zero_chunks,
            },
            sealed,
        ));
        Ok(())
    }

    /// Waits until fewer than `limit` uploads run, surfacing their errors.
    async fn drain_uploads(&mut self, limit: usize) -> Result<(), RepoError> {
        while self.uploads.len() > limit {
            match self.uploads.join_next().await {
                Some(Ok(r)) => r?,
                Some(Err(e)) => return Err(RepoError::Task(e.to_string())),
                None => break,
            }
            self.report();
        }
        Ok(())
    }

    async fn flush_pack(&mut self) -> Result<(), RepoError> {
        if self.pack.entries.is_empty() {
            return Ok(());
        }
        self.drain_uploads(self.options.uploads.max(1) - 1).await?;
        let mut pack = std::mem::replace(
            &mut self.pack,
            PackBuilder {
                data: Vec::new(),
                entries: Vec::new(),
            },
        );
        let pack_id = format::random_id();
        let entries = format::encode_pack_entries(&pack.entries);
        let sealed_entries = self.repo.keys.seal(
            ObjectKind::PackIndex,
            &entries,
            self.repo.config.compression,
            pack_id.as_bytes(),
        );
        format::append_pack_trailer(&mut pack.data, &sealed_entries);
        let storage = self.repo.storage.clone();
        let counters = self.counters.clone();
        self.uploads.spawn(async move {
            let pack_len = pack.data.len() as u64;
            // One object, its index in the trailer: a pack appears whole or not at all.
            storage
                .put_new(&format::pack_key(&pack_id), pack.data)
                .await?;
            counters
                .bytes_uploaded
                .fetch_add(pack_len, Ordering::Relaxed);
            tracing::debug!(pack = %pack_id, bytes = pack_len, "uploaded pack");
            Ok(())
        });
        Ok(())
    }

    /// Finishes the snapshot: flushes and awaits every pack, writes the
    /// disk indexes, then the manifest (which makes it visible), then drops
    /// the lock.
    pub async fn commit(mut self) -> Result<Manifest, RepoError> {
        if self.disks.is_empty() {
            return Err(RepoError::InvalidRequest(
                "a snapshot needs at least one disk".into(),
            ));
        }
        self.flush_pack().await?;
        self.drain_uploads(0).await?;
        let storage = self.repo.storage.clone();
        for (d, sealed) in std::mem::take(&mut self.disks) {
            let len = sealed.len() as u64;
            storage.put_new(&d.index, sealed).await?;
            self.counters
                .bytes_uploaded
                .fetch_add(len, Ordering::Relaxed);
            self.disks.push((d, Vec::new()));
        }
        let manifest = Manifest {
            version: format::FORMAT_VERSION,
            id: self.id.clone(),
            namespace: self.spec.namespace.clone(),
            vm: self.spec.vm.clone(),
            vm_uid: self.spec.vm_uid.clone(),
            backup_uid: self.spec.backup_uid.clone(),
            checkpoint: self.spec.checkpoint.clone(),
            base: self.spec.base.clone(),
            time: self.spec.time.unwrap_or_else(Utc::now),
            chunk_size: self.repo.chunk_size(),
            disks: self.disks.iter().map(|(d, _)| d.clone()).collect(),
        };
        let sealed = self.repo.seal_json(ObjectKind::Manifest, &manifest);
        let len = sealed.len() as u64;
        storage
            .put_new(&format::manifest_key(&self.id), sealed)
            .await?;
        self.counters
            .bytes_uploaded
            .fetch_add(len, Ordering::Relaxed);
        self.report();
        if let Err(e) = storage.delete(&format::lock_key(&self.lock_id)).await {
            tracing::warn!(error = %e, "removing the ingest lock failed; it expires by itself");
        }
        self.lock_released = true;
        tracing::info!(snapshot = %self.id, vm = %self.spec.vm, namespace = %self.spec.namespace, "snapshot committed");
        Ok(manifest)
    }

    /// Gives up: aborts uploads and removes the lock. Uploaded packs stay
    /// until GC removes them after the grace period.
    pub async fn abort(mut self) {
        self.uploads.abort_all();
        let _ = self
            .repo
            .storage
            .delete(&format::lock_key(&self.lock_id))
            .await;
        self.lock_released = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_half_open() {
        let d = [Extent {
            offset: 100,
            length: 10,
        }];
        assert!(overlaps(&d, 0..101));
        assert!(!overlaps(&d, 0..100));
        assert!(overlaps(&d, 109..200));
        assert!(!overlaps(&d, 110..200));
        assert!(!overlaps(
            &[Extent {
                offset: 5,
                length: 0
            }],
            0..10
        ));
    }
}
