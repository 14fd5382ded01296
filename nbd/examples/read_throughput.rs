//! Read throughput of the `cairn-nbd` client against a `qemu-nbd` export,
//! compared with `nbdcopy` (libnbd) copying the same export to `/dev/null` in
//! the same run.
//!
//! ```text
//! cargo run --release -p cairn-nbd --example read_throughput -- [size_gib=2] [in_flight=16] [request_kib=2048] [rounds=3]
//! ```
//!
//! It writes a raw image of pseudo-random data (no zeroes, so nothing is sent
//! as holes) in a temporary directory, exports it read-only with `qemu-nbd`,
//! and alternates the tools each round so both see the same page cache.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_nbd::{Client, ConnectOptions};

const MIB: u64 = 1024 * 1024;

fn arg(name: &str, default: u64) -> u64 {
    std::env::args()
        .skip(1)
        .find_map(|a| {
            a.strip_prefix(&format!("{name}="))
                .map(|v| v.parse().expect("a number"))
        })
        .unwrap_or(default)
}

/// Writes `size` bytes of cheap pseudo-random data (xorshift), 64 MiB at a time.
fn make_image(path: &std::path::Path, size: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 64 * MIB as usize];
    let mut written = 0;
    while written < size {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = (size - written).min(block.len() as u64) as usize;
        file.write_all(&block[..n]).unwrap();
        written += n as u64;
    }
    file.flush().unwrap();
}

async fn ours(sock: &std::path::Path, in_flight: u64, request: u64) -> Duration {
    let client = Client::connect_unix(sock, &ConnectOptions::new("bench"))
        .await
        .expect("connect");
    let size = client.size();
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..in_flight {
        let client = client.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            loop {
                let offset = next.fetch_add(request, Ordering::Relaxed);
                if offset >= size {
                    return bytes;
                }
                let len = request.min(size - offset) as usize;
                let data = client.read(offset, len).await.expect("read");
                bytes += data.len() as u64;
            }
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(total, size);
    client.disconnect().await.expect("disconnect");
    elapsed
}

fn nbdcopy(uri: &str, extra: &[String]) -> Duration {
    let start = Instant::now();
    let status = Command::new("nbdcopy")
        .args(extra)
        .arg(uri)
        .arg("/dev/null")
        .status()
        .expect("cannot run nbdcopy");
    assert!(status.success(), "nbdcopy failed");
    start.elapsed()
}

fn mibs(size: u64, d: Duration) -> f64 {
    size as f64 / MIB as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let size = arg("size_gib", 2) * 1024 * MIB;
    let in_flight = arg("in_flight", 16);
    let request = arg("request_kib", 2048) * 1024;
    let rounds = arg("rounds", 3);

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("bench.raw");
    let sock = dir.path().join("bench.sock");
    eprintln!("writing a {} GiB image…", size / 1024 / MIB);
    make_image(&image, size);
    let mut server = Command::new("qemu-nbd")
        .args(["-r", "-f", "raw", "-x", "bench", "-e", "8", "-t", "-k"])
        .arg(&sock)
        .arg(&image)
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot start qemu-nbd");
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///bench?socket={}", sock.display());
    let matched = vec![
        "--connections=1".to_string(),
        format!("--requests={in_flight}"),
        format!("--request-size={request}"),
    ];
    // Warm the page cache so every run reads from memory.
    nbdcopy(&uri, &[]);

    let mut results: Vec<(&str, Vec<Duration>)> = vec![
        ("cairn-nbd client (1 connection)", Vec::new()),
        ("nbdcopy, same shape (1 connection)", Vec::new()),
        ("nbdcopy, defaults (multi-conn)", Vec::new()),
    ];
    for _ in 0..rounds {
        results[0].1.push(ours(&sock, in_flight, request).await);
        results[1].1.push(nbdcopy(&uri, &matched));
        results[2].1.push(nbdcopy(&uri, &[]));
    }
    let _ = server.kill();
    let _ = server.wait();

    println!(
        "export {} MiB, {in_flight} requests in flight of {} KiB, {rounds} rounds (MiB/s: median [min–max])",
        size / MIB,
        request / 1024
    );
    for (name, mut times) in results {
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "{name:<38} {:>7.0} [{:.0}–{:.0}]",
            mibs(size, median),
            mibs(size, *times.last().unwrap()),
            mibs(size, times[0])
        );
    }
}
