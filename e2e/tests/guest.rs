//! A real Linux guest under a running workload, backed up by Cairn: the guest
//! appends fsynced records to its ext4 data disk while a full push backup
//! runs; the backup must hold a clean filesystem with every record the guest
//! had written before the backup started (a consistent prefix), and a second
//! guest must boot on the restored disk and read it. Also: the guest agent
//! answers on `<namespace>/<vm>.qga.sock` next to the QMP socket.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cairn_api::BackupPhase;
use cairn_e2e::guest::{
    self, DATA_OK_MARKER, GuestImage, GuestMode, GuestOptions, GuestVm, make_data_disk,
};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::scenario::*;
use serde_json::json;

/// Boots of a TCG guest take 20-30 s on 2 busy cores; leave room.
const BOOT: Duration = Duration::from_secs(180);

/// Guest `vm1` of the test's namespace on `disk`, writing a record every
/// 50 ms (plus the time to write it under TCG).
fn writing_guest(
    qmp_root: &std::path::Path,
    env: &TestEnv,
    dir: &std::path::Path,
    disk: cairn_e2e::vm::VmDisk,
) -> Result<GuestVm> {
    GuestVm::start(
        qmp_root,
        &env.namespace,
        "vm1",
        dir,
        disk,
        GuestOptions {
            mode: GuestMode::Workload {
                interval: Duration::from_millis(50),
            },
            ..GuestOptions::default()
        },
    )
}

