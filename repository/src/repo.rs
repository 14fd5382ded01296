//! The repository: initialisation, opening (key and chunk-size checks),
//! snapshot manifests, listing, pruning, the chunk index, locks and stats.

use crate::format::{
    self, CONFIG_KEY, ChunkId, Compression, Config, DiskIndex, EncryptionConfig, FORMAT_VERSION,
    FormatError, Keys, ObjectKind, PackEntry,
};
use crate::storage::{Storage, StorageConfig, StorageError};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Smallest allowed chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest allowed chunk size (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default chunk size, chosen by measurement (docs/decisions.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;
/// Default target size of a pack object.
pub const DEFAULT_PACK_SIZE: u32 = 8 << 20;

/// Errors of repository operations.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// No config object: the repository was never initialised.
    #[error("the repository is not initialised (no config object)")]
    NotInitialised,
    /// Init found a config already there.
    #[error("the repository is already initialised")]
    AlreadyInitialised,
    /// The config object is unreadable.
    #[error("the repository config is unreadable: {0}")]
    BadConfig(String),
    /// The repository uses a format version this build cannot read.
    #[error("the repository has format version {found}; this build reads up to {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// Version found in the config.
        found: u32,
    },
    /// The key does not match the key check value (nothing was written).
    #[error("the repository key does not match the key the repository was initialised with")]
    WrongKey,
    /// A key was given for an unencrypted repository, or none for an encrypted one.
    #[error("{0}")]
    EncryptionMismatch(&'static str),
    /// The requested chunk size differs from the stored one.
    #[error(
        "the repository uses chunks of {stored} bytes; a chunk size of {requested} bytes cannot be used with it"
    )]
    ChunkSizeMismatch {
        /// Chunk size in the config.
        stored: u32,
        /// Chunk size asked for.
        requested: u32,
    },
    /// Invalid settings given to init.
    #[error("invalid repository settings: {0}")]
    InvalidSettings(String),
    /// An object failed to decode or authenticate.
    #[error("the object {key} is damaged")]
    Damaged {
        /// Object name.
        key: String,
        /// Why.
        #[source]
        source: FormatError,
    },
    /// No snapshot of that id.
    #[error("the snapshot {0} does not exist")]
    SnapshotNotFound(String),
    /// The snapshot has no disk of that name.
    #[error("the snapshot {snapshot} has no disk named {disk:?}")]
    DiskNotFound {
        /// Snapshot id.
        snapshot: String,
        /// Disk name.
        disk: String,
    },
    /// A running ingest uses the snapshot as its base.
    #[error("the snapshot {0} is the base of a running backup and cannot be deleted now")]
    SnapshotInUse(String),
    /// A chunk named by an index is not in any pack.
    #[error(
        "the chunk {chunk} at offset {offset} of disk {disk:?} in snapshot {snapshot} is missing from the repository"
    )]
    ChunkMissing {
        /// Snapshot id.
        snapshot: String,
        /// Disk name.
        disk: String,
        /// Byte offset of the chunk in the disk.
        offset: u64,
        /// Chunk id (hex).
        chunk: String,
    },
    /// A chunk failed authentication or verification.
    #[error("the chunk at offset {offset} of disk {disk:?} in snapshot {snapshot} is corrupt")]
    ChunkCorrupt {
        /// Snapshot id.
        snapshot: String,
        /// Disk name.
        disk: String,
        /// Byte offset of the chunk in the disk.
        offset: u64,
        /// Why.
        #[source]
        source: FormatError,
    },
    /// Reading the backup source failed.
    #[error("reading the source disk {disk:?} at offset {offset} failed")]
    Source {
        /// Disk name.
        disk: String,
        /// Byte offset.
        offset: u64,
        /// What the source said.
        #[source]
        source: std::io::Error,
    },
    /// The ingest request is inconsistent (base from another namespace, bad extents…).
    #[error("invalid backup request: {0}")]
    InvalidRequest(String),
    /// Writing the restore output failed.
    #[error("writing the restore output {path} failed")]
    Output {
        /// Output path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A worker task died.
    #[error("a background task of the repository failed: {0}")]
    Task(String),
}

