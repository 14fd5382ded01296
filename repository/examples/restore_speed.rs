//! Measures restore: raw (sparse, verified) and qcow2 (raw temp, then
//! `qemu-img convert`), against `qemu-img convert` of the same raw image to
//! qcow2 as the reference.
//!
//! `cargo run --release -p cairn-repo --example restore_speed -- [GiB] [dir]`

use cairn_repo::{
    DiskSource, IngestOptions, InitOptions, OutputFormat, Repository, RepositoryKey, SnapshotSpec,
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

fn drop_caches() {
    // Best effort (root only): measure from storage, not the page cache.
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
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
    let size = (gib * (1u64 << 30) as f64) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut img = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let len = (rng.random_range(1..=64) * 64 * 1024).min(size - pos);
        if rng.random_range(0..10) >= 2 {
            rng.fill_bytes(&mut img[pos..pos + len]);
        }
        pos += len;
    }
    let dir = root.join("restore-speed");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let raw_ref = dir.join("reference.raw");
    std::fs::write(&raw_ref, &img).unwrap();
    let cfg = StorageConfig::Directory {
        path: dir.join("repo"),
    };
    let key = RepositoryKey::Key(b"bench key, thirty-two bytes long".to_vec());
    let repo = Repository::init(&cfg, &key, &InitOptions::default())
        .await
        .unwrap();
    let mut w = repo
        .begin_snapshot(
            SnapshotSpec {
                namespace: "bench".into(),
                vm: "vm".into(),
                vm_uid: None,
                backup_uid: "b".into(),
                checkpoint: None,
                base: None,
                time: None,
            },
            IngestOptions::default(),
        )
        .await
        .unwrap();
    let image = Image(Arc::new(img));
    w.add_disk("vda", size as u64, &image, None).await.unwrap();
    let m = w.commit().await.unwrap();
    drop(image);
    println!("| what | seconds | MiB/s |\n|---|---|---|");
    let line = |what: &str, secs: f64| {
        println!(
            "| {what} | {secs:.2} | {:.0} |",
            size as f64 / 1048576.0 / secs
        )
    };
    drop_caches();
    let t = Instant::now();
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw_ref)
        .arg(dir.join("reference.qcow2"))
        .status()
        .unwrap();
    assert!(st.success());
    line(
        "qemu-img convert raw → qcow2 (reference)",
        t.elapsed().as_secs_f64(),
    );
    drop_caches();
    let t = Instant::now();
    cairn_repo::restore_disk(
        &repo,
        &m.id,
        "vda",
        &dir.join("out.raw"),
        OutputFormat::Raw,
        false,
    )
    .await
    .unwrap();
    line(
        "cairn restore → raw (verified, sparse)",
        t.elapsed().as_secs_f64(),
    );
    drop_caches();
    let t = Instant::now();
    cairn_repo::restore_disk(
        &repo,
        &m.id,
        "vda",
        &dir.join("out.qcow2"),
        OutputFormat::Qcow2,
        false,
    )
    .await
    .unwrap();
    line(
        "cairn restore → qcow2 (raw temp + qemu-img convert)",
        t.elapsed().as_secs_f64(),
    );
    assert_eq!(
        std::fs::read(dir.join("out.raw")).unwrap(),
        std::fs::read(&raw_ref).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