/// The data disk of the crash-consistency test.
const DISK: u64 = 512 * MIB;

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_of_a_writing_guest_holds_a_consistent_prefix_and_boots() -> Result<()> {
    let t0 = Instant::now();
    let image = GuestImage::ensure()?;
    eprintln!(
        "guest image {} ({:.1?}):\n{}",
        image.dir.display(),
        t0.elapsed(),
        image.versions
    );
    let (env, cluster) = TestEnv::with_cluster("guest").await?;
    let dir = cluster.state_dir.join("vms").join(&env.namespace);
    std::fs::create_dir_all(&dir)?;
    let qmp_root = cluster.qmp_dir("node-1");

    // The guest writes a record every 50 ms (plus the time to write it under TCG).
    // 384 MiB of data on the disk: the full backup job takes long enough to
    // be caught and slowed down (an almost empty disk copies in milliseconds).
    let seed = tempfile::tempdir()?;
    let status = std::process::Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=384", "status=none"])
        .arg(format!("of={}", seed.path().join("ballast").display()))
        .status()?;
    ensure!(status.success(), "dd failed");
    let disk = make_data_disk(
        "disk0",
        &dir.join("vm1-disk0.qcow2"),
        DISK,
        "qcow2",
        Some(seed.path()),
    )?;
    drop(seed);
    let vm = writing_guest(&qmp_root, &env, &dir, disk)?;
    let boot = vm.wait_ready(BOOT)?;
    eprintln!("guest vm1 booted in {boot:.1?} with accel={:?}", vm.accel);
    wait_instance(&env, "vm1", "node-1").await?;

    // The guest agent answers from the host on the socket the design names.
    ensure!(
        vm.qga_socket == qmp_root.join(&env.namespace).join("vm1.qga.sock"),
        "guest agent socket at {}",
        vm.qga_socket.display()
    );
    vm.agent()?.ping()?;

    // Some records first; every record up to `before` is fsynced before the backup starts.
    let before = vm.wait_records(20, Duration::from_secs(120))?;
    let backups = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");
    // The backup job is held at 64 KiB/s until the guest has written ten more
    // records, so its copy-before-write runs under real guest writes; then it
    // goes at full speed.
    let job = std::thread::scope(|s| {
        let throttle = s.spawn(|| throttle_next_job(&vm, 64 * 1024, Duration::from_secs(60)));
        let applied = apply(
            &env,
            &backup_yaml("full", "vm1", &push_extra(&backups, None, None)),
        );
        let job = throttle.join().expect("throttle thread");
        applied.and(job)
    })?;
    let after = vm.wait_records(before + 10, Duration::from_secs(120))?;
    let jobs = vm.qmp("query-jobs", json!({}))?;
    let state = jobs
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["id"] == job.as_str())
        .map(|j| j["status"].clone());
    ensure!(
        state.as_ref().and_then(|s| s.as_str()) == Some("running"),
        "backup job {job} is {state:?}, not running, after the guest wrote records {before}..={after}"
    );
    set_job_speed(&vm, &job, 0)?;
    let b = wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    let target = PathBuf::from(
        b.status
            .as_ref()
            .and_then(|s| s.disks.first())
            .and_then(|d| d.target.clone())
            .context("backup without a target file")?,
    );

    // The guest agent freezes and thaws /data; the workload waits meanwhile and goes on.
    {
        let mut qga = vm.agent()?;
        let frozen = qga.fsfreeze()?;
        let status = qga.fsfreeze_status();
        let thawed = qga.thaw()?;
        ensure!(
            frozen >= 1 && status? == "frozen" && thawed == frozen,
            "fsfreeze froze {frozen}, thawed {thawed}"
        );
        ensure!(qga.fsfreeze_status()? == "thawed", "still frozen");
    }
    vm.wait_records(after + 3, Duration::from_secs(60))?;

    // The backup on the host, without mounting: a clean filesystem and a consistent prefix.
    let check = guest::check_records(&target)?;
    eprintln!(
        "backup {}: journal replayed {}, fsck clean {}, {} records (guest had {before} before, {after} after), torn tail {:?}",
        target.display(),
        check.journal_replayed,
        check.fsck_clean,
        check.records.count,
        check.records.torn_tail
    );
    ensure!(
        check.fsck_clean,
        "e2fsck -fn found errors in the backup:\n{}",
        check.fsck_output
    );
    ensure!(
        check.records.is_consistent(),
        "records in the backup are not a consistent prefix: {:?}",
        check.records.errors
    );
    ensure!(
        check.records.count > before,
        "the backup has {} records, but the guest had fsynced records 0..={before} before it started",
        check.records.count
    );
    ensure!(
        check.records.count <= after + 1,
        "the backup has {} records, more than the guest had written ({after}) while it ran: not point-in-time",
        check.records.count
    );

    // The checker is not blind: one flipped byte in a record of a copy fails it.
    let copy = dir.join("corrupted.raw");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&target)
        .arg(&copy)
        .status()?;
    ensure!(status.success(), "qemu-img convert failed");
    let mut bytes = std::fs::read(&copy)?;
    let needle = guest::record_line(5);
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .context("record 5 not found in the raw backup")?;
    bytes[at + 3] ^= 0x01;
    std::fs::write(&copy, &bytes)?;
    drop(bytes);
    let corrupt = guest::check_records(&copy)?;
    ensure!(
        !corrupt.is_ok(),
        "a corrupted record went unnoticed: {:?}",
        corrupt.records
    );
    std::fs::remove_file(&copy)?;

    // Restore with the real restore path, then boot a guest on it that mounts and reads it.
    let restored = dir.join("restored.raw");
    restore(&backups, "full", &restored)?;
    let disk = cairn_e2e::vm::VmDisk {
        name: "disk0".into(),
        image: restored.clone(),
        format: "raw".into(),
        size: DISK,
    };
    // A QMP root no agent watches: this VM is the test's own.
    let private = dir.join("private-qmp");
    let mut check_vm = GuestVm::start(
        &private,
        &env.namespace,
        "check",
        &dir,
        disk,
        GuestOptions {
            mode: GuestMode::Check,
            ..GuestOptions::default()
        },
    )?;
    let line = check_vm.wait_console(DATA_OK_MARKER, BOOT)?;
    eprintln!("restored guest: {line}");
    let seen: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("records="))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no records= in {line:?}"))?;
    ensure!(
        seen == check.records.count,
        "the restored guest read {seen} records, the backup holds {}",
        check.records.count
    );
    check_vm.wait_ready(BOOT)?;
    check_vm.agent()?.ping()?;
    check_vm.quit()?;

    let mut vm = vm;
    vm.quit()?;
    eprintln!("guest test took {:.1?}", t0.elapsed());
    Ok(())
}

