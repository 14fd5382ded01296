//! The read-only server, with QEMU's and libnbd's tools as clients.

mod common;

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cairn_nbd::client::list_exports_unix;
use cairn_nbd::proto::state;
use cairn_nbd::{
    BASE_ALLOCATION, BlockSource, Client, ClientError, ConnectOptions, Extent, FileSource, Server,
};
use common::*;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

/// Where [`make_source`] puts its data: (offset, length); everything else is a hole.
const DATA: &[(u64, u64)] = &[
    (0, 3 * MIB),
    (10 * MIB, MIB),
    (17 * MIB + 4096, 200 * 1024),
    (60 * MIB, 4 * MIB),
];
/// A region of 0xab bytes (inside DATA) for qemu-io's pattern checks.
const PATTERN: (u64, u64) = (10 * MIB, MIB);
/// The region the failing source cannot read.
const BAD: (u64, u64) = (60 * MIB + 512 * 1024, 64 * 1024);

/// A sparse 64 MiB raw file with random data in [`DATA`] and 0xab in [`PATTERN`].
fn make_source(path: &Path) -> Vec<u8> {
    let mut image = vec![0u8; 64 * MIB as usize];
    let mut rng = rand::rng();
    for &(off, len) in DATA {
        rng.fill_bytes(&mut image[off as usize..(off + len) as usize]);
    }
    image[PATTERN.0 as usize..(PATTERN.0 + PATTERN.1) as usize].fill(0xab);
    let file = std::fs::File::create(path).unwrap();
    file.set_len(64 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    for &(off, len) in DATA {
        file.write_all_at(&image[off as usize..(off + len) as usize], off)
            .unwrap();
    }
    image
}

/// A file source; when `failing`, reads inside [`BAD`] fail, as a repository
/// chunk that cannot be fetched would.
struct FlakySource {
    file: FileSource,
    failing: bool,
}

impl FlakySource {
    fn new(path: &Path, failing: bool) -> Arc<Self> {
        Arc::new(Self {
            file: FileSource::open(path).unwrap(),
            failing,
        })
    }
}

impl BlockSource for FlakySource {
    fn size(&self) -> u64 {
        self.file.size()
    }
    async fn read_at(&self, offset: u64, length: usize) -> io::Result<Bytes> {
        if self.failing && offset < BAD.0 + BAD.1 && offset + length as u64 > BAD.0 {
            return Err(io::Error::other("chunk 42 is unavailable"));
        }
        self.file.read_at(offset, length).await
    }
    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.file.extents(offset, length).await
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), cairn_nbd::ServerError>>,
}

