//! Chooses the default chunk size by measurement.
//!
//! For each chunk size: a full backup of an in-memory image into a fresh
//! directory repository (ingest throughput), then 1 % of the image rewritten
//! as scattered 64 KiB writes (4 KiB-aligned, like a guest file system) and
//! an incremental backup that reads only the dirty chunks; reports stored
//! bytes per dirty byte and the average size of the objects it wrote.
//!
//! `cargo run --release -p cairn-repo --example chunk_size -- [GiB] [dir]`
//! (default 1 GiB, a temp dir). Set `CAIRN_BENCH_KEY=none` for an
//! unencrypted repository.

use cairn_repo::{
    DiskSource, Extent, IngestOptions, InitOptions, Repository, RepositoryKey, SnapshotSpec,
    StorageConfig,
};
use rand::{Rng, RngCore, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

struct Image(Arc<Vec<u8>>);

impl DiskSource for Image {
    async fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        Ok(self.0[offset as usize..offset as usize + len].to_vec())
    }
}

fn make_image(size: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut img = vec![0u8; size];
    let text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit; sed do eiusmod tempor. ";
    let mut pos = 0;
    while pos < size {
        let len = (rng.random_range(1..=64) * 64 * 1024).min(size - pos);
        match rng.random_range(0..10) {
            0 | 1 => {} // 20 % zeros (unallocated)
            2 | 3 => {
                // 20 % compressible (text, tables)
                for (i, b) in img[pos..pos + len].iter_mut().enumerate() {
                    *b = text[i % text.len()];
                }
            }
            _ => rng.fill_bytes(&mut img[pos..pos + len]), // 60 % incompressible
        }
        pos += len;
    }
    img
}

fn spec(base: Option<String>) -> SnapshotSpec {
    SnapshotSpec {
        namespace: "bench".into(),
        vm: "vm".into(),
        vm_uid: None,
        backup_uid: "bench".into(),
        checkpoint: None,
        base,
        time: None,
    }
}

async fn stored(repo: &Repository) -> (u64, u64, u64, u64) {
    let objects = repo.storage().list("").await.expect("list");
    let packs: Vec<_> = objects
        .iter()
        .filter(|o| o.key.starts_with("packs/"))
        .collect();
    (
        objects.iter().map(|o| o.size).sum(),
        objects.len() as u64,
        packs.iter().map(|o| o.size).sum(),
        packs.len() as u64,
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let gib: f64 = args.get(1).map(|s| s.parse().expect("GiB")).unwrap_or(1.0);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = args
        .get(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_owned());
    let key = match std::env::var("CAIRN_BENCH_KEY").as_deref() {
        Ok("none") => RepositoryKey::None,
        _ => RepositoryKey::Key(b"bench key, thirty-two bytes long".to_vec()),
    };
    let size = (gib * (1u64 << 30) as f64) as usize;
    let base = make_image(size);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut changed = base.clone();
    let write = 64 * 1024;
    let writes = size / 100 / write;
    let mut dirty = Vec::new();
    for _ in 0..writes {
        let off = rng.random_range(0..(size - write) / 4096) * 4096;
        rng.fill_bytes(&mut changed[off..off + write]);
        dirty.push(Extent {
            offset: off as u64,
            length: write as u64,
        });
    }
    let dirty_bytes = (writes * write) as f64;
    let base = Image(Arc::new(base));
    let changed = Image(Arc::new(changed));
    println!(
        "image {:.2} GiB, {writes} scattered 64 KiB writes ({:.1} MiB dirty), encrypted: {}",
        gib,
        dirty_bytes / 1048576.0,
        !matches!(key, RepositoryKey::None)
    );
    println!(
        "| chunk | full ingest MiB/s | full stored MiB | incr. s | incr. read MiB | stored bytes / dirty byte | incr. objects | avg pack MiB | avg object MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for cs_kib in [64u32, 128, 256, 512, 1024, 2048, 4096] {
        let dir = root.join(format!("repo-{cs_kib}k"));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = StorageConfig::Directory { path: dir.clone() };
        let repo = Repository::init(
            &cfg,
            &key,
            &InitOptions {
                chunk_size: cs_kib * 1024,
                ..Default::default()
            },
        )
        .await
        .expect("init");
        let t = Instant::now();
        let mut w = repo
            .begin_snapshot(spec(None), IngestOptions::default())
            .await
            .expect("begin");
        w.add_disk("vda", size as u64, &base, None)
            .await
            .expect("full");
        let full = w.commit().await.expect("commit");
        let full_secs = t.elapsed().as_secs_f64();
        let (s0, n0, p0, pn0) = stored(&repo).await;
        let t = Instant::now();
        let mut w = repo
            .begin_snapshot(spec(Some(full.id.clone())), IngestOptions::default())
            .await
            .expect("begin");
        w.add_disk("vda", size as u64, &changed, Some(&dirty))
            .await
            .expect("incremental");
        let read = w.progress().bytes_read;
        w.commit().await.expect("commit");
        let incr_secs = t.elapsed().as_secs_f64();
        let (s1, n1, p1, pn1) = stored(&repo).await;
        let objects = n1 - n0;
        println!(
            "| {cs_kib} KiB | {:.0} | {:.0} | {:.2} | {:.1} | {:.2} | {objects} | {:.2} | {:.2} |",
            size as f64 / 1048576.0 / full_secs,
            s0 as f64 / 1048576.0,
            incr_secs,
            read as f64 / 1048576.0,
            (s1 - s0) as f64 / dirty_bytes,
            (p1 - p0) as f64 / 1048576.0 / (pn1 - pn0).max(1) as f64,
            (s1 - s0) as f64 / 1048576.0 / objects.max(1) as f64,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