/// The secret key of an encrypted repository, or none.
#[derive(Clone)]
pub enum RepositoryKey {
    /// Unencrypted repository.
    None,
    /// Secret key material (at least 32 random bytes recommended).
    Key(Vec<u8>),
}

impl fmt::Debug for RepositoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepositoryKey::None => f.write_str("None"),
            RepositoryKey::Key(_) => f.write_str("Key(<redacted>)"),
        }
    }
}

/// Settings for [`Repository::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Fixed chunk size (power of two, 64 KiB – 16 MiB).
    pub chunk_size: u32,
    /// Target size of pack objects.
    pub pack_size: u32,
    /// Compression of new objects.
    pub compression: Compression,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            compression: Compression::Zstd,
        }
    }
}

/// A snapshot id: `YYYYMMDDTHHMMSSZ-<8 hex>`, sorting by time.
pub type SnapshotId = String;

/// The checkpoint a snapshot was taken at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointRef {
    /// Checkpoint name.
    pub name: String,
    /// Checkpoint UID.
    pub uid: String,
}

/// One disk of a snapshot, as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskManifest {
    /// Disk name as the user knows it (`vda`, `disk0`).
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Object name of the disk index, relative to the repository root.
    pub index: String,
    /// BLAKE3 of the disk index object (hex), binding it to the manifest.
    pub index_hash: String,
    /// Number of chunks.
    pub chunks: u64,
    /// Chunks that are all zeros (not stored).
    pub zero_chunks: u64,
}

/// A snapshot manifest: written last, create-only; its presence is what
/// makes a snapshot visible.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// Snapshot id.
    pub id: SnapshotId,
    /// Namespace of the VM (keys chunk ids).
    pub namespace: String,
    /// VM name.
    pub vm: String,
    /// VM UID, when known.
    #[serde(default)]
    pub vm_uid: Option<String>,
    /// UID of the VirtualMachineBackup that made it.
    pub backup_uid: String,
    /// Checkpoint the backup created or was taken at.
    #[serde(default)]
    pub checkpoint: Option<CheckpointRef>,
    /// Snapshot this one was taken incrementally from.
    #[serde(default)]
    pub base: Option<SnapshotId>,
    /// Backup time.
    pub time: DateTime<Utc>,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Disks.
    pub disks: Vec<DiskManifest>,
}

/// Where a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Pack id (index into [`ChunkIndex::packs`]).
    pub pack: u32,
    /// Offset of the sealed chunk in the pack.
    pub offset: u64,
    /// Length of the sealed chunk.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
}

/// All chunks of the repository and where they are.
#[derive(Debug, Default, Clone)]
pub struct ChunkIndex {
    /// Pack ids; [`ChunkLocation::pack`] indexes this.
    pub packs: Vec<String>,
    /// Chunk id to location.
    pub chunks: HashMap<ChunkId, ChunkLocation>,
}

impl ChunkIndex {
    /// Pack id of a location.
    pub fn pack_of(&self, loc: &ChunkLocation) -> &str {
        &self.packs[loc.pack as usize]
    }
}

/// An ingest lock: tells GC and prune that a backup is running.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockRecord {
    /// Lock id.
    pub id: String,
    /// When the backup started (client clock).
    pub started: DateTime<Utc>,
    /// Base snapshot of the running backup.
    pub base: Option<SnapshotId>,
}

/// A lock found in the repository.
#[derive(Debug, Clone)]
pub struct LiveLock {
    /// The lock's record.
    pub record: LockRecord,
    /// Last heartbeat (server time).
    pub refreshed: DateTime<Utc>,
}

/// Repository-wide figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RepositoryStats {
    /// Sum of the disk sizes of every snapshot.
    pub logical_bytes: u64,
    /// Bytes of every object in the repository.
    pub stored_bytes: u64,
    /// `logical_bytes / stored_bytes`.
    pub dedup_ratio: f64,
    /// Number of visible snapshots.
    pub snapshot_count: u64,
    /// Number of pack objects.
    pub pack_count: u64,
    /// Bytes in pack objects.
    pub pack_bytes: u64,
}

