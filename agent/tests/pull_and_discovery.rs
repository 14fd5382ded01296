//! Pull exports over NBD and socket discovery, against a real QEMU.

mod common;

use std::process::Command;
use std::time::Duration;

use cairn_agent::backup::{PullRequest, start_pull_export, stop_pull_export};
use cairn_agent::checkpoint::{CheckpointRequest, create_checkpoint};
use cairn_agent::discovery::{Discovery, DiscoveryEvent, DiscoveryOptions};
use cairn_agent::identity::OperationId;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_export_is_point_in_time_with_dirty_bitmap() {
    let size = 16 * MIB;
    let vm = TestVm::start("pull", &[("disk0", "qcow2", size)]).await;
    let mut model = DiskModel::new(size);
    vm.write("disk0", 0x10, 0, 2 * MIB).await;
    model.write(0x10, 0, 2 * MIB);
    create_checkpoint(
        &vm.client,
        &vm.vm,
        &CheckpointRequest {
            name: "base".into(),
            disks: None,
        },
    )
    .await
    .unwrap();
    vm.write("disk0", 0x20, 8 * MIB, MIB).await;
    model.write(0x20, 8 * MIB, MIB);

    let policy = pull_policy(vm.path());
    let root = policy.scratch_dir.join("default");
    let req = PullRequest {
        operation: OperationId::new("pull-uid"),
        name: "pull".into(),
        disks: None,
        incremental: Some("base".into()),
        new_checkpoint: Some("next".into()),
        socket: None,
        fallback_to_full: false,
        quiesce: None,
        tcp: None,
    };
    let export = start_pull_export(&vm.client, &vm.vm, &policy, &req)
        .await
        .unwrap();
    assert_eq!(export.disks.len(), 1);
    // Default socket: <export dir>/<namespace>/<backup>.sock, mode 0660, dir 0750.
    let sock = policy.export_dir.join("default/pull.sock");
    assert_eq!(export.socket, sock);
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let m = std::fs::symlink_metadata(&sock).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        let d = std::fs::metadata(policy.export_dir.join("default")).unwrap();
        assert_eq!(d.permissions().mode() & 0o777, 0o750);
    }
    let d = &export.disks[0];
    let ctx = d.bitmap_context.clone().unwrap();
    // Guest writes after the export started are not visible in it.
    vm.write("disk0", 0x30, 0, MIB).await;

    let raw = vm.path().join("pulled.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&d.url)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(read_raw(&raw) == model.bytes, "export is not point-in-time");

    let out = Command::new("nbdinfo")
        .arg(format!("--map={ctx}"))
        .arg(&d.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map = String::from_utf8_lossy(&out.stdout);
    // Exactly the 1 MiB at 8 MiB written since "base" is dirty.
    let dirty: Vec<(u64, u64)> = map
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect();
    assert_eq!(dirty, vec![(8 * MIB, MIB)], "map:\n{map}");
    assert!(
        bitmaps_on(&vm.client, "disk0-fmt")
            .await
            .contains(&"next".to_string())
    );

    stop_pull_export(&vm.client, &req.operation, &policy, &vm.vm, None, "pull")
        .await
        .unwrap();
    assert_no_leftovers(&vm.client).await;
    assert!(!sock.exists(), "socket left after teardown");
    // The device is back on its own disk, and guest writes reach it.
    vm.write("disk0", 0x40, 0, MIB).await;
    assert!(files_in(&root).is_empty(), "{:?}", files_in(&root));
    let gone = Command::new("nbdinfo").arg(&d.url).output().unwrap();
    assert!(
        !gone.status.success(),
        "export still reachable after teardown"
    );
    // Teardown is idempotent.
    stop_pull_export(&vm.client, &req.operation, &policy, &vm.vm, None, "pull")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_sockets() {
    let mut vm = TestVm::start("found", &[("vda", "qcow2", 8 * MIB)]).await;
    vm.release_client(); // QEMU serves one QMP client per socket
    let disc = Discovery::start(DiscoveryOptions {
        root: vm.root.clone(),
        rescan_interval: Duration::from_millis(500),
        qmp: fast_options(),
    })
    .unwrap();
    let mut events = disc.subscribe();
    let mut changes = disc.subscribe_changes();
    let vms = disc.vms();
    assert_eq!(vms.len(), 1);
    assert_eq!(
        (vms[0].namespace.as_str(), vms[0].name.as_str()),
        ("default", "found")
    );
    let inv = disc.inventory("default", "found").await.unwrap();
    assert_eq!(inv.disks[0].name, "vda");
    assert_eq!(inv.qemu_version.split('.').count(), 3);

    // Changes: queries announce nothing; a bitmap added through the session
    // (QEMU sends no event for it) is announced.
    tokio::time::sleep(Duration::from_millis(200)).await;
    changes = changes.resubscribe(); // forget the connection's announcement
    disc.inventory("default", "found").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), changes.recv())
            .await
            .is_err(),
        "a query announced a change"
    );
    let (_, client) = disc.session("default", "found").unwrap();
    client
        .add_bitmap(&cairn_agent::qmp::BitmapSpec {
            node: inv.disks[0].node_name.clone(),
            name: "seen".into(),
            persistent: false,
            disabled: false,
        })
        .await
        .unwrap();
    let changed = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .expect("the bitmap change is announced")
        .unwrap();
    assert_eq!(
        (changed.namespace.as_str(), changed.name.as_str()),
        ("default", "found")
    );

    // Idle means idle: the scans themselves (directory reads) must not
    // trigger more scans; only the periodic one (every 500 ms here) runs.
    let before = disc.rescans();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let scans = disc.rescans() - before;
    assert!(scans <= 5, "{scans} rescans in 2 s of an idle directory");

    // A second VM in another namespace appears by its socket.
    std::fs::create_dir_all(vm.root.join("team-b")).unwrap();
    let other = std::os::unix::net::UnixListener::bind(vm.root.join("team-b/other.sock")).unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, DiscoveryEvent::Appeared(ref v) if v.namespace == "team-b" && v.name == "other"),
        "{ev:?}"
    );
    drop(other);
    std::fs::remove_file(vm.root.join("team-b/other.sock")).unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, DiscoveryEvent::Disappeared(ref v) if v.name == "other"),
        "{ev:?}"
    );
    assert!(disc.inventory("team-b", "other").await.is_err());
}
