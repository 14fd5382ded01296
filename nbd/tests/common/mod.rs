//! Shared helpers: running QEMU tools, a `qemu-nbd` process, a tiny QMP exchange.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub const MIB: u64 = 1024 * 1024;

/// Runs a command to completion; panics with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command from async code (so an in-process server keeps serving).
pub async fn run_async(program: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Like [`run_async`], panicking on failure; returns stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run_async(program, args).await;
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `qemu-nbd` on a unix socket with extra arguments; returns once the socket exists.
pub fn qemu_nbd(socket: &Path, args: &[&str]) -> KillOnDrop {
    let child = Command::new("qemu-nbd")
        .arg("-k")
        .arg(socket)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot start qemu-nbd");
    let guard = KillOnDrop(child);
    wait_for_socket(socket);
    guard
}

/// The regions written after the bitmap was added, in the test image.
/// (offset, length, qemu-io pattern)
pub const DIRTY_WRITES: &[(u64, u64, u8)] = &[
    (4 * MIB, 64 * 1024, 0x33),
    (20 * MIB, MIB, 0x44),
    (30 * MIB + 1000, 100, 0x66),
    (63 * MIB, 128 * 1024, 0x55),
];

/// A zero write after the bitmap (dirty, reads as zeroes).
pub const DIRTY_ZERO_WRITE: (u64, u64) = (40 * MIB, MIB);

/// Expected dirty extents of [`make_image`]'s bitmap (64 KiB granularity), merged.
pub fn expected_dirty() -> Vec<(u64, u64)> {
    vec![
        (4 * MIB, 64 * 1024),
        (20 * MIB, MIB),
        (30 * MIB, 64 * 1024),
        (40 * MIB, MIB),
        (63 * MIB, 128 * 1024),
    ]
}

/// Makes a 64 MiB qcow2 with data written before and after adding bitmap
/// `b0`, and returns (qcow2 path, raw conversion path).
pub fn make_image(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "64M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 8M 512K",
            "-c",
            "write -P 0x77 20M 2M",
            img_s,
        ],
    );
    run("qemu-img", &["bitmap", "--add", "-g", "64K", img_s, "b0"]);
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for (off, len, pat) in DIRTY_WRITES {
        args.push("-c".into());
        args.push(format!("write -P {pat:#x} {off} {len}"));
    }
    args.push("-c".into());
    args.push(format!(
        "write -z {} {}",
        DIRTY_ZERO_WRITE.0, DIRTY_ZERO_WRITE.1
    ));
    args.push(img_s.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args);
    let raw = dir.join("disk.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            img_s,
            raw.to_str().unwrap(),
        ],
    );
    (img, raw)
}

/// A minimal QMP session over a unix socket: one command at a time, events skipped.
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    pub async fn connect(path: &Path) -> Self {
        // QEMU creates the socket file at bind() and accepts only after
        // listen(): a connect in between is refused, so retry for a while.
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("connect to QMP at {}: {e}", path.display()),
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await;
        assert!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", serde_json::json!({})).await;
        qmp
    }

    async fn read_message(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await.expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).expect("QMP sent invalid JSON")
    }

    /// Runs a command and returns its `return` value; panics on an error reply.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> serde_json::Value {
        let msg = serde_json::json!({ "execute": command, "arguments": arguments });
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .expect("write QMP");
        loop {
            let reply = self.read_message().await;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return ret.clone();
            }
            panic!("QMP {command} failed: {reply}");
        }
    }
}
