//! Cairn's backup repository: where VM disk backups leave the node.
//!
//! No Kubernetes here: the agent and the restore CLI both use this crate.
//! How the parts talk:
//! - [`storage`] moves objects (S3 path-style or a directory, via `object_store`);
//! - [`format`](mod@format) says what the bytes are: sealed objects (zstd, then AES-256-GCM
//!   or a BLAKE3 checksum), keyed chunk ids, packs, pack indexes, disk indexes;
//! - [`repo`] opens a repository (key check, chunk-size check), lists, prunes;
//! - [`ingest`] writes a snapshot from a [`DiskSource`], full or incremental;
//! - [`reader`] reads it back: random access with a cache, or a verified restore;
//! - [`maintenance`] runs GC (mark, condemn, sweep with a grace period) and verify.
//!
//! The on-storage format is documented in `docs/repository-format.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod format;
pub mod ingest;
pub mod maintenance;
pub mod reader;
pub mod repo;
pub mod storage;
#[cfg(feature = "test-support")]
pub mod test_support;

pub use format::{ChunkId, Compression, DiskIndex, FORMAT_VERSION};
pub use ingest::{
    DiskSource, Extent, IngestOptions, IngestProgress, ProgressFn, SnapshotSpec, SnapshotWriter,
};
pub use maintenance::{GcOptions, GcReport, VerifyProblem, VerifyReport};
pub use reader::{DiskReader, OutputFormat, RestoreReport, restore_disk};
pub use repo::{
    CheckpointRef, DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, DiskManifest, InitOptions, Manifest,
    RepoError, Repository, RepositoryKey, RepositoryStats, SnapshotId,
};
pub use storage::{S3Config, Storage, StorageConfig, StorageError};
