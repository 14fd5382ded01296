//! Maintenance: garbage collection and verification.
//!
//! GC is mark-and-sweep in two runs so it is safe with backups running:
//! 1. **mark**: every chunk named by a visible snapshot's disk indexes
//!    (live locks are read before the listing);
//! 2. **condemn**: packs with no marked chunk and older than the grace
//!    period are written to a condemned record (`gc/condemned-…`). Ingests
//!    read these records after taking their lock and never deduplicate
//!    against a condemned pack;
//! 3. **sweep**, in a later run: a condemned pack is deleted when that run's
//!    mark does not reference it and no ingest lock live before or after
//!    its listing started before the record was written (plus a clock skew
//!    margin) — such an ingest may have loaded the pack's index before the
//!    record existed, and one that committed between the listing and the
//!    sweep is seen by its lock read before the listing. A condemned pack
//!    that a snapshot references again is released. Packs younger than the grace period are never touched, so
//!    chunks an in-flight ingest uploaded survive until it commits.
//!
//! Also removed after the grace period: disk indexes without a manifest
//! (interrupted commits) and stale locks.

use crate::format::{self, ChunkId, ObjectKind};
use crate::reader::{ChunkFault, fetch_chunk};
use crate::repo::{RepoError, Repository, SnapshotId};
use crate::storage::StorageError;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// A lock without heartbeat for this long belongs to a dead ingest.
pub const DEFAULT_LOCK_STALE_AFTER: Duration = Duration::from_secs(15 * 60);

/// A GC record: packs found unreferenced at `time`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CondemnedRecord {
    /// When the record was made (GC's clock, before writing it).
    pub time: DateTime<Utc>,
    /// Pack ids.
    pub packs: Vec<String>,
}

/// Settings of a GC run.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Objects younger than this are never removed (PBS uses 24 h 5 min).
    pub grace: Duration,
    /// Locks without heartbeat for this long are dead.
    pub lock_stale_after: Duration,
    /// Allowed clock difference between GC and ingest hosts.
    pub clock_skew: Duration,
    /// Report only; delete nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(24 * 3600 + 300),
            lock_stale_after: DEFAULT_LOCK_STALE_AFTER,
            clock_skew: Duration::from_secs(300),
            dry_run: false,
        }
    }
}

/// What a GC run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Snapshots marked.
    pub snapshots: u64,
    /// Chunks referenced.
    pub chunks_referenced: u64,
    /// Packs kept.
    pub packs_kept: u64,
    /// Packs condemned in this run.
    pub packs_condemned: u64,
    /// Packs deleted.
    pub packs_deleted: u64,
    /// Bytes freed by deleted packs.
    pub bytes_freed: u64,
    /// Condemned packs waiting for a running ingest.
    pub packs_waiting: u64,
    /// Other objects removed (stale locks, disk indexes of unfinished snapshots).
    pub other_deleted: u64,
}

