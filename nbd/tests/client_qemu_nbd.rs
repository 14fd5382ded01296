//! The client against a real `qemu-nbd` exporting a qcow2 with a persistent bitmap.

mod common;

use cairn_nbd::proto::state;
use cairn_nbd::{BASE_ALLOCATION, Client, ClientError, ConnectOptions, qemu_dirty_bitmap_context};
use common::*;
use rand::Rng;

fn options() -> ConnectOptions {
    ConnectOptions::new("disk")
        .meta_context(BASE_ALLOCATION)
        .meta_context(qemu_dirty_bitmap_context("b0"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_dirty_extents_holes_and_many_requests_from_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = make_image(dir.path());
    let expected = std::fs::read(&raw).unwrap();
    let sock = dir.path().join("nbd.sock");
    let _nbd = qemu_nbd(
        &sock,
        &[
            "--bitmap=b0",
            "-f",
            "qcow2",
            "-r",
            "-x",
            "disk",
            "-t",
            img.to_str().unwrap(),
        ],
    );

    let client = Client::connect_unix(&sock, &options()).await.unwrap();
    let info = client.info().clone();
    assert_eq!(info.size, 64 * MIB);
    assert!(info.read_only());
    assert!(info.structured_replies);
    assert_eq!(info.meta_contexts.len(), 2);

    // Dirty extents equal the regions written after the bitmap, rounded to granules.
    let dirty = client
        .dirty_extents(&qemu_dirty_bitmap_context("b0"))
        .await
        .unwrap();
    let got: Vec<(u64, u64)> = dirty.iter().map(|e| (e.offset, e.length)).collect();
    assert_eq!(got, expected_dirty());

    // base:allocation: unallocated regions are holes that read as zeroes.
    let alloc = client.extents(BASE_ALLOCATION).await.unwrap();
    assert_eq!(alloc.first().unwrap().offset, 0);
    assert_eq!(alloc.last().unwrap().end(), 64 * MIB);
    let at_50m = alloc
        .iter()
        .find(|e| e.offset <= 50 * MIB && e.end() > 50 * MIB)
        .unwrap();
    assert_eq!(
        at_50m.flags & (state::HOLE | state::ZERO),
        state::HOLE | state::ZERO
    );
    let at_0 = alloc.first().unwrap();
    assert_eq!(at_0.flags & state::ZERO, 0, "written data is not zero");
    // The zero write after the bitmap reads as zero too.
    let zero_write = alloc
        .iter()
        .find(|e| e.offset <= DIRTY_ZERO_WRITE.0 && e.end() > DIRTY_ZERO_WRITE.0)
        .unwrap();
    assert_ne!(zero_write.flags & state::ZERO, 0);

    // The whole export (split into 32 MiB requests) equals qemu-img convert's output.
    let all = client.read(0, 64 * MIB as usize).await.unwrap();
    assert!(
        all == expected,
        "the whole-export read differs from qemu-img convert"
    );
    // A read spanning data and a hole.
    let span = client.read(MIB - 4096, 8192).await.unwrap();
    assert_eq!(span, expected[(MIB - 4096) as usize..(MIB + 4096) as usize]);

    // 64 reads and 16 block status queries in flight at once, from clones.
    let mut rng = rand::rng();
    let mut reads = Vec::new();
    for _ in 0..64 {
        let len = rng.random_range(1..=256u64) * 4096;
        let off = rng.random_range(0..(64 * MIB - len) / 512) * 512;
        let c = client.clone();
        reads.push(tokio::spawn(async move {
            (off, c.read(off, len as usize).await)
        }));
    }
    let mut statuses = Vec::new();
    for i in 0..16u64 {
        let c = client.clone();
        statuses.push(tokio::spawn(async move {
            c.block_status(i * 4 * MIB, 4 * MIB as u32, false).await
        }));
    }
    for r in reads {
        let (off, data) = r.await.unwrap();
        let data = data.unwrap();
        assert!(
            data[..] == expected[off as usize..off as usize + data.len()],
            "concurrent read at {off} differs"
        );
    }
    for s in statuses {
        let s = s.await.unwrap().unwrap();
        assert_eq!(s.contexts.len(), 2);
    }

    // Bad requests fail alone; the connection stays usable.
    let err = client.read(64 * MIB - 512, 1024).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidRequest(_)), "{err}");
    // qemu-nbd answers EINVAL ("Export is read-only") where the spec suggests EPERM.
    let err = client.write(0, vec![1; 512]).await.unwrap_err();
    assert!(matches!(err, ClientError::Request { .. }), "{err}");
    assert_eq!(client.read(0, 512).await.unwrap(), expected[..512]);

    client.disconnect().await.unwrap();
    let err = client.read(0, 512).await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_unknown_bitmaps_and_exports_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let sock = dir.path().join("nbd.sock");
    // -e 4: several clients at once (qemu-nbd serves one by default).
    let _nbd = qemu_nbd(
        &sock,
        &[
            "--bitmap=b0",
            "-f",
            "qcow2",
            "-r",
            "-x",
            "disk",
            "-t",
            "-e",
            "4",
            img.to_str().unwrap(),
        ],
    );

    let opts = ConnectOptions::new("disk").meta_context(qemu_dirty_bitmap_context("nope"));
    let err = Client::connect_unix(&sock, &opts).await.unwrap_err();
    assert!(
        matches!(err, ClientError::MetaContextUnavailable(ref c) if c == "qemu:dirty-bitmap:nope"),
        "{err}"
    );
    assert!(err.to_string().contains("qemu:dirty-bitmap:nope"));

    let err = Client::connect_unix(&sock, &ConnectOptions::new("other"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::UnknownExport { .. }), "{err}");

    // Without meta contexts, block status is refused locally with a clear message.
    let client = Client::connect_unix(&sock, &ConnectOptions::new("disk"))
        .await
        .unwrap();
    let err = client.extents(BASE_ALLOCATION).await.unwrap_err();
    assert!(matches!(err, ClientError::ContextNotNegotiated(_)), "{err}");
    let err = client.block_status(0, 4096, false).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidRequest(_)), "{err}");

    // Without structured replies, reads still work (simple replies).
    let mut simple = ConnectOptions::new("disk");
    simple.structured_replies = false;
    let client = Client::connect_unix(&sock, &simple).await.unwrap();
    assert!(!client.info().structured_replies);
    let data = client.read(4 * MIB, 65536).await.unwrap();
    assert!(data.iter().all(|b| *b == 0x33));
}