/// An open repository. Cheap to clone.
#[derive(Clone)]
pub struct Repository {
    pub(crate) storage: Storage,
    pub(crate) config: Arc<Config>,
    pub(crate) keys: Keys,
    index_cache: Option<Arc<std::path::PathBuf>>,
}

impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("id", &self.config.id)
            .field("chunk_size", &self.config.chunk_size)
            .field("encrypted", &self.keys.is_encrypted())
            .finish()
    }
}

fn check_key_kind(config: &Config, key: &RepositoryKey) -> Result<Keys, RepoError> {
    match (&config.encryption, key) {
        (Some(enc), RepositoryKey::Key(material)) => {
            let derived = format::derive_keys(material, &config.id);
            if derived.key_check != enc.key_check {
                return Err(RepoError::WrongKey);
            }
            Ok(Keys::encrypted(&derived))
        }
        (None, RepositoryKey::None) => {
            let hexkey = config.chunk_id_key.as_deref().ok_or_else(|| {
                RepoError::BadConfig("an unencrypted repository needs chunk_id_key".into())
            })?;
            let mut k = [0u8; 32];
            hex::decode_to_slice(hexkey, &mut k)
                .map_err(|e| RepoError::BadConfig(format!("chunk_id_key: {e}")))?;
            Ok(Keys::unencrypted(k))
        }
        (Some(_), RepositoryKey::None) => Err(RepoError::EncryptionMismatch(
            "the repository is encrypted; a key is required to open it",
        )),
        (None, RepositoryKey::Key(_)) => Err(RepoError::EncryptionMismatch(
            "the repository is not encrypted, but a key was given",
        )),
    }
}