/// `quiesce: true` on a real guest: the backup point is taken with /data
/// frozen by qemu-ga, so the backup needs no journal replay and holds every
/// record the guest had fsynced before the backup was applied; the guest is
/// thawed afterwards and its workload goes on. A checkpoint with quiesce
/// records how long the guest was frozen.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiesced_backup_of_a_real_guest_is_application_consistent() -> Result<()> {
    GuestImage::ensure()?;
    let (env, cluster) = TestEnv::with_cluster("guest-quiesce").await?;
    let dir = cluster.state_dir.join("vms").join(&env.namespace);
    std::fs::create_dir_all(&dir)?;
    let qmp_root = cluster.qmp_dir("node-1");
    let disk = make_data_disk(
        "disk0",
        &dir.join("vm1-disk0.qcow2"),
        64 * MIB,
        "qcow2",
        None,
    )?;
    let vm = writing_guest(&qmp_root, &env, &dir, disk)?;
    vm.wait_ready(BOOT)?;
    wait_instance(&env, "vm1", "node-1").await?;
    vm.agent()?.ping()?;

    // A quiesced checkpoint first: freeze, bitmap, thaw.
    apply(&env, &checkpoint_yaml("cp", "vm1", "  quiesce: true\n"))?;
    let cp = wait_checkpoint(&env, "cp", cairn_api::CheckpointPhase::Ready).await?;
    let q = cp
        .status
        .as_ref()
        .and_then(|s| s.quiesce.clone())
        .context("no status.quiesce on a quiesced checkpoint")?;
    eprintln!(
        "quiesced checkpoint: {} filesystem(s) frozen for {} ms",
        q.frozen_filesystems, q.frozen_milliseconds
    );
    ensure!(q.frozen_filesystems >= 1, "{q:?}");
    ensure!(vm.agent()?.fsfreeze_status()? == "thawed", "left frozen");

    let before = vm.wait_records(10, Duration::from_secs(120))?;
    let backups = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");
    let extra = format!(
        "{}  quiesce: true\n",
        push_extra(&backups, Some("cp"), Some("cp2"))
    );
    apply(&env, &backup_yaml("quiesced", "vm1", &extra))?;
    let b = wait_backup(&env, "quiesced", BackupPhase::Succeeded).await?;
    let status = b.status.as_ref().context("status")?;
    let consistent = condition(
        &status.conditions,
        cairn_api::APPLICATION_CONSISTENT_CONDITION,
    )
    .context("no ApplicationConsistent condition")?;
    ensure!(
        consistent.status == "True" && consistent.reason == "Quiesced",
        "{consistent:?}"
    );
    ensure!(status.quiesce.is_some(), "{status:?}");
    ensure!(vm.agent()?.fsfreeze_status()? == "thawed", "left frozen");
    // The workload goes on after the thaw.
    let after = vm.last_record_seq()?.unwrap_or(0);
    vm.wait_records(after + 3, Duration::from_secs(60))?;

    // The incremental from `cp` stands alone (no full was written at `cp`):
    // the filesystem checks run on a full quiesced backup.
    let full_extra = format!("{}  quiesce: true\n", push_extra(&backups, None, None));
    apply(&env, &backup_yaml("full", "vm1", &full_extra))?;
    let full = wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    let target = PathBuf::from(
        full.status
            .as_ref()
            .and_then(|s| s.disks.first())
            .and_then(|d| d.target.clone())
            .context("backup without a target file")?,
    );
    let check = guest::check_records(&target)?;
    eprintln!(
        "quiesced backup: journal replayed {}, fsck clean {}, {} records (guest had {before} before)",
        check.journal_replayed, check.fsck_clean, check.records.count
    );
    ensure!(check.fsck_clean, "{}", check.fsck_output);
    ensure!(
        !check.journal_replayed,
        "a frozen filesystem was backed up with a journal to replay: not quiesced"
    );
    ensure!(
        check.records.is_consistent() && check.records.torn_tail.is_none(),
        "{:?}",
        check.records
    );
    ensure!(
        check.records.count > before,
        "{} records, but the guest had fsynced 0..={before} before the backup",
        check.records.count
    );

    // A hung guest agent: qemu-ga is stopped (SIGSTOP) for 25 s inside the
    // guest. The checkpoint fails `QuiesceTimeout` within the deadline, no
    // bitmap is made, and once qemu-ga runs again the guest is not frozen.
    let out = vm.agent()?.exec(
        "/bin/sh",
        &[
            "-c",
            "(sleep 1; kill -STOP $(pidof qemu-ga); sleep 25; kill -CONT $(pidof qemu-ga)) </dev/null >/dev/null 2>&1 &",
        ],
    )?;
    ensure!(out.exit_code == 0, "{out:?}");
    std::thread::sleep(Duration::from_secs(2));
    let hung_at = Instant::now();
    apply(
        &env,
        &checkpoint_yaml(
            "hung",
            "vm1",
            "  quiesce: true
",
        ),
    )?;
    let cp = wait_checkpoint(&env, "hung", cairn_api::CheckpointPhase::Failed).await?;
    let ready = cp
        .status
        .as_ref()
        .and_then(|s| condition(&s.conditions, "Ready"))
        .context("Ready")?
        .clone();
    ensure!(ready.reason == "QuiesceTimeout", "{ready:?}");
    ensure!(
        hung_at.elapsed() < Duration::from_secs(25),
        "the timeout took {:.1?}: no hard deadline",
        hung_at.elapsed()
    );
    ensure!(
        !vm.bitmaps("disk0")?.contains(&"hung".to_string()),
        "a bitmap was made without the freeze"
    );
    // qemu-ga resumes; the guest is thawed and writing.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match vm.agent().and_then(|mut a| a.fsfreeze_status()) {
            Ok(s) if s == "thawed" => break,
            Ok(s) => anyhow::bail!("guest is {s} after a hung quiesce"),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for qemu-ga to resume: {e:#}");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
    let last = vm.last_record_seq()?.unwrap_or(0);
    vm.wait_records(last + 3, Duration::from_secs(60))?;
    let mut vm = vm;
    vm.quit()?;
    Ok(())
}
