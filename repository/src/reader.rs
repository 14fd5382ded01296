//! Reading snapshots back: a random-access [`DiskReader`] with a bounded
//! chunk cache (for an NBD server) and [`restore_disk`], which writes a disk
//! to a raw (sparse) or qcow2 file, verifying every chunk, and publishes the
//! file under its final name only when all of it is written.

use crate::format::{ChunkId, DiskIndex, ObjectKind};
use crate::repo::{ChunkIndex, Manifest, RepoError, Repository};
use futures::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Fetches and verifies one chunk; `Ok(None)` for a zero chunk.
pub(crate) async fn fetch_chunk(
    repo: &Repository,
    index: &ChunkIndex,
    ns_key: &crate::format::NamespaceKey,
    id: ChunkId,
) -> Result<Option<Vec<u8>>, ChunkFault> {
    if id.is_zero() {
        return Ok(None);
    }
    let loc = index.chunks.get(&id).ok_or(ChunkFault::Missing)?;
    let key = crate::format::pack_key(index.pack_of(loc));
    let raw = repo
        .storage
        .get_range(&key, loc.offset, loc.length as u64)
        .await
        .map_err(|e| match e {
            crate::storage::StorageError::NotFound { .. } => ChunkFault::Missing,
            other => ChunkFault::Storage(other),
        })?;
    let plain = repo
        .keys
        .open(ObjectKind::Chunk, &raw, &id.0)
        .map_err(ChunkFault::Corrupt)?;
    if plain.len() != loc.raw_length as usize || ns_key.chunk_id(&plain) != id {
        return Err(ChunkFault::Corrupt(
            crate::format::FormatError::ChunkIdMismatch,
        ));
    }
    Ok(Some(plain))
}

/// Why a chunk could not be read.
#[derive(Debug)]
pub(crate) enum ChunkFault {
    Missing,
    Corrupt(crate::format::FormatError),
    Storage(crate::storage::StorageError),
}

impl ChunkFault {
    pub(crate) fn into_error(
        self,
        manifest: &Manifest,
        disk: &str,
        offset: u64,
        id: ChunkId,
    ) -> RepoError {
        match self {
            ChunkFault::Missing => RepoError::ChunkMissing {
                snapshot: manifest.id.clone(),
                disk: disk.into(),
                offset,
                chunk: id.to_string(),
            },
            ChunkFault::Corrupt(source) => RepoError::ChunkCorrupt {
                snapshot: manifest.id.clone(),
                disk: disk.into(),
                offset,
                source,
            },
            ChunkFault::Storage(e) => RepoError::Storage(e),
        }
    }
}

struct Cache {
    capacity: usize,
    order: VecDeque<ChunkId>,
    map: HashMap<ChunkId, Arc<Vec<u8>>>,
}

impl Cache {
    fn get(&mut self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        let hit = self.map.get(id).cloned();
        if hit.is_some()
            && let Some(pos) = self.order.iter().position(|c| c == id)
        {
            self.order.remove(pos);
            self.order.push_back(*id);
        }
        hit
    }

    fn put(&mut self, id: ChunkId, data: Arc<Vec<u8>>) {
        if self.capacity == 0 || self.map.contains_key(&id) {
            return;
        }
        while self.map.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(id);
        self.map.insert(id, data);
    }
}

/// Random access to one disk of a snapshot; every chunk is verified.
pub struct DiskReader {
    repo: Repository,
    manifest: Manifest,
    disk: String,
    index: DiskIndex,
    chunks: Arc<ChunkIndex>,
    ns_key: crate::format::NamespaceKey,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for DiskReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskReader")
            .field("snapshot", &self.manifest.id)
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

impl DiskReader {
    /// Opens a disk of a snapshot; `cache_chunks` bounds the chunk cache.
    pub async fn open(
        repo: &Repository,
        snapshot: &str,
        disk: &str,
        cache_chunks: usize,
    ) -> Result<DiskReader, RepoError> {
        let manifest = repo.manifest(snapshot).await?;
        let index = repo.disk_index(&manifest, disk).await?;
        let chunks = Arc::new(repo.load_chunk_index(&Default::default()).await?);
        Ok(DiskReader {
            ns_key: repo.keys.namespace_key(&manifest.namespace),
            repo: repo.clone(),
            manifest,
            disk: disk.into(),
            index,
            chunks,
            cache: Mutex::new(Cache {
                capacity: cache_chunks,
                order: VecDeque::new(),
                map: HashMap::new(),
            }),
        })
    }

    /// Virtual size of the disk.
    pub fn size(&self) -> u64 {
        self.index.size
    }