/// Serves `path` as "snap" (reads in BAD fail) and as "good" (no failures).
fn start(sock: &Path, path: &Path) -> Running {
    let server = Server::new()
        .with_export("snap", "snapshot of disk vda", FlakySource::new(path, true))
        .with_export("good", "", FlakySource::new(path, false));
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let sock = sock.to_path_buf();
    let task = tokio::spawn(async move { server.serve_unix_path(&sock, token).await });
    Running { shutdown, task }
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_and_libnbd_tools_read_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    let image = make_source(&src_path);
    let sock = dir.path().join("srv.sock");
    let server = start(&sock, &src_path);
    wait_for_socket(&sock);
    let snap = uri(&sock, "snap");

    // qemu-img convert from the healthy export equals the source.
    let out = dir.path().join("out.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri(&sock, "good"),
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        std::fs::read(&out).unwrap() == image,
        "qemu-img convert output differs from the source"
    );
    // Across the unreadable region it fails with an I/O error rather than hanging or copying garbage.
    let convert = run_async(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &snap,
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!convert.status.success());
    let stderr = String::from_utf8_lossy(&convert.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}");

    // nbdinfo: size, read-only, description, and the map with holes.
    let info = run_ok("nbdinfo", &[&snap]).await;
    assert!(info.contains("export-size: 67108864"), "{info}");
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("snapshot of disk vda"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    let list = run_ok("nbdinfo", &["--list", &snap]).await;
    assert!(
        list.contains("export=\"snap\"") || list.contains("export=snap"),
        "{list}"
    );
    assert!(list.contains("good"), "{list}");
    let map = run_ok("nbdinfo", &["--map", &snap]).await;
    let mut extents = Vec::new();
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        extents.push((
            f[0].parse::<u64>().unwrap(),
            f[1].parse::<u64>().unwrap(),
            f[2].parse::<u32>().unwrap(),
        ));
    }
    let data: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.2 == 0)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(data, DATA.to_vec(), "nbdinfo --map: {map}");
    assert!(
        extents
            .iter()
            .filter(|e| e.2 != 0)
            .all(|e| e.2 == state::HOLE | state::ZERO)
    );

    // qemu-io -r: pattern reads succeed; a bad read fails alone and later reads still work.
    let io = run_async(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            &format!("read -P 0xab {} {}", PATTERN.0, PATTERN.1),
            "-c",
            &format!("read -P 0 {} {}", 30 * MIB, MIB),
            "-c",
            &format!("read {} {}", BAD.0, BAD.1),
            "-c",
            &format!("read -P 0xab {} 4096", PATTERN.0),
            &snap,
        ],
    )
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&io.stdout),
        String::from_utf8_lossy(&io.stderr)
    );
    assert_eq!(
        text.matches("read 1048576/1048576 bytes").count(),
        2,
        "{text}"
    );
    assert!(text.contains("Input/output error"), "{text}");
    assert!(text.contains("read 4096/4096 bytes"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");

    // Our client: EIO for the bad read only; the connection stays up.
    let client = Client::connect_unix(
        &sock,
        &ConnectOptions::new("snap").meta_context(BASE_ALLOCATION),
    )
    .await
    .unwrap();
    let err = client.read(BAD.0, BAD.1 as usize).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Request { errno: 5, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chunk 42 is unavailable"), "{err}");
    let ok = client.read(0, 3 * MIB as usize).await.unwrap();
    assert_eq!(ok, image[..3 * MIB as usize]);
    let err = client.write(0, vec![0; 4096]).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Request { errno: 1, .. }),
        "{err}"
    );
    let alloc = client.extents(BASE_ALLOCATION).await.unwrap();
    let data: Vec<(u64, u64)> = alloc
        .iter()
        .filter(|e| e.flags == 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(data, DATA.to_vec());

    // Many requests in flight from two connections at once.
    let second = Client::connect_unix(&sock, &ConnectOptions::new("snap"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..48u64 {
        let c = if i % 2 == 0 {
            client.clone()
        } else {
            second.clone()
        };
        let off = (i * 1_300_000) % (55 * MIB);
        tasks.push(tokio::spawn(async move {
            (off, c.read(off, 1 << 20).await.unwrap())
        }));
    }
    for t in tasks {
        let (off, data) = t.await.unwrap();
        assert!(
            data[..] == image[off as usize..off as usize + data.len()],
            "read at {off} differs"
        );
    }

    let listed = list_exports_unix(&sock).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["good", "snap"]);

    // Graceful shutdown: serve returns, the socket goes, clients see the end.
    server.shutdown.cancel();
    server.task.await.unwrap().unwrap();
    assert!(!sock.exists());
    let err = client.read(0, 4096).await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_uses_the_export_as_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    let image = make_source(&src_path);
    let sock = dir.path().join("srv.sock");
    let server = start(&sock, &src_path);
    wait_for_socket(&sock);

    // A qcow2 overlay backed by the export reads as the source.
    let overlay = dir.path().join("overlay.qcow2");
    let ov = overlay.to_str().unwrap();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &uri(&sock, "good"),
            "-F",
            "raw",
            ov,
        ],
    )
    .await;
    let out = dir.path().join("overlay.raw");
    run_ok(
        "qemu-img",
        &["convert", "-O", "raw", ov, out.to_str().unwrap()],
    )
    .await;
    assert!(
        std::fs::read(&out).unwrap() == image,
        "the overlay does not read as the source"
    );

    // Writes land in the overlay; unwritten regions still come from the export.
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 64K", ov],
    )
    .await;
    let io = run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 1M 64K",
            "-c",
            &format!("read -P 0xab {} {}", PATTERN.0, PATTERN.1),
            ov,
        ],
    )
    .await;
    assert!(!io.contains("Pattern verification failed"), "{io}");
    assert!(io.contains("read 1048576/1048576 bytes"), "{io}");

    server.shutdown.cancel();
    server.task.await.unwrap().unwrap();
}

/// Instant recovery as issue 11 describes it: QEMU runs on a local overlay
/// backed by the export, and `block-stream` pulls everything into the overlay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_block_stream_pulls_the_export_into_an_overlay() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    let image = make_source(&src_path);
    let sock = dir.path().join("srv.sock");
    let server = start(&sock, &src_path);
    wait_for_socket(&sock);

    let overlay = dir.path().join("overlay.qcow2");
    let ov = overlay.to_str().unwrap().to_string();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &uri(&sock, "good"),
            "-F",
            "raw",
            &ov,
        ],
    )
    .await;

    let qmp_sock = dir.path().join("qmp.sock");
    let child = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-machine",
            "none",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    let _qemu = KillOnDrop(child);
    wait_for_socket(&qmp_sock);
    let mut qmp = Qmp::connect(&qmp_sock).await;
    qmp.execute(
        "blockdev-add",
        json!({ "driver": "qcow2", "node-name": "ov", "file": { "driver": "file", "filename": ov } }),
    )
    .await;
    qmp.execute(
        "block-stream",
        json!({ "job-id": "pull", "device": "ov", "auto-dismiss": false }),
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let jobs = qmp.execute("query-jobs", json!({})).await;
        let job = &jobs.as_array().unwrap()[0];
        if job["status"] == "concluded" {
            assert!(job.get("error").is_none(), "block-stream failed: {job}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "block-stream did not finish: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    qmp.execute("job-dismiss", json!({ "id": "pull" })).await;
    qmp.execute("blockdev-del", json!({ "node-name": "ov" }))
        .await;
    qmp.execute("quit", json!({})).await;

    // The export is no longer needed: stop it, and the overlay stands alone.
    server.shutdown.cancel();
    server.task.await.unwrap().unwrap();
    let info = run_ok("qemu-img", &["info", "-U", &ov]).await;
    assert!(!info.contains("backing file"), "{info}");
    let out = dir.path().join("streamed.raw");
    run_ok(
        "qemu-img",
        &["convert", "-O", "raw", &ov, out.to_str().unwrap()],
    )
    .await;
    assert!(
        std::fs::read(&out).unwrap() == image,
        "the streamed overlay differs from the source"
    );
}
