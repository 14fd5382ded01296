//! The client against an export served by QEMU itself (`nbd-server-start` +
//! `block-export-add` with a bitmap), set up over a raw QMP exchange.

mod common;

use std::process::{Command, Stdio};

use cairn_nbd::{BASE_ALLOCATION, Client, ConnectOptions, qemu_dirty_bitmap_context};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_a_qemu_block_export_with_its_dirty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = make_image(dir.path());
    let expected = std::fs::read(&raw).unwrap();
    // A read-only export takes only disabled bitmaps (libvirt merges into a disabled one).
    run(
        "qemu-img",
        &["bitmap", "--disable", img.to_str().unwrap(), "b0"],
    );

    let qmp_sock = dir.path().join("qmp.sock");
    let nbd_sock = dir.path().join("nbd.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-machine",
            "none",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    let _qemu = KillOnDrop(child);
    wait_for_socket(&qmp_sock);

    let mut qmp = Qmp::connect(&qmp_sock).await;
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "qcow2",
            "node-name": "disk0",
            "read-only": true,
            "file": { "driver": "file", "filename": img.to_str().unwrap() }
        }),
    )
    .await;
    qmp.execute(
        "nbd-server-start",
        json!({ "addr": { "type": "unix", "data": { "path": nbd_sock.to_str().unwrap() } } }),
    )
    .await;
    qmp.execute(
        "block-export-add",
        json!({
            "type": "nbd", "id": "exp0", "node-name": "disk0", "name": "vda",
            "writable": false, "bitmaps": ["b0"]
        }),
    )
    .await;

    let opts = ConnectOptions::new("vda")
        .meta_context(BASE_ALLOCATION)
        .meta_context(qemu_dirty_bitmap_context("b0"));
    let client = Client::connect_unix(&nbd_sock, &opts).await.unwrap();
    assert_eq!(client.size(), 64 * MIB);
    assert!(client.info().read_only());

    let dirty = client
        .dirty_extents(&qemu_dirty_bitmap_context("b0"))
        .await
        .unwrap();
    let got: Vec<(u64, u64)> = dirty.iter().map(|e| (e.offset, e.length)).collect();
    assert_eq!(got, expected_dirty());

    // Read exactly the dirty extents, 16+ in flight, and compare with the image.
    let mut tasks = Vec::new();
    for e in &dirty {
        let mut off = e.offset;
        while off < e.end() {
            let len = (e.end() - off).min(64 * 1024);
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                (off, c.read(off, len as usize).await.unwrap())
            }));
            off += len;
        }
    }
    assert!(tasks.len() >= 16, "only {} reads", tasks.len());
    for t in tasks {
        let (off, data) = t.await.unwrap();
        assert!(
            data[..] == expected[off as usize..off as usize + data.len()],
            "dirty read at {off} differs"
        );
    }

    // And the whole export.
    let all = client.read(0, 64 * MIB as usize).await.unwrap();
    assert!(
        all == expected,
        "the whole-export read differs from qemu-img convert"
    );

    client.disconnect().await.unwrap();
    qmp.execute("block-export-del", json!({ "id": "exp0" }))
        .await;
    qmp.execute("nbd-server-stop", json!({})).await;
    qmp.execute("quit", json!({})).await;
}