    /// The snapshot's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The disk's chunk index.
    pub fn index(&self) -> &DiskIndex {
        &self.index
    }

    /// Reads chunk `i`, verified; `None` for a chunk of zeros.
    pub async fn read_chunk(&self, i: usize) -> Result<Option<Arc<Vec<u8>>>, RepoError> {
        let id = *self.index.chunks.get(i).ok_or_else(|| {
            RepoError::InvalidRequest(format!("chunk {i} is past the end of the disk"))
        })?;
        if id.is_zero() {
            return Ok(None);
        }
        if let Some(hit) = self.cache.lock().expect("cache").get(&id) {
            return Ok(Some(hit));
        }
        let offset = i as u64 * self.index.chunk_size as u64;
        let data = fetch_chunk(&self.repo, &self.chunks, &self.ns_key, id)
            .await
            .map_err(|f| f.into_error(&self.manifest, &self.disk, offset, id))?
            .expect("non-zero id");
        let data = Arc::new(data);
        self.cache.lock().expect("cache").put(id, data.clone());
        Ok(Some(data))
    }

    /// Reads `len` bytes at `offset` (clipped to the disk's end).
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, RepoError> {
        let end = (offset + len as u64).min(self.index.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let cs = self.index.chunk_size as u64;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let i = (pos / cs) as usize;
            let within = (pos % cs) as usize;
            let take = ((cs - within as u64).min(end - pos)) as usize;
            match self.read_chunk(i).await? {
                Some(c) => out.extend_from_slice(&c[within..within + take]),
                None => out.resize(out.len() + take, 0),
            }
            pos += take as u64;
        }
        Ok(out)
    }
}

/// Largest ranged read a restore makes (several chunks stored back to back).
const MAX_RUN_BYTES: u64 = 8 << 20;
/// Ranged reads a restore keeps in flight.
const RUNS_IN_FLIGHT: usize = 6;

/// Chunks that lie back to back in one pack, read with one ranged GET.
type Run = Vec<(usize, ChunkId, crate::repo::ChunkLocation)>;

impl DiskReader {
    /// Groups the disk's non-zero chunks into runs of consecutive chunks
    /// stored contiguously in one pack (a full backup writes them so), so a
    /// restore makes few large requests instead of one per chunk. A chunk
    /// missing from the index gets a run of its own, which fails when read.
    fn runs(&self) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        let mut current: Run = Vec::new();
        let mut bytes = 0u64;
        for (i, id) in self.index.chunks.iter().enumerate() {
            if id.is_zero() {
                continue;
            }
            let loc = match self.chunks.chunks.get(id) {
                Some(l) => *l,
                None => {
                    runs.extend((!current.is_empty()).then(|| std::mem::take(&mut current)));
                    runs.push(vec![(
                        i,
                        *id,
                        crate::repo::ChunkLocation {
                            pack: u32::MAX,
                            offset: 0,
                            length: 0,
                            raw_length: 0,
                        },
                    )]);
                    bytes = 0;
                    continue;
                }
            };
            let extends = current.last().is_some_and(|(j, _, prev)| {
                *j + 1 == i
                    && prev.pack == loc.pack
                    && prev.offset + prev.length as u64 == loc.offset
                    && bytes + loc.length as u64 <= MAX_RUN_BYTES
            });
            if !extends && !current.is_empty() {
                runs.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += loc.length as u64;
            current.push((i, *id, loc));
        }
        runs.extend((!current.is_empty()).then_some(current));
        runs
    }

    /// Reads one run with a single ranged GET and verifies every chunk in it.
    async fn fetch_run(&self, run: Run) -> Result<Vec<(usize, Vec<u8>)>, RepoError> {
        let cs = self.index.chunk_size as u64;
        let (first_i, first_id, first) = run[0];
        let fault = |i: usize, id: ChunkId, f: ChunkFault| {
            f.into_error(&self.manifest, &self.disk, i as u64 * cs, id)
        };
        if first.pack == u32::MAX {
            return Err(fault(first_i, first_id, ChunkFault::Missing));
        }
        let total: u64 = run.iter().map(|(_, _, l)| l.length as u64).sum();
        let key = crate::format::pack_key(self.chunks.pack_of(&first));
        let raw = self
            .repo
            .storage
            .get_range(&key, first.offset, total)
            .await
            .map_err(|e| match e {
                crate::storage::StorageError::NotFound { .. } => {
                    fault(first_i, first_id, ChunkFault::Missing)
                }
                other => RepoError::Storage(other),
            })?;
        let keys = self.repo.keys.clone();
        let ns_key = self.ns_key;
        let checked = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(run.len());
            for (i, id, loc) in run {
                let start = (loc.offset - first.offset) as usize;
                let sealed = &raw[start..start + loc.length as usize];
                let plain = match keys.open(ObjectKind::Chunk, sealed, &id.0) {
                    Ok(p) => p,
                    Err(e) => return Err((i, id, e)),
                };
                if plain.len() != loc.raw_length as usize || ns_key.chunk_id(&plain) != id {
                    return Err((i, id, crate::format::FormatError::ChunkIdMismatch));
                }
                out.push((i, plain));
            }
            Ok(out)
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))?;
        checked.map_err(|(i, id, e)| fault(i, id, ChunkFault::Corrupt(e)))
    }
}