pub(crate) async fn read_condemned(
    repo: &Repository,
) -> Result<Vec<(String, CondemnedRecord)>, RepoError> {
    let mut out = Vec::new();
    for o in repo.storage.list("gc").await? {
        match repo
            .get_json::<CondemnedRecord>(&o.key, ObjectKind::Condemned)
            .await
        {
            Ok(r) => out.push((o.key, r)),
            Err(RepoError::Storage(StorageError::NotFound { .. })) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn age(now: DateTime<Utc>, t: DateTime<Utc>) -> Duration {
    (now - t).to_std().unwrap_or_default()
}

impl Repository {
    /// Runs garbage collection (see the module docs for why it is safe with
    /// concurrent backups).
    pub async fn gc(&self, options: &GcOptions) -> Result<GcReport, RepoError> {
        let mut report = GcReport::default();
        let now = Utc::now();
        let skew = chrono::Duration::from_std(options.clock_skew).unwrap_or_default();
        // Locks before the listing: an ingest that is running now and
        // commits before the sweep is invisible to the mark, so it blocks.
        let locks_before = self.live_locks(options.lock_stale_after).await?;
        // Then the listing: anything written after it is newer than `now`,
        // so it is inside the grace period anyway.
        let all = self.storage.list("").await?;
        let mut packs: HashMap<String, (u64, DateTime<Utc>)> = HashMap::new();
        let mut disk_indexes: Vec<(String, DateTime<Utc>)> = Vec::new();
        let mut manifests: HashSet<String> = HashSet::new();
        let mut locks = Vec::new();
        for o in &all {
            let parts: Vec<&str> = o.key.split('/').collect();
            match parts.as_slice() {
                ["packs", _, _] => {
                    if let Some(id) = format::pack_id_of_key(&o.key) {
                        packs.insert(id.into(), (o.size, o.last_modified));
                    }
                }
                ["snapshots", id, "manifest"] => {
                    manifests.insert((*id).into());
                }
                ["snapshots", _, f] if f.ends_with(".index") => {
                    disk_indexes.push((o.key.clone(), o.last_modified));
                }
                ["locks", _] => locks.push(o.clone()),
                _ => {}
            }
        }
        // Mark.
        let mut referenced: HashSet<ChunkId> = HashSet::new();
        let mut snapshot_ids: Vec<SnapshotId> = manifests.iter().cloned().collect();
        snapshot_ids.sort();
        let mut live_disk_indexes = HashSet::new();
        for id in &snapshot_ids {
            let m = match self.manifest(id).await {
                Ok(m) => m,
                // Pruned meanwhile.
                Err(RepoError::SnapshotNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            report.snapshots += 1;
            for d in &m.disks {
                live_disk_indexes.insert(d.index.clone());
                let idx = self.disk_index(&m, &d.name).await?;
                referenced.extend(idx.chunks.into_iter().filter(|c| !c.is_zero()));
            }
        }
        report.chunks_referenced = referenced.len() as u64;
        // Which packs hold referenced chunks.
        let pack_ids: Vec<(String, u64)> =
            packs.iter().map(|(p, (s, _))| (p.clone(), *s)).collect();
        let entries: Vec<(String, Result<Vec<crate::format::PackEntry>, RepoError>)> =
            futures::stream::iter(pack_ids)
                .map(|(p, size)| async move {
                    let e = self.pack_entries(&p, size).await;
                    (p, e)
                })
                .buffer_unordered(32)
                .collect()
                .await;
        let mut used_packs: HashSet<String> = HashSet::new();
        for (p, e) in entries {
            match e {
                Ok(entries) => {
                    if entries.iter().any(|e| referenced.contains(&e.id)) {
                        used_packs.insert(p);
                    }
                }
                Err(RepoError::Storage(StorageError::NotFound { .. })) => {}
                // A damaged pack index: keep the pack, verify will report it.
                Err(e) => {
                    tracing::warn!(pack = %p, error = %e, "unreadable pack index; keeping the pack");
                    used_packs.insert(p);
                }
            }
        }
        // Condemned records: release packs used again.
        let records = read_condemned(self).await?;
        let mut already: HashSet<String> = HashSet::new();
        for (_, r) in &records {
            already.extend(r.packs.iter().cloned());
        }
        let grace = options.grace;
        let mut new_condemned = Vec::new();
        for (id, (_, modified)) in &packs {
            if used_packs.contains(id) || already.contains(id) {
                continue;
            }
            if age(now, *modified) >= grace {
                new_condemned.push(id.clone());
            }
        }
        report.packs_kept = packs.len() as u64 - new_condemned.len() as u64;
        if options.dry_run {
            report.packs_condemned = new_condemned.len() as u64;
            return Ok(report);
        }
        let mut records = records;
        if !new_condemned.is_empty() {
            report.packs_condemned = new_condemned.len() as u64;
            let record = CondemnedRecord {
                time: Utc::now(),
                packs: new_condemned,
            };
            let key = format!(
                "gc/condemned-{}-{}",
                record.time.format("%Y%m%dT%H%M%SZ"),
                &format::random_id()[..8]
            );
            self.storage
                .put_new(&key, self.seal_json(ObjectKind::Condemned, &record))
                .await?;
            records.push((key, record));
        }
        // Sweep, only records written before this run started (a record
        // from this run waits for the next one, whose mark sees every
        // snapshot committed by ingests that might have used its packs).
        let mut live = self.live_locks(options.lock_stale_after).await?;
        live.extend(locks_before);
        for (key, record) in records {
            if record.time >= now {
                report.packs_waiting += record.packs.len() as u64;
                continue;
            }
            let blocked = live.iter().any(|l| l.record.started <= record.time + skew);
            let mut remaining = Vec::new();
            let mut changed = false;
            for pack in &record.packs {
                if used_packs.contains(pack) {
                    changed = true; // released
                    continue;
                }
                if blocked {
                    remaining.push(pack.clone());
                    continue;
                }
                self.storage.delete(&format::pack_key(pack)).await?;
                report.packs_deleted += 1;
                report.bytes_freed += packs.get(pack).map(|p| p.0).unwrap_or(0);
                changed = true;
            }
            report.packs_waiting += remaining.len() as u64;
            if remaining.is_empty() {
                self.storage.delete(&key).await?;
            } else if changed {
                let r = CondemnedRecord {
                    time: record.time,
                    packs: remaining,
                };
                self.storage
                    .put(&key, self.seal_json(ObjectKind::Condemned, &r))
                    .await?;
            }
        }
        // Orphans: unfinished snapshots, stale locks.
        // A commit writes its disk indexes just before its manifest: one
        // older than both the grace period and the lock stale limit belongs
        // to a writer that died.
        let orphan_age = grace.max(options.lock_stale_after);
        for (key, modified) in &disk_indexes {
            let snapshot = key.split('/').nth(1).unwrap_or_default();
            if !manifests.contains(snapshot)
                && !live_disk_indexes.contains(key)
                && age(now, *modified) >= orphan_age
            {
                self.storage.delete(key).await?;
                report.other_deleted += 1;
            }
        }
        for l in locks {
            if age(now, l.last_modified) >= options.lock_stale_after.max(grace) {
                self.storage.delete(&l.key).await?;
                report.other_deleted += 1;
            }
        }
        tracing::info!(?report, "garbage collection finished");
        Ok(report)
    }

    /// Reads and authenticates every chunk of the given snapshots (all when
    /// `None`). Each damaged chunk is reported once per place that uses it.
    pub async fn verify(
        &self,
        snapshots: Option<&[SnapshotId]>,
    ) -> Result<VerifyReport, RepoError> {
        let ids = match snapshots {
            Some(s) => s.to_vec(),
            None => self.snapshot_ids().await?,
        };
        let index = self.load_chunk_index(&Default::default()).await?;
        let mut report = VerifyReport::default();
        // chunk id -> (namespace, places that use it)
        let mut uses: HashMap<ChunkId, (String, Vec<ChunkUse>)> = HashMap::new();
        for id in &ids {
            let m = self.manifest(id).await?;
            report.snapshots += 1;
            for d in &m.disks {
                let idx = match self.disk_index(&m, &d.name).await {
                    Ok(i) => i,
                    Err(e) => {
                        report.problems.push(VerifyProblem {
                            snapshot: m.id.clone(),
                            disk: d.name.clone(),
                            offset: None,
                            message: e.to_string(),
                        });
                        continue;
                    }
                };
                for (i, c) in idx.chunks.iter().enumerate() {
                    if c.is_zero() {
                        continue;
                    }
                    uses.entry(*c)
                        .or_insert_with(|| (m.namespace.clone(), Vec::new()))
                        .1
                        .push((
                            m.id.clone(),
                            d.name.clone(),
                            i as u64 * idx.chunk_size as u64,
                        ));
                }
            }
        }
        let index = &index;
        let results: Vec<(ChunkId, Result<u64, ChunkFault>)> = futures::stream::iter(uses.iter())
            .map(|(id, (ns, _))| async move {
                let key = self.keys.namespace_key(ns);
                let r = fetch_chunk(self, index, &key, *id)
                    .await
                    .map(|d| d.map(|d| d.len() as u64).unwrap_or(0));
                (*id, r)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (id, r) in results {
            match r {
                Ok(bytes) => {
                    report.chunks_ok += 1;
                    report.bytes_ok += bytes;
                }
                Err(ChunkFault::Storage(e)) => return Err(RepoError::Storage(e)),
                Err(fault) => {
                    report.chunks_bad += 1;
                    let message = match &fault {
                        ChunkFault::Missing => format!("the chunk {id} is missing"),
                        ChunkFault::Corrupt(e) => format!("the chunk {id} is corrupt: {e}"),
                        ChunkFault::Storage(_) => unreachable!(),
                    };
                    for (snapshot, disk, offset) in &uses[&id].1 {
                        report.problems.push(VerifyProblem {
                            snapshot: snapshot.clone(),
                            disk: disk.clone(),
                            offset: Some(*offset),
                            message: message.clone(),
                        });
                    }
                }
            }
        }
        report.problems.sort_by(|a, b| {
            (&a.snapshot, &a.disk, a.offset).cmp(&(&b.snapshot, &b.disk, b.offset))
        });
        Ok(report)
    }
}

/// Where a chunk is used: snapshot, disk, byte offset.
type ChunkUse = (SnapshotId, String, u64);

/// One damaged place found by verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProblem {
    /// Snapshot id.
    pub snapshot: SnapshotId,
    /// Disk name.
    pub disk: String,
    /// Byte offset of the chunk in the disk; `None` when the disk index itself is bad.
    pub offset: Option<u64>,
    /// What is wrong, as a sentence.
    pub message: String,
}

/// Result of verify.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Snapshots checked.
    pub snapshots: u64,
    /// Distinct chunks that read back intact.
    pub chunks_ok: u64,
    /// Plaintext bytes of those chunks.
    pub bytes_ok: u64,
    /// Distinct chunks that are missing or corrupt.
    pub chunks_bad: u64,
    /// Every damaged place, by snapshot, disk and offset.
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    /// Whether everything verified.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}
