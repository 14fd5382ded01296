//! `quiesce` end to end on the local cluster, against a scripted guest agent
//! at `<qmp dir>/<ns>/<vm>.qga.sock` (the discovery convention): no agent, a
//! hung agent, a freeze held while Cairn's agent is killed. Each failure
//! leaves the guest thawed and nothing behind (no bitmap, no file, nothing
//! in QEMU). The real guest (qemu-ga in a Linux VM) is in `guest.rs`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cairn_api::{
    APPLICATION_CONSISTENT_CONDITION, BackupPhase, CheckpointPhase, GUEST_FROZEN_CONDITION,
    VirtualMachineCheckpoint,
};
use cairn_e2e::fake_guest_agent::{FakeGuestAgent, FreezeBehaviour};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::local_cluster::LocalCluster;
use cairn_e2e::scenario::*;
use cairn_e2e::vm::TestVm;
use kube::Api;

fn qga_socket(cluster: &LocalCluster, node: &str, env: &TestEnv, vm: &str) -> std::path::PathBuf {
    cluster
        .qmp_dir(node)
        .join(&env.namespace)
        .join(format!("{vm}.qga.sock"))
}

fn ready_reason(conds: &[cairn_api::Condition]) -> (String, String) {
    condition(conds, "Ready")
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

fn is_status(conds: &[cairn_api::Condition], t: &str, status: &str) -> bool {
    condition(conds, t).is_some_and(|c| c.status == status)
}

fn assert_nothing_left(vm: &TestVm, disk: &str) -> Result<()> {
    let left = leftovers(vm)?;
    ensure!(left.is_empty(), "left behind in QEMU: {left:?}");
    let bitmaps = vm.bitmaps(disk)?;
    ensure!(bitmaps.is_empty(), "bitmaps left on {disk}: {bitmaps:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiesced_checkpoint_is_taken_between_freeze_and_thaw() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("qga-ok").await?;
    let _vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let qga = FakeGuestAgent::start(
        &qga_socket(cluster, "node-1", &env, "vm1"),
        FreezeBehaviour::Answer,
    )?;
    apply(&env, &checkpoint_yaml("cp", "vm1", "  quiesce: true\n"))?;
    let cp = wait_checkpoint(&env, "cp", CheckpointPhase::Ready).await?;
    let status = cp.status.context("status")?;
    ensure!(
        is_status(&status.conditions, APPLICATION_CONSISTENT_CONDITION, "True"),
        "{:?}",
        status.conditions
    );
    ensure!(is_status(
        &status.conditions,
        GUEST_FROZEN_CONDITION,
        "False"
    ));
    let q = status.quiesce.context("status.quiesce")?;
    ensure!(q.frozen_filesystems == 1, "{q:?}");
    let cmds = qga.commands();
    let freeze = cmds.iter().position(|c| c == "guest-fsfreeze-freeze");
    let thaw = cmds.iter().rposition(|c| c == "guest-fsfreeze-thaw");
    ensure!(
        freeze.is_some() && thaw > freeze,
        "no freeze then thaw: {cmds:?}"
    );
    ensure!(!qga.frozen(), "the guest was left frozen");

    // Without quiesce the checkpoint says it is only crash-consistent.
    apply(&env, &checkpoint_yaml("plain", "vm1", ""))?;
    let cp = wait_checkpoint(&env, "plain", CheckpointPhase::Ready).await?;
    let c = cp.status.context("status")?.conditions;
    let ac = condition(&c, APPLICATION_CONSISTENT_CONDITION).context("no ApplicationConsistent")?;
    ensure!(
        ac.status == "False" && ac.reason == "NotRequested",
        "{ac:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_without_guest_agent_fails_and_leaves_nothing() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("qga-none").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let dir = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");
    let extra = format!(
        "{}  quiesce: true\n",
        push_extra(&dir, None, Some("with-backup"))
    );
    apply(&env, &backup_yaml("b", "vm1", &extra))?;
    let b = wait_backup(&env, "b", BackupPhase::Failed).await?;
    let status = b.status.context("status")?;
    let (reason, message) = ready_reason(&status.conditions);
    ensure!(reason == "QuiesceUnavailable", "{reason}: {message}");
    ensure!(
        message.contains("vm1") && message.contains("guest agent"),
        "{message}"
    );
    ensure!(is_status(
        &status.conditions,
        GUEST_FROZEN_CONDITION,
        "False"
    ));
    assert_nothing_left(&vm, "disk0")?;
    let files = files_in(&dir);
    ensure!(files.is_empty(), "files left: {files:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_guest_agent_times_out_is_thawed_and_leaves_nothing() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("qga-hang").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let qga = FakeGuestAgent::start(
        &qga_socket(cluster, "node-1", &env, "vm1"),
        FreezeBehaviour::Hang,
    )?;
    apply(&env, &checkpoint_yaml("cp", "vm1", "  quiesce: true\n"))?;
    let cp = wait_checkpoint(&env, "cp", CheckpointPhase::Failed).await?;
    let status = cp.status.context("status")?;
    let (reason, message) = ready_reason(&status.conditions);
    ensure!(reason == "QuiesceTimeout", "{reason}: {message}");
    ensure!(message.contains("guest-fsfreeze-freeze"), "{message}");
    ensure!(is_status(
        &status.conditions,
        GUEST_FROZEN_CONDITION,
        "False"
    ));
    // The freeze may land late: a thaw followed it.
    let cmds = qga.commands();
    ensure!(
        cmds.last().map(String::as_str) == Some("guest-fsfreeze-thaw"),
        "no thaw after the hung freeze: {cmds:?}"
    );
    assert_nothing_left(&vm, "disk0")?;

    // A pull backup with quiesce fails the same way and exports nothing.
    apply(
        &env,
        &backup_yaml("pull", "vm1", "  mode: Pull\n  quiesce: true\n"),
    )?;
    let b = wait_backup(&env, "pull", BackupPhase::Failed).await?;
    let (reason, message) = ready_reason(&b.status.context("status")?.conditions);
    ensure!(reason == "QuiesceTimeout", "{reason}: {message}");
    assert_nothing_left(&vm, "disk0")?;
    let exports = std::fs::read_dir(cluster.export_dir("node-1").join(&env.namespace))
        .map(|d| d.count())
        .unwrap_or(0);
    ensure!(exports == 0, "{exports} export socket(s) left");
    Ok(())
}

/// The agent is killed while it holds the guest frozen (the scripted agent
/// delays its freeze answer): the restarted agent finds `GuestFrozen=True`,
/// thaws the guest, and the checkpoint then completes.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_while_the_guest_is_frozen_thaws_it_on_restart() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("qga-crash").await?;
    // node-2: killing its agent does not disturb the other tests of this file.
    let _vm = start_vm(
        cluster,
        &env,
        "node-2",
        "vm2",
        &[("disk0", "qcow2", 16 * MIB)],
    )?;
    wait_instance(&env, "vm2", "node-2").await?;
    let qga = FakeGuestAgent::start(
        &qga_socket(cluster, "node-2", &env, "vm2"),
        FreezeBehaviour::HoldFirst(Duration::from_secs(3)),
    )?;
    apply(&env, &checkpoint_yaml("cp", "vm2", "  quiesce: true\n"))?;
    qga.wait_for("guest-fsfreeze-freeze", 1, Duration::from_secs(60))?;
    ensure!(qga.frozen());
    let api: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let marked = api.get("cp").await?;
    ensure!(
        marked.status.as_ref().is_some_and(|s| is_status(
            &s.conditions,
            GUEST_FROZEN_CONDITION,
            "True"
        )),
        "the freeze was not recorded before it was sent: {:?}",
        marked.status
    );
    cluster.restart_agent("node-2")?;
    let cp = wait_checkpoint(&env, "cp", CheckpointPhase::Ready).await?;
    ensure!(!qga.frozen(), "the guest is still frozen");
    let status = cp.status.context("status")?;
    ensure!(is_status(
        &status.conditions,
        GUEST_FROZEN_CONDITION,
        "False"
    ));
    ensure!(is_status(
        &status.conditions,
        APPLICATION_CONSISTENT_CONDITION,
        "True"
    ));
    // Killed mid-freeze, then: thaw by the new agent, a second freeze for the retry.
    let cmds = qga.commands();
    let freezes = cmds
        .iter()
        .filter(|c| *c == "guest-fsfreeze-freeze")
        .count();
    ensure!(freezes == 2, "{cmds:?}");
    Ok(())
}