/// Output format of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A sparse raw image.
    Raw,
    /// qcow2, through `qemu-img convert` of a finished raw temp file.
    Qcow2,
}

/// Result of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Final path.
    pub path: PathBuf,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes of data written (zero chunks are holes).
    pub bytes_written: u64,
}

fn temp_beside(path: &Path, tag: &str) -> Result<PathBuf, RepoError> {
    let name = path.file_name().ok_or_else(|| {
        RepoError::InvalidRequest(format!(
            "the output path {} has no file name",
            path.display()
        ))
    })?;
    let tmp = format!(
        ".{}.{tag}-{}",
        name.to_string_lossy(),
        &crate::format::random_id()[..8]
    );
    Ok(path.with_file_name(tmp))
}

/// Restores one disk of a snapshot to `output`. Every chunk is verified;
/// the output is written under a hidden temporary name beside it and
/// renamed only when complete, so a failed restore publishes nothing. An
/// existing output is refused unless `overwrite`.
pub async fn restore_disk(
    repo: &Repository,
    snapshot: &str,
    disk: &str,
    output: &Path,
    format: OutputFormat,
    overwrite: bool,
) -> Result<RestoreReport, RepoError> {
    if !overwrite && tokio::fs::symlink_metadata(output).await.is_ok() {
        return Err(RepoError::Output {
            path: output.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the output file exists",
            ),
        });
    }
    let reader = DiskReader::open(repo, snapshot, disk, 0).await?;
    let raw_tmp = temp_beside(output, "raw-partial")?;
    let result = async {
        let written = write_raw(&reader, &raw_tmp).await?;
        match format {
            OutputFormat::Raw => {
                tokio::fs::rename(&raw_tmp, output)
                    .await
                    .map_err(|source| RepoError::Output {
                        path: output.display().to_string(),
                        source,
                    })?;
            }
            OutputFormat::Qcow2 => {
                let q_tmp = temp_beside(output, "qcow2-partial")?;
                let status = tokio::process::Command::new("qemu-img")
                    .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw_tmp)
                    .arg(&q_tmp)
                    .status()
                    .await;
                let ok = matches!(status, Ok(s) if s.success());
                if !ok {
                    let _ = tokio::fs::remove_file(&q_tmp).await;
                    return Err(RepoError::Output {
                        path: output.display().to_string(),
                        source: std::io::Error::other(format!(
                            "qemu-img convert to qcow2 failed: {status:?}"
                        )),
                    });
                }
                let _ = tokio::fs::remove_file(&raw_tmp).await;
                tokio::fs::rename(&q_tmp, output)
                    .await
                    .map_err(|source| RepoError::Output {
                        path: output.display().to_string(),
                        source,
                    })?;
            }
        }
        Ok(written)
    }
    .await;
    match result {
        Ok(bytes_written) => Ok(RestoreReport {
            path: output.to_owned(),
            size: reader.size(),
            bytes_written,
        }),
        Err(e) => {
            let _ = tokio::fs::remove_file(&raw_tmp).await;
            Err(e)
        }
    }
}

async fn write_raw(reader: &DiskReader, path: &Path) -> Result<u64, RepoError> {
    use std::os::unix::fs::FileExt;
    let out_err = |source| RepoError::Output {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(out_err)?;
    file.set_len(reader.size()).map_err(out_err)?;
    let file = Arc::new(file);
    let cs = reader.index.chunk_size as u64;
    let mut written = 0u64;
    let mut stream = futures::stream::iter(reader.runs())
        .map(|run| reader.fetch_run(run))
        .buffered(RUNS_IN_FLIGHT);
    while let Some(r) = stream.next().await {
        let chunks = r?;
        let f = file.clone();
        written += chunks.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        tokio::task::spawn_blocking(move || {
            chunks
                .iter()
                .try_for_each(|(i, data)| f.write_all_at(data, *i as u64 * cs))
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))?
        .map_err(out_err)?;
    }
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_all())
        .await
        .map_err(|e| RepoError::Task(e.to_string()))?
        .map_err(out_err)?;
    Ok(written)
}