impl Repository {
    /// Initialises a new repository: writes the config (create-only).
    pub async fn init(
        storage: &StorageConfig,
        key: &RepositoryKey,
        options: &InitOptions,
    ) -> Result<Repository, RepoError> {
        let cs = options.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(RepoError::InvalidSettings(format!(
                "the chunk size {cs} is not a power of two between 64 KiB and 16 MiB"
            )));
        }
        if options.pack_size < cs {
            return Err(RepoError::InvalidSettings(
                "the pack size must be at least the chunk size".into(),
            ));
        }
        if let RepositoryKey::Key(k) = key
            && k.len() < 16
        {
            return Err(RepoError::InvalidSettings(
                "the repository key must be at least 16 bytes".into(),
            ));
        }
        if let StorageConfig::Directory { path } = storage {
            std::fs::create_dir_all(path).map_err(|e| {
                RepoError::InvalidSettings(format!(
                    "the directory {} cannot be created: {e}",
                    path.display()
                ))
            })?;
        }
        let storage = Storage::new(storage)?;
        storage.probe().await?;
        let id = format::random_id();
        let (encryption, chunk_id_key) = match key {
            RepositoryKey::Key(material) => (
                Some(EncryptionConfig {
                    algorithm: "aes-256-gcm".into(),
                    kdf: "blake3-derive-key".into(),
                    key_check: format::derive_keys(material, &id).key_check,
                }),
                None,
            ),
            RepositoryKey::None => {
                let mut k = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut k);
                (None, Some(hex::encode(k)))
            }
        };
        let config = Config {
            format: "cairn-repository".into(),
            version: FORMAT_VERSION,
            id,
            created: Utc::now(),
            chunk_size: cs,
            pack_size: options.pack_size,
            compression: options.compression,
            encryption,
            chunk_id_key,
        };
        let json = serde_json::to_vec_pretty(&config).expect("config serialises");
        match storage.put_new(CONFIG_KEY, json).await {
            Ok(()) => {}
            Err(StorageError::AlreadyExists { .. }) => return Err(RepoError::AlreadyInitialised),
            Err(e) => return Err(e.into()),
        }
        let keys = check_key_kind(&config, key)?;
        Ok(Repository {
            storage,
            config: Arc::new(config),
            keys,
            index_cache: None,
        })
    }

    /// Opens an existing repository, refusing a wrong key and, when
    /// `expected_chunk_size` is given, a different chunk size. Writes nothing.
    pub async fn open(
        storage: &StorageConfig,
        key: &RepositoryKey,
        expected_chunk_size: Option<u32>,
    ) -> Result<Repository, RepoError> {
        let storage = Storage::new(storage)?;
        storage.probe().await?;
        let raw = match storage.get(CONFIG_KEY).await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => return Err(RepoError::NotInitialised),
            Err(e) => return Err(e.into()),
        };
        let config: Config =
            serde_json::from_slice(&raw).map_err(|e| RepoError::BadConfig(e.to_string()))?;
        if config.format != "cairn-repository" {
            return Err(RepoError::BadConfig(format!(
                "unknown format {:?}",
                config.format
            )));
        }
        if config.version > FORMAT_VERSION {
            return Err(RepoError::UnsupportedVersion {
                found: config.version,
            });
        }
        if let Some(requested) = expected_chunk_size
            && requested != config.chunk_size
        {
            return Err(RepoError::ChunkSizeMismatch {
                stored: config.chunk_size,
                requested,
            });
        }
        let keys = check_key_kind(&config, key)?;
        Ok(Repository {
            storage,
            config: Arc::new(config),
            keys,
            index_cache: None,
        })
    }

    /// Opens the repository, initialising it first when it has no config.
    pub async fn open_or_init(
        storage: &StorageConfig,
        key: &RepositoryKey,
        options: &InitOptions,
    ) -> Result<Repository, RepoError> {
        match Repository::open(storage, key, Some(options.chunk_size)).await {
            Err(RepoError::NotInitialised) => match Repository::init(storage, key, options).await {
                Err(RepoError::AlreadyInitialised) => {
                    Repository::open(storage, key, Some(options.chunk_size)).await
                }
                other => other,
            },
            other => other,
        }
    }

    /// Keeps pack indexes (sealed, as stored) in `dir/<repository id>/`, so
    /// the next ingest or restore does not read every pack's trailer again.
    /// Packs never change, so the cache is always right; entries of deleted
    /// packs are dropped when the index is next loaded.
    pub fn with_index_cache(mut self, dir: impl Into<std::path::PathBuf>) -> Repository {
        self.index_cache = Some(Arc::new(dir.into().join(&self.config.id)));
        self
    }

    /// The repository's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The storage handle (for tests and tools that inspect objects).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    pub(crate) fn open_object(
        &self,
        key: &str,
        kind: ObjectKind,
        data: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, RepoError> {
        self.keys
            .open(kind, data, aad)
            .map_err(|source| RepoError::Damaged {
                key: key.into(),
                source,
            })
    }

    pub(crate) fn seal_json<T: Serialize>(&self, kind: ObjectKind, value: &T) -> Vec<u8> {
        let json = serde_json::to_vec(value).expect("serialises");
        self.keys.seal(kind, &json, self.config.compression, b"")
    }

    pub(crate) async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
        kind: ObjectKind,
    ) -> Result<T, RepoError> {
        let raw = self.storage.get(key).await?;
        let plain = self.open_object(key, kind, &raw, b"")?;
        serde_json::from_slice(&plain).map_err(|e| RepoError::Damaged {
            key: key.into(),
            source: FormatError::Malformed(e.to_string()),
        })
    }

    /// Ids of every visible snapshot (with a manifest), oldest first.
    pub async fn snapshot_ids(&self) -> Result<Vec<SnapshotId>, RepoError> {
        let mut ids: Vec<SnapshotId> = self
            .storage
            .list("snapshots")
            .await?
            .into_iter()
            .filter_map(|o| {
                o.key
                    .strip_prefix("snapshots/")
                    .and_then(|k| k.strip_suffix("/manifest"))
                    .map(str::to_owned)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every visible snapshot's manifest, oldest first.
    pub async fn list_snapshots(&self) -> Result<Vec<Manifest>, RepoError> {
        let ids = self.snapshot_ids().await?;
        futures::stream::iter(ids)
            .map(|id| async move { self.manifest(&id).await })
            .buffered(16)
            .try_collect()
            .await
    }

    /// One snapshot's manifest.
    pub async fn manifest(&self, id: &str) -> Result<Manifest, RepoError> {
        match self
            .get_json(&format::manifest_key(id), ObjectKind::Manifest)
            .await
        {
            Err(RepoError::Storage(StorageError::NotFound { .. })) => {
                Err(RepoError::SnapshotNotFound(id.into()))
            }
            other => other,
        }
    }

    /// The chunk index of one disk of a snapshot, checked against the manifest.
    pub async fn disk_index(
        &self,
        manifest: &Manifest,
        disk: &str,
    ) -> Result<DiskIndex, RepoError> {
        let d = manifest
            .disks
            .iter()
            .find(|d| d.name == disk)
            .ok_or_else(|| RepoError::DiskNotFound {
                snapshot: manifest.id.clone(),
                disk: disk.into(),
            })?;
        let raw = self.storage.get(&d.index).await?;
        if blake3::hash(&raw).to_hex().as_str() != d.index_hash {
            return Err(RepoError::Damaged {
                key: d.index.clone(),
                source: FormatError::Checksum,
            });
        }
        let plain = self.open_object(
            &d.index,
            ObjectKind::DiskIndex,
            &raw,
            manifest.id.as_bytes(),
        )?;
        let idx = DiskIndex::decode(&plain).map_err(|source| RepoError::Damaged {
            key: d.index.clone(),
            source,
        })?;
        if idx.size != d.size || idx.chunk_size != manifest.chunk_size {
            return Err(RepoError::Damaged {
                key: d.index.clone(),
                source: FormatError::Malformed("the index disagrees with the manifest".into()),
            });
        }
        Ok(idx)
    }

    /// Ids of packs condemned by GC (ingest does not deduplicate against them).
    pub(crate) async fn condemned_packs(&self) -> Result<HashSet<String>, RepoError> {
        let records = crate::maintenance::read_condemned(self).await?;
        Ok(records.into_iter().flat_map(|(_, r)| r.packs).collect())
    }

    /// Loads every pack index. Packs in `exclude` are left out, and so are
    /// packs whose index is damaged (logged): an upload cut off mid-body can
    /// leave a truncated object on some S3 servers (versitygw's posix
    /// backend does), and its chunks cannot be read anyway. Leaving it out
    /// means ingest stores those chunks again instead of failing every later
    /// backup, and readers report such a chunk as missing, by snapshot, disk
    /// and offset.
    pub async fn load_chunk_index(
        &self,
        exclude: &HashSet<String>,
    ) -> Result<ChunkIndex, RepoError> {
        let packs: Vec<(String, u64)> = self
            .storage
            .list("packs")
            .await?
            .into_iter()
            .filter_map(|o| format::pack_id_of_key(&o.key).map(|p| (p.to_owned(), o.size)))
            .filter(|(p, _)| !exclude.contains(p))
            .collect();
        if let Some(dir) = &self.index_cache {
            let listed: HashSet<&str> = packs.iter().map(|(p, _)| p.as_str()).collect();
            if let Ok(entries) = std::fs::read_dir(dir.as_path()) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !listed.contains(name.as_str()) && !exclude.contains(&name) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        let loaded: Vec<Option<(String, Vec<PackEntry>)>> = futures::stream::iter(packs)
            .map(|(pack, size)| async move {
                match self.pack_entries(&pack, size).await {
                    Ok(e) => Ok(Some((pack, e))),
                    // Deleted by GC between list and get.
                    Err(RepoError::Storage(StorageError::NotFound { .. })) => Ok(None),
                    Err(e @ RepoError::Damaged { .. }) => {
                        tracing::warn!(pack = %pack, error = %e, "leaving out a pack whose index is unreadable");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(32)
            .try_collect()
            .await?;
        let mut index = ChunkIndex::default();
        for (pack, entries) in loaded.into_iter().flatten() {
            let n = index.packs.len() as u32;
            index.packs.push(pack);
            for e in entries {
                index.chunks.entry(e.id).or_insert(ChunkLocation {
                    pack: n,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                });
            }
        }
        Ok(index)
    }

    /// The entries of one pack (of `size` bytes), from its trailer: one
    /// ranged read of its last 64 KiB, a second one for a longer index.
    pub async fn pack_entries(&self, pack: &str, size: u64) -> Result<Vec<PackEntry>, RepoError> {
        let key = format::pack_key(pack);
        let damaged = |source| RepoError::Damaged {
            key: key.clone(),
            source,
        };
        if let Some(dir) = &self.index_cache
            && let Ok(sealed) = tokio::fs::read(dir.join(pack)).await
            && let Ok(plain) = self
                .keys
                .open(ObjectKind::PackIndex, &sealed, pack.as_bytes())
            && let Ok(entries) = format::decode_pack_entries(&plain)
        {
            return Ok(entries);
        }
        let guess = size.min(64 << 10);
        if guess == 0 {
            return Err(damaged(FormatError::Truncated));
        }
        let tail = self.storage.get_range(&key, size - guess, guess).await?;
        let len = format::pack_trailer_len(&tail).map_err(damaged)?;
        let need = (len + format::PACK_TAIL_LEN) as u64;
        if need > size {
            return Err(damaged(FormatError::Truncated));
        }
        let sealed = if need <= guess {
            tail.slice((guess - need) as usize..tail.len() - format::PACK_TAIL_LEN)
        } else {
            self.storage
                .get_range(&key, size - need, len as u64)
                .await?
        };
        let plain = self.open_object(&key, ObjectKind::PackIndex, &sealed, pack.as_bytes())?;
        let entries = format::decode_pack_entries(&plain).map_err(damaged)?;
        if let Some(dir) = &self.index_cache {
            // Best effort: a cache that cannot be written is only slower.
            let tmp = dir.join(format!(".{pack}.tmp-{}", &format::random_id()[..8]));
            let ok = tokio::fs::create_dir_all(dir.as_path()).await.is_ok()
                && tokio::fs::write(&tmp, &sealed).await.is_ok()
                && tokio::fs::rename(&tmp, dir.join(pack)).await.is_ok();
            if !ok {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
        }
        Ok(entries)
    }

    /// Ingest locks whose heartbeat is younger than `stale_after`.
    pub async fn live_locks(&self, stale_after: Duration) -> Result<Vec<LiveLock>, RepoError> {
        let now = Utc::now();
        let stale = chrono::Duration::from_std(stale_after).unwrap_or(chrono::Duration::MAX);
        let mut out = Vec::new();
        for o in self.storage.list("locks").await? {
            if now - o.last_modified > stale {
                continue;
            }
            match self.get_json::<LockRecord>(&o.key, ObjectKind::Lock).await {
                Ok(record) => out.push(LiveLock {
                    record,
                    refreshed: o.last_modified,
                }),
                Err(RepoError::Storage(StorageError::NotFound { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Deletes a snapshot (prune): the manifest first, so it disappears at
    /// once, then its disk indexes. Its chunks go at the next GC.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), RepoError> {
        let manifest = self.manifest(id).await?;
        let locks = self
            .live_locks(crate::maintenance::DEFAULT_LOCK_STALE_AFTER)
            .await?;
        if locks.iter().any(|l| l.record.base.as_deref() == Some(id)) {
            return Err(RepoError::SnapshotInUse(id.into()));
        }
        self.storage.delete(&format::manifest_key(id)).await?;
        for d in &manifest.disks {
            self.storage.delete(&d.index).await?;
        }
        tracing::info!(snapshot = %id, "deleted snapshot");
        Ok(())
    }

    /// Logical bytes, stored bytes, dedup ratio and snapshot count.
    pub async fn stats(&self) -> Result<RepositoryStats, RepoError> {
        let objects = self.storage.list("").await?;
        let stored_bytes: u64 = objects.iter().map(|o| o.size).sum();
        let packs: Vec<_> = objects
            .iter()
            .filter(|o| o.key.starts_with("packs/"))
            .collect();
        let snapshots = self.list_snapshots().await?;
        let logical_bytes: u64 = snapshots
            .iter()
            .flat_map(|s| s.disks.iter().map(|d| d.size))
            .sum();
        Ok(RepositoryStats {
            logical_bytes,
            stored_bytes,
            dedup_ratio: if stored_bytes == 0 {
                0.0
            } else {
                logical_bytes as f64 / stored_bytes as f64
            },
            snapshot_count: snapshots.len() as u64,
            pack_count: packs.len() as u64,
            pack_bytes: packs.iter().map(|o| o.size).sum(),
        })
    }
}
