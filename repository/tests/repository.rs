//! Integration tests of cairn-repo against a real S3 server (versitygw) and a
//! directory.

mod common;

use cairn_repo::{
    DiskReader, GcOptions, IngestOptions, InitOptions, OutputFormat, RepoError, Repository,
    RepositoryKey, StorageConfig, StorageError,
};
use common::*;
use rand::SeedableRng;
use std::time::Duration;

const MIB: usize = 1 << 20;

async fn s3_repo(
    server: &S3Server,
    bucket: &str,
    key: &RepositoryKey,
) -> (StorageConfig, Repository) {
    server.create_bucket(bucket).await;
    let cfg = server.config(bucket, Some("repo/one"));
    let repo = Repository::init(&cfg, key, &small_repo_options())
        .await
        .unwrap();
    (cfg, repo)
}

async fn dir_repo(dir: &std::path::Path, key: &RepositoryKey) -> (StorageConfig, Repository) {
    let cfg = StorageConfig::Directory {
        path: dir.join("repo"),
    };
    let repo = Repository::init(&cfg, key, &small_repo_options())
        .await
        .unwrap();
    (cfg, repo)
}

async fn round_trip(repo: &Repository) {
    let img = random_image(1, 8 * MIB + 12_345);
    let disk = MemDisk::new(img.clone());
    let m = backup(repo, "tenant-a", "vm1", &disk, None).await.unwrap();
    assert_eq!(m.disks[0].size, img.len() as u64);
    assert!(m.disks[0].zero_chunks > 0, "the image has zero chunks");
    let listed = repo.list_snapshots().await.unwrap();
    assert_eq!(listed, vec![m.clone()]);
    // Restore: identical and sparse.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("disk.raw");
    let r = cairn_repo::restore_disk(repo, &m.id, "vda", &out, OutputFormat::Raw, false)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == img, "the restore differs");
    assert!(r.bytes_written < img.len() as u64);
    {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&out).unwrap();
        assert!(md.blocks() * 512 < md.len(), "zero chunks are holes");
    }
    assert_eq!(dir_entries(dir.path()), vec!["disk.raw"]);
    // Refuses to overwrite.
    assert!(
        cairn_repo::restore_disk(repo, &m.id, "vda", &out, OutputFormat::Raw, false)
            .await
            .is_err()
    );
    // Random access.
    let reader = DiskReader::open(repo, &m.id, "vda", 4).await.unwrap();
    for (off, len) in [
        (0u64, 10usize),
        (65_530, 20),
        (3 * MIB as u64 + 7, 200_000),
        (img.len() as u64 - 5, 100),
    ] {
        let got = reader.read_at(off, len).await.unwrap();
        let end = (off as usize + len).min(img.len());
        assert_eq!(got, img[off as usize..end], "read_at({off}, {len})");
    }
    let v = repo.verify(None).await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    let stats = repo.stats().await.unwrap();
    assert_eq!(stats.snapshot_count, 1);
    assert!(stats.stored_bytes > 0 && stats.stored_bytes < img.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_s3_encrypted() {
    let server = S3Server::start();
    let (_, repo) = s3_repo(&server, "roundtrip", &key()).await;
    round_trip(&repo).await;
    // Nothing readable in the clear: objects are under the prefix, and the
    // pack bytes do not contain the image's plaintext.
    let objects = repo.storage().list("").await.unwrap();
    assert!(objects.iter().any(|o| o.key.starts_with("packs/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_writes_on_s3() {
    let server = S3Server::start();
    let (_, repo) = s3_repo(&server, "createonly", &key()).await;
    repo.storage()
        .put_new("x/one", b"a".to_vec())
        .await
        .unwrap();
    let err = repo
        .storage()
        .put_new("x/one", b"b".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(&repo.storage().get("x/one").await.unwrap()[..], b"a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_unreachable_mid_upload_then_retry_works() {
    let mut server = S3Server::start();
    let (_, repo) = s3_repo(&server, "unreachable", &key()).await;
    let img = random_image(12, 8 * MIB);
    let mut disk = MemDisk::new(img.clone());
    disk.delay = Some(Duration::from_millis(60));
    let mut w = repo
        .begin_snapshot(spec("ns", "vm", None), IngestOptions::default())
        .await
        .unwrap();
    let ingest = async {
        w.add_disk("vda", disk.size(), &disk, None).await?;
        w.commit().await
    };
    let stop = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.stop();
    };
    let (r, ()) = tokio::join!(ingest, stop);
    let err = r.unwrap_err();
    assert!(matches!(err, RepoError::Storage(_)), "{err:?}");
    server.restart();
    assert!(
        repo.snapshot_ids().await.unwrap().is_empty(),
        "nothing visible"
    );
    let m = backup(&repo, "ns", "vm", &MemDisk::new(img.clone()), None)
        .await
        .unwrap();
    assert!(
        restore_bytes(&repo, &m.id).await.unwrap() == img,
        "the restore differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_directory_unencrypted_and_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = dir_repo(dir.path(), &RepositoryKey::None).await;
    round_trip(&repo).await;
    // qcow2 output through qemu-img, published only when complete.
    let m = &repo.list_snapshots().await.unwrap()[0];
    let out = tempfile::tempdir().unwrap();
    let q = out.path().join("disk.qcow2");
    cairn_repo::restore_disk(&repo, &m.id, "vda", &q, OutputFormat::Qcow2, false)
        .await
        .unwrap();
    assert_eq!(dir_entries(out.path()), vec!["disk.qcow2"]);
    let raw = out.path().join("back.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&q)
        .arg(&raw)
        .status()
        .expect("qemu-img (Debian qemu-utils) is needed");
    assert!(st.success());
    // qcow2 sizes are whole 512-byte sectors: the tail comes back zero-padded.
    let back = std::fs::read(raw).unwrap();
    let img = random_image(1, 8 * MIB + 12_345);
    assert!(back.len() >= img.len() && back.len() - img.len() < 512);
    assert!(back[..img.len()] == img[..], "the qcow2 restore differs");
    assert!(back[img.len()..].iter().all(|&b| b == 0));
    let err = Repository::init(
        &StorageConfig::Directory {
            path: dir.path().join("repo"),
        },
        &RepositoryKey::None,
        &small_repo_options(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::AlreadyInitialised), "{err}");
    // A local cache of pack indexes gives the same index, and forgets
    // packs that are gone.
    let cache = tempfile::tempdir().unwrap();
    let cached = repo.clone().with_index_cache(cache.path());
    let none = Default::default();
    let a = repo.load_chunk_index(&none).await.unwrap();
    let b = cached.load_chunk_index(&none).await.unwrap();
    let c = cached.load_chunk_index(&none).await.unwrap();
    let cache_dir = cache.path().join(&repo.config().id);
    assert_eq!(dir_entries(&cache_dir).len(), a.packs.len());
    assert_eq!(a.chunks.len(), b.chunks.len());
    assert_eq!(b.chunks.len(), c.chunks.len());
    std::fs::write(cache_dir.join("0123456789abcdef0123456789abcdef"), b"stale").unwrap();
    cached.load_chunk_index(&none).await.unwrap();
    assert_eq!(dir_entries(&cache_dir).len(), a.packs.len());
    let dir2 = tempfile::tempdir().unwrap();
    let (_, repo2) = dir_repo(dir2.path(), &key()).await;
    round_trip(&repo2).await;
}

async fn twenty_rounds(repo: &Repository, size: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut img = random_image(2, size);
    let mut history = Vec::new();
    let disk = MemDisk::new(img.clone());
    let m = backup(repo, "ns", "vm", &disk, None).await.unwrap();
    history.push((m.id.clone(), img.clone()));
    let cs = repo.chunk_size() as u64;
    for round in 0..20 {
        let dirty = random_writes(&mut rng, &mut img, 1 + round % 7);
        let disk = MemDisk::new(img.clone());
        let base = history.last().unwrap().0.clone();
        let m = backup(repo, "ns", "vm", &disk, Some((&base, &dirty)))
            .await
            .unwrap();
        // Only chunks overlapping dirty extents were read.
        let mut chunks = std::collections::BTreeSet::new();
        for e in &dirty {
            for c in e.offset / cs..=(e.offset + e.length - 1) / cs {
                chunks.insert(c);
            }
        }
        let bound = chunks.len() as u64 * cs;
        let read = disk.bytes_read.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            read <= bound,
            "round {round}: read {read} bytes, dirty chunks cover {bound}"
        );
        history.push((m.id.clone(), img.clone()));
    }
    for (i, (id, expected)) in history.iter().enumerate() {
        let got = restore_bytes(repo, id).await.unwrap();
        assert!(
            got == *expected,
            "snapshot {i} ({id}) does not restore byte-identical"
        );
    }
    assert!(repo.verify(None).await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_incremental_rounds_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = dir_repo(dir.path(), &key()).await;
    twenty_rounds(&repo, 6 * MIB + 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_incremental_rounds_s3() {
    let server = S3Server::start();
    let (_, repo) = s3_repo(&server, "rounds", &key()).await;
    twenty_rounds(&repo, 4 * MIB).await;
}

/// Non-zero chunks of an image that repeat an earlier chunk of the same image.
fn repeated_chunks(img: &[u8], cs: usize) -> u64 {
    let mut seen = std::collections::HashSet::new();
    img.chunks(cs)
        .filter(|c| c.iter().any(|&b| b != 0))
        .filter(|c| !seen.insert(c.to_vec()))
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_within_namespace_not_across() {
    let server = S3Server::start();
    let (_, repo) = s3_repo(&server, "dedup", &key()).await;
    let base = random_image(3, 8 * MIB);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut a = base.clone();
    random_writes(&mut rng, &mut a, 3);
    let mut b = base.clone();
    random_writes(&mut rng, &mut b, 3);
    let before = repo.stats().await.unwrap().pack_bytes;
    backup(&repo, "tenant-a", "vm-a", &MemDisk::new(a.clone()), None)
        .await
        .unwrap();
    let after_a = repo.stats().await.unwrap().pack_bytes;
    let mut w = repo
        .begin_snapshot(spec("tenant-a", "vm-b", None), IngestOptions::default())
        .await
        .unwrap();
    let disk_b = MemDisk::new(b.clone());
    w.add_disk("vda", disk_b.size(), &disk_b, None)
        .await
        .unwrap();
    let p = w.progress();
    let mb = w.commit().await.unwrap();
    let after_b = repo.stats().await.unwrap().pack_bytes;
    let added_a = after_a - before;
    let added_b = after_b - after_a;
    assert!(p.chunks_reused > 0);
    assert!(
        added_b * 4 < added_a,
        "a clone in the same namespace adds {added_b} bytes, the first VM {added_a}"
    );
    // Another namespace: nothing shared.
    let mut w = repo
        .begin_snapshot(spec("tenant-b", "vm-b", None), IngestOptions::default())
        .await
        .unwrap();
    w.add_disk("vda", disk_b.size(), &disk_b, None)
        .await
        .unwrap();
    let p = w.progress();
    let mc = w.commit().await.unwrap();
    let after_c = repo.stats().await.unwrap().pack_bytes;
    // Only repeats inside the image itself are reused, nothing of tenant-a's.
    assert_eq!(
        p.chunks_reused,
        repeated_chunks(&b, 64 << 10),
        "no dedup across namespaces"
    );
    assert!(after_c - after_b >= added_a * 9 / 10);
    assert!(
        restore_bytes(&repo, &mb.id).await.unwrap() == b,
        "the restore differs"
    );
    assert!(
        restore_bytes(&repo, &mc.id).await.unwrap() == b,
        "the restore differs"
    );
    // An incremental across namespaces is refused.
    let err = repo
        .begin_snapshot(
            spec("tenant-b", "vm-b", Some(&mb.id)),
            IngestOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_and_chunk_size_refused_before_writing() {
    let server = S3Server::start();
    let (cfg, repo) = s3_repo(&server, "keys", &key()).await;
    backup(&repo, "ns", "vm", &MemDisk::new(random_image(4, MIB)), None)
        .await
        .unwrap();
    let before: Vec<_> = repo
        .storage()
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let err = Repository::open(
        &cfg,
        &RepositoryKey::Key(b"another key, also 32 bytes long!".to_vec()),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::WrongKey), "{err}");
    assert_eq!(
        err.to_string(),
        "the repository key does not match the key the repository was initialised with"
    );
    let err = Repository::open_or_init(
        &cfg,
        &RepositoryKey::Key(b"another key, also 32 bytes long!".to_vec()),
        &small_repo_options(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::WrongKey), "{err}");
    let err = Repository::open(&cfg, &RepositoryKey::None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::EncryptionMismatch(_)), "{err}");
    let err = Repository::open(&cfg, &key(), Some(1 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RepoError::ChunkSizeMismatch {
                stored: 65536,
                requested: 1048576
            }
        ),
        "{err}"
    );
    let err = Repository::open_or_init(
        &cfg,
        &key(),
        &InitOptions {
            chunk_size: 1 << 20,
            ..small_repo_options()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::ChunkSizeMismatch { .. }), "{err}");
    let err = Repository::init(&cfg, &key(), &small_repo_options())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::AlreadyInitialised), "{err}");
    let after: Vec<_> = repo
        .storage()
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(before, after, "nothing was written");
    Repository::open(&cfg, &key(), Some(65536)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_missing_bucket() {
    let server = S3Server::start();
    server.create_bucket("creds").await;
    let mut cfg = server.config("creds", None);
    if let StorageConfig::S3(s) = &mut cfg {
        s.secret_access_key = "wrong-secret".into();
    }
    let err = Repository::init(&cfg, &key(), &small_repo_options())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RepoError::Storage(StorageError::Credentials(_))),
        "{err:?}"
    );
    assert!(err.to_string().contains("credentials"), "{err}");
    let cfg = server.config("no-such-bucket", None);
    let err = Repository::open(&cfg, &key(), None).await.unwrap_err();
    assert!(
        matches!(err, RepoError::Storage(StorageError::MissingBucket { .. })),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the bucket \"no-such-bucket\" does not exist"
    );
    let cfg = server.config("creds", None);
    let err = Repository::open(&cfg, &key(), None).await.unwrap_err();
    assert!(matches!(err, RepoError::NotInitialised), "{err:?}");
}

/// Flips a byte of every pack that holds data (so every non-zero chunk is bad
/// or missing), via `damage`.
async fn corrupt_and_delete(repo: &Repository, storage_root: Option<&std::path::Path>) {
    let img = random_image(5, 3 * MIB);
    let m = backup(repo, "ns", "vm", &MemDisk::new(img.clone()), None)
        .await
        .unwrap();
    let packs: Vec<_> = repo.storage().list("packs").await.unwrap();
    assert!(packs.len() >= 2, "several packs");
    // Corrupt the first pack: flip a byte at the start of its first chunk.
    let p0 = &packs[0].key;
    let mut bytes = repo.storage().get(p0).await.unwrap().to_vec();
    bytes[20] ^= 0xff;
    match storage_root {
        Some(root) => std::fs::write(root.join(p0), &bytes).unwrap(),
        None => repo.storage().put(p0, bytes).await.unwrap(),
    }
    // Delete the second.
    repo.storage().delete(&packs[1].key).await.unwrap();
    let v = repo
        .verify(Some(std::slice::from_ref(&m.id)))
        .await
        .unwrap();
    assert!(!v.is_ok());
    assert!(v.chunks_bad >= 2);
    assert!(
        v.problems
            .iter()
            .all(|p| p.snapshot == m.id && p.disk == "vda" && p.offset.is_some())
    );
    assert!(
        v.problems.iter().any(|p| p.message.contains("corrupt")),
        "{v:?}"
    );
    assert!(
        v.problems.iter().any(|p| p.message.contains("missing")),
        "{v:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("disk.raw");
    let err = cairn_repo::restore_disk(repo, &m.id, "vda", &out, OutputFormat::Raw, false)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&m.id) && text.contains("vda") && text.contains("offset"),
        "{text}"
    );
    assert!(
        dir_entries(dir.path()).is_empty(),
        "restore published nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_and_deleted_packs_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = dir_repo(dir.path(), &RepositoryKey::None).await;
    corrupt_and_delete(&repo, Some(&dir.path().join("repo"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_and_deleted_packs_s3() {
    let server = S3Server::start();
    let (_, repo) = s3_repo(&server, "corrupt", &key()).await;
    corrupt_and_delete(&repo, None).await;
}

/// An upload cut off mid-body can leave a truncated pack (versitygw's posix
/// backend keeps what it received): the next backup stores those chunks
/// again instead of failing on the damaged pack, and both snapshots restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_pack_does_not_block_later_backups() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = dir_repo(dir.path(), &RepositoryKey::None).await;
    let img = random_image(8, 3 * MIB);
    let first = backup(&repo, "ns", "vm", &MemDisk::new(img.clone()), None)
        .await
        .unwrap();
    let packs = repo.storage().list("packs").await.unwrap();
    let cut = &packs[0];
    let path = dir.path().join("repo").join(&cut.key);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let second = backup(&repo, "ns", "vm", &MemDisk::new(img.clone()), None)
        .await
        .expect("a damaged pack must not fail the next backup");
    assert!(
        repo.storage().list("packs").await.unwrap().len() > packs.len(),
        "the chunks of the truncated pack were stored again"
    );
    for m in [&first, &second] {
        assert!(
            restore_bytes(&repo, &m.id).await.unwrap() == img,
            "{}",
            m.id
        );
    }
    assert!(repo.verify(None).await.unwrap().is_ok());
}

fn quick_gc(grace_ms: u64, stale_ms: u64) -> GcOptions {
    GcOptions {
        grace: Duration::from_millis(grace_ms),
        lock_stale_after: Duration::from_millis(stale_ms),
        clock_skew: Duration::ZERO,
        dry_run: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_ingest_leaves_nothing_visible_and_gc_waits_for_grace() {
    let server = S3Server::start();
    let (_, repo) = s3_repo(&server, "interrupt", &key()).await;
    let kept = random_image(6, 2 * MIB);
    let m = backup(&repo, "ns", "kept", &MemDisk::new(kept.clone()), None)
        .await
        .unwrap();
    let packs_before = repo.storage().list("packs").await.unwrap().len();
    // 256 chunks, 8 at a time, 100 ms each: over 3 s, so the 2 s timeout cuts it.
    let mut disk = MemDisk::new(random_image(7, 16 * MIB));
    disk.delay = Some(Duration::from_millis(100));
    let mut w = repo
        .begin_snapshot(
            spec("ns", "dropped", None),
            IngestOptions {
                heartbeat: Duration::from_millis(200),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        w.add_disk("vda", disk.size(), &disk, None),
    )
    .await;
    assert!(r.is_err(), "the ingest was still running");
    drop(w);
    let packs_mid = repo.storage().list("packs").await.unwrap().len();
    assert!(
        packs_mid > packs_before,
        "some packs were uploaded before the drop"
    );
    assert_eq!(
        repo.snapshot_ids().await.unwrap(),
        vec![m.id.clone()],
        "no visible partial snapshot"
    );
    // Inside the grace period nothing goes.
    let rep = repo.gc(&quick_gc(60_000, 500)).await.unwrap();
    assert_eq!(rep.packs_deleted, 0);
    assert_eq!(repo.storage().list("packs").await.unwrap().len(), packs_mid);
    // After it, the orphans go and the kept snapshot stays whole.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rep = repo.gc(&quick_gc(1000, 500)).await.unwrap();
    assert_eq!(
        rep.packs_condemned as usize,
        packs_mid - packs_before,
        "{rep:?}"
    );
    assert_eq!(rep.packs_deleted, 0, "condemned packs go in a later run");
    let rep = repo.gc(&quick_gc(1000, 500)).await.unwrap();
    assert_eq!(
        rep.packs_deleted as usize,
        packs_mid - packs_before,
        "{rep:?}"
    );
    assert_eq!(
        repo.storage().list("packs").await.unwrap().len(),
        packs_before
    );
    assert!(
        repo.storage().list("locks").await.unwrap().is_empty(),
        "the stale lock is gone"
    );
    assert!(
        restore_bytes(&repo, &m.id).await.unwrap() == kept,
        "the restore differs"
    );
    assert!(repo.verify(None).await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_and_prune_during_ingest_never_break_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = dir_repo(dir.path(), &key()).await;
    // S1 holds a base image; a clone of it is backed up while S1 is pruned
    // and GC runs with no grace at all, over and over.
    let base = random_image(8, 6 * MIB);
    let s1 = backup(&repo, "ns", "vm1", &MemDisk::new(base.clone()), None)
        .await
        .unwrap();
    let mut clone = base.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    random_writes(&mut rng, &mut clone, 4);
    let mut disk = MemDisk::new(clone.clone());
    disk.delay = Some(Duration::from_millis(100));
    let ingest = {
        let repo = repo.clone();
        let disk = disk.clone();
        tokio::spawn(async move { backup(&repo, "ns", "vm2", &disk, None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    repo.delete_snapshot(&s1.id).await.unwrap();
    let mut runs = 0;
    let mut waited = 0;
    while !ingest.is_finished() {
        let rep = repo.gc(&quick_gc(0, 60_000)).await.unwrap();
        waited = waited.max(rep.packs_waiting);
        runs += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s2 = ingest.await.unwrap().unwrap();
    assert!(runs > 1);
    assert!(
        waited > 0,
        "the pruned snapshot's packs waited for the running ingest"
    );
    assert!(
        restore_bytes(&repo, &s2.id).await.unwrap() == clone,
        "the restore differs"
    );
    // Released packs stay; S1-only chunks go.
    let rep = repo.gc(&quick_gc(0, 60_000)).await.unwrap();
    assert_eq!(rep.packs_waiting, 0, "{rep:?}");
    assert!(
        restore_bytes(&repo, &s2.id).await.unwrap() == clone,
        "the restore differs"
    );
    assert!(repo.verify(None).await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_refuses_the_base_of_a_running_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = dir_repo(dir.path(), &RepositoryKey::None).await;
    let img = random_image(9, MIB);
    let s1 = backup(&repo, "ns", "vm", &MemDisk::new(img.clone()), None)
        .await
        .unwrap();
    let w = repo
        .begin_snapshot(spec("ns", "vm", Some(&s1.id)), IngestOptions::default())
        .await
        .unwrap();
    let err = repo.delete_snapshot(&s1.id).await.unwrap_err();
    assert!(matches!(err, RepoError::SnapshotInUse(_)), "{err}");
    w.abort().await;
    repo.delete_snapshot(&s1.id).await.unwrap();
    assert!(repo.list_snapshots().await.unwrap().is_empty());
    assert!(matches!(
        repo.manifest(&s1.id).await,
        Err(RepoError::SnapshotNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_at_once() {
    let server = S3Server::start();
    let (cfg, repo) = s3_repo(&server, "writers", &key()).await;
    let other = Repository::open(&cfg, &key(), Some(65536)).await.unwrap();
    let base = random_image(10, 6 * MIB);
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let mut a = base.clone();
    random_writes(&mut rng, &mut a, 2);
    let mut b = base.clone();
    random_writes(&mut rng, &mut b, 2);
    let (da, db) = (MemDisk::new(a.clone()), MemDisk::new(b.clone()));
    let (ra, rb) = tokio::join!(
        backup(&repo, "ns", "a", &da, None),
        backup(&other, "ns", "b", &db, None)
    );
    let (ma, mb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(repo.list_snapshots().await.unwrap().len(), 2);
    assert!(
        restore_bytes(&repo, &ma.id).await.unwrap() == a,
        "the restore differs"
    );
    assert!(
        restore_bytes(&other, &mb.id).await.unwrap() == b,
        "the restore differs"
    );
    assert!(repo.verify(None).await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = dir_repo(dir.path(), &key()).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let opts = IngestOptions {
        progress: Some(std::sync::Arc::new(
            move |p: &cairn_repo::IngestProgress| s.lock().unwrap().push(*p),
        )),
        ..Default::default()
    };
    let img = random_image(11, 4 * MIB);
    let disk = MemDisk::new(img);
    let mut w = repo
        .begin_snapshot(spec("ns", "vm", None), opts)
        .await
        .unwrap();
    w.add_disk("vda", disk.size(), &disk, None).await.unwrap();
    w.commit().await.unwrap();
    let seen = seen.lock().unwrap();
    let last = seen.last().unwrap();
    assert!(seen.len() > 10);
    assert_eq!(
        last.bytes_read,
        4 * MIB as u64,
        "a full backup reads every chunk"
    );
    assert!(last.bytes_uploaded > 0 && last.chunks_new > 0);
}

/// A source that fails at one offset.
struct FailingDisk(MemDisk, u64);

impl cairn_repo::DiskSource for FailingDisk {
    async fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        if offset == self.1 {
            return Err(std::io::Error::other("NBD read failed"));
        }
        self.0.read_at(offset, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_read_error_names_disk_and_offset_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = dir_repo(dir.path(), &key()).await;
    let disk = FailingDisk(MemDisk::new(random_image(13, 4 * MIB)), 3 * 65536);
    let mut w = repo
        .begin_snapshot(spec("ns", "vm", None), IngestOptions::default())
        .await
        .unwrap();
    let err = w
        .add_disk("vdb", disk.0.size(), &disk, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RepoError::Source { offset: 196608, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "reading the source disk \"vdb\" at offset 196608 failed"
    );
    drop(w);
    assert!(repo.snapshot_ids().await.unwrap().is_empty());
    // The dropped writer removes its lock in the background.
    for _ in 0..50 {
        if repo.storage().list("locks").await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the dropped writer's lock is still there");
}

/// Throughput against versitygw on loopback (a measurement, not a test):
/// `cargo test --release -p cairn-repo --test repository -- --ignored --nocapture s3_throughput`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; run on demand in release mode"]
async fn s3_throughput() {
    let gib: usize = std::env::var("CAIRN_BENCH_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let server = S3Server::start();
    server.create_bucket("bench").await;
    let cfg = server.config("bench", None);
    let repo = Repository::init(&cfg, &key(), &InitOptions::default())
        .await
        .unwrap();
    let size = gib << 30;
    let img = random_image(14, size);
    let disk = MemDisk::new(img.clone());
    let t = std::time::Instant::now();
    let full = backup(&repo, "ns", "vm", &disk, None).await.unwrap();
    let full_s = t.elapsed().as_secs_f64();
    let mut changed = img;
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut dirty = Vec::new();
    for _ in 0..size / 100 / 65536 {
        let off = rand::Rng::random_range(&mut rng, 0..(size - 65536) / 4096) * 4096;
        rand::RngCore::fill_bytes(&mut rng, &mut changed[off..off + 65536]);
        dirty.push(cairn_repo::Extent {
            offset: off as u64,
            length: 65536,
        });
    }
    let disk = MemDisk::new(changed);
    let t = std::time::Instant::now();
    let incr = backup(&repo, "ns", "vm", &disk, Some((&full.id, &dirty)))
        .await
        .unwrap();
    let incr_s = t.elapsed().as_secs_f64();
    let out = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    cairn_repo::restore_disk(
        &repo,
        &incr.id,
        "vda",
        &out.path().join("d.raw"),
        OutputFormat::Raw,
        false,
    )
    .await
    .unwrap();
    let restore_s = t.elapsed().as_secs_f64();
    let stats = repo.stats().await.unwrap();
    let mib = size as f64 / 1048576.0;
    println!("| versitygw loopback, {gib} GiB, 256 KiB chunks, encrypted | seconds | MiB/s |");
    println!("|---|---|---|");
    println!("| full ingest | {full_s:.2} | {:.0} |", mib / full_s);
    println!("| incremental, 1 % in 64 KiB writes | {incr_s:.2} | |");
    println!(
        "| restore to raw | {restore_s:.2} | {:.0} |",
        mib / restore_s
    );
    println!(
        "stored {} MiB in {} packs (avg {:.1} MiB), logical {} MiB",
        stats.stored_bytes >> 20,
        stats.pack_count,
        stats.pack_bytes as f64 / 1048576.0 / stats.pack_count as f64,
        stats.logical_bytes >> 20
    );
}
