//! VirtualMachineBackupSchedules end to end: real control plane, operator,
//! agent and QEMU. Runs are stepped with `suspend` on a 6-field (seconds)
//! schedule: the test writes to the disk only while the schedule is
//! suspended and idle, so every run of one window saw the same bytes.
//!
//! What is checked: chains with `fullEvery`, retention deleting exactly the
//! expected backups *and their files*, every kept backup restoring
//! byte-identical, the VM's bitmaps bounded to the next base, a run of a
//! stopped VM reported (`LastRunFailed`) and the next one recovering, Forbid
//! holding a run back while a slow one runs, one catch-up run (not a burst)
//! after the operator was killed across scheduled times, retention deleting
//! repository snapshots, and a tenant's schedule reaching nothing outside its
//! namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use cairn_api::{
    BackupPhase, CHAIN_INDEX_ANNOTATION, QemuInstance, SCHEDULE_LABEL, SCHEDULED_TIME_ANNOTATION,
    VirtualMachineBackup, VirtualMachineBackupSchedule, VirtualMachineCheckpoint,
};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::local_cluster::LocalCluster;
use cairn_e2e::scenario::*;
use cairn_e2e::wait;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const SIZE: u64 = 16 * MIB;

/// Tests share the cluster; the one that kills the operator runs alone.
static CLUSTER_USE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn schedule_yaml(name: &str, who: &str, dir: &Path, extra: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackupSchedule\nmetadata:\n  name: {name}\nspec:\n  {who}\n  schedule: \"* * * * * *\"\n  suspend: true\n  template:\n    target:\n      directory:\n        path: {}\n{extra}",
        dir.display()
    )
}

/// Schedule `s` of `vm1` into `<node-1 root>/<namespace>/sched`, suspended,
/// with more spec lines `extra`.
fn schedule_vm1<'a>(
    env: &'a TestEnv,
    cluster: &LocalCluster,
    extra: &str,
) -> Result<(PathBuf, Sched<'a>)> {
    let dir = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("sched");
    apply(env, &schedule_yaml("s", "virtualMachine: vm1", &dir, extra))?;
    Ok((dir, Sched::new(env, "s")))
}

struct Sched<'a> {
    env: &'a TestEnv,
    name: String,
    schedules: Api<VirtualMachineBackupSchedule>,
    backups: Api<VirtualMachineBackup>,
}

impl<'a> Sched<'a> {
    fn new(env: &'a TestEnv, name: &str) -> Self {
        Self {
            env,
            name: name.into(),
            schedules: Api::namespaced(env.client.clone(), &env.namespace),
            backups: Api::namespaced(env.client.clone(), &env.namespace),
        }
    }

    async fn suspend(&self, on: bool) -> Result<()> {
        self.schedules
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"suspend": on}})),
            )
            .await?;
        Ok(())
    }

    /// The schedule's backups, oldest first.
    async fn runs(&self) -> Result<Vec<VirtualMachineBackup>> {
        let mut v: Vec<VirtualMachineBackup> = self
            .backups
            .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={}", self.name)))
            .await?
            .items
            .into_iter()
            .filter(|b| b.metadata.deletion_timestamp.is_none())
            .collect();
        v.sort_by_key(|b| b.annotations().get(SCHEDULED_TIME_ANNOTATION).cloned());
        Ok(v)
    }

    /// One window: resume until a new run exists, suspend, wait until every
    /// run finished. Returns the runs started in the window.
    async fn window(&self) -> Result<Vec<VirtualMachineBackup>> {
        let before: BTreeSet<String> = self.runs().await?.iter().map(|b| b.name_any()).collect();
        self.suspend(false).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .runs()
                .await?
                .iter()
                .any(|b| !before.contains(&b.name_any()))
            {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "no run started in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.suspend(true).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let runs = self.runs().await?;
            if runs.iter().all(|b| {
                b.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(BackupPhase::is_finished)
            }) {
                return Ok(runs
                    .into_iter()
                    .filter(|b| !before.contains(&b.name_any()))
                    .collect());
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "runs did not finish in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn condition(&self, t: &str) -> Result<Option<(String, String)>> {
        let s = self.schedules.get(&self.name).await?;
        Ok(s.status.and_then(|st| {
            condition(&st.conditions, t).map(|c| (c.status.clone(), c.reason.clone()))
        }))
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        kubectl(self.env, args)
    }
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what} (last error: {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn phase(b: &VirtualMachineBackup) -> Option<BackupPhase> {
    b.status.as_ref().and_then(|s| s.phase)
}

fn index(b: &VirtualMachineBackup) -> u32 {
    b.annotations()[CHAIN_INDEX_ANNOTATION]
        .parse()
        .unwrap_or(99)
}

async fn schedule_checkpoints(env: &TestEnv, schedule: &str) -> Result<Vec<String>> {
    let api: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let mut v: Vec<String> = api
        .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={schedule}")))
        .await?
        .items
        .into_iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| c.name_any())
        .collect();
    v.sort();
    Ok(v)
}

/// Files of backup `name` in `dir` (`<name>.<uid>.*`).
fn files_of(dir: &Path, name: &str) -> Vec<String> {
    files_in(dir)
        .into_iter()
        .filter(|f| f.starts_with(&format!("{name}.")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_chains_are_pruned_with_their_files_and_kept_backups_restore() -> Result<()> {
    let _use = CLUSTER_USE.read().await;
    let (env, cluster) = TestEnv::with_cluster("sched-chain").await?;
    let vm = start_vm1(cluster, &env, SIZE).await?;
    let (dir, s) = schedule_vm1(
        &env,
        cluster,
        "  fullEvery: 2\n  retention:\n    keepLast: 2\n",
    )?;

    // Six windows; what the disk held in each.
    let mut model = DiskModel::new(SIZE);
    let mut content: BTreeMap<String, String> = BTreeMap::new();
    let mut all: Vec<VirtualMachineBackup> = Vec::new();
    for k in 0..6u64 {
        model.write(&vm, "disk0", 0x10 + k as u8, k * MIB, MIB)?;
        let made = s.window().await?;
        for b in &made {
            ensure!(
                phase(b) == Some(BackupPhase::Succeeded),
                "run {} of window {k}: {:?}",
                b.name_any(),
                b.status
            );
            content.insert(b.name_any(), model.sha256());
        }
        all.extend(made);
    }
    all.sort_by_key(|b| b.annotations()[SCHEDULED_TIME_ANNOTATION].clone());

    // Chains of three: a full backup, then incrementals each from the run before.
    for (i, b) in all.iter().enumerate() {
        ensure!(
            index(b) == (i % 3) as u32,
            "{}: chain index {}",
            b.name_any(),
            index(b)
        );
        let want = (i % 3 != 0).then(|| all[i - 1].name_any());
        ensure!(
            b.spec.incremental == want,
            "{}: base {:?}, want {want:?}",
            b.name_any(),
            b.spec.incremental
        );
    }

    // keepLast 2, and the chain the older of those needs.
    let n = all.len();
    let mut keep: BTreeSet<String> = [n - 1, n - 2].iter().map(|&i| all[i].name_any()).collect();
    let mut i = n - 2;
    while index(&all[i]) > 0 {
        i -= 1;
        keep.insert(all[i].name_any());
    }
    let gone: Vec<String> = all
        .iter()
        .map(|b| b.name_any())
        .filter(|n| !keep.contains(n))
        .collect();
    ensure!(!gone.is_empty(), "nothing to prune: {keep:?}");
    eventually(60, &format!("retention keeping {keep:?}"), || async {
        let now: BTreeSet<String> = s.runs().await?.iter().map(|b| b.name_any()).collect();
        Ok((now == keep).then_some(()))
    })
    .await?;
    // The pruned backups' files are gone; the kept ones' are all there.
    wait::condition(Duration::from_secs(60), "pruned files removed", || {
        gone.iter().all(|g| files_of(&dir, g).is_empty())
    })
    .await
    .with_context(|| format!("files left: {:?}", files_in(&dir)))?;
    for k in &keep {
        let files = files_of(&dir, k);
        ensure!(
            files.iter().any(|f| f.ends_with(".manifest.json"))
                && files.iter().any(|f| f.ends_with(".qcow2")),
            "kept {k} lost files: {files:?}"
        );
    }

    // Every kept backup restores to exactly what the disk held at its run.
    let out = tempfile::tempdir()?;
    for k in &keep {
        let got = restore(&dir, k, &out.path().join(format!("{k}.raw")))?;
        ensure!(
            got == content[k],
            "{k} restored differs from the disk at its run"
        );
    }

    // Bitmaps: only the newest run's checkpoint is left (the next base).
    let newest = all[n - 1].name_any();
    eventually(60, "checkpoints pruned", || async {
        Ok((schedule_checkpoints(&env, "s").await? == [newest.clone()]).then_some(()))
    })
    .await?;
    wait::condition(Duration::from_secs(60), "bitmaps bounded", || {
        vm.bitmaps("disk0").is_ok_and(|b| b == [newest.clone()])
    })
    .await
    .with_context(|| format!("bitmaps {:?}", vm.bitmaps("disk0")))?;

    let st = s.schedules.get("s").await?.status.context("status")?;
    ensure!(st.kept_backups.first() == Some(&newest), "{st:?}");
    ensure!(st.active.is_empty(), "{st:?}");
    let _ = s.kubectl(&["delete", "vmbsched", "s", "--cascade=orphan"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_run_is_reported_and_the_next_recovers() -> Result<()> {
    let _use = CLUSTER_USE.read().await;
    let (env, cluster) = TestEnv::with_cluster("sched-fail").await?;
    let mut vm = start_vm1(cluster, &env, SIZE).await?;
    let (dir, s) = schedule_vm1(&env, cluster, "  fullEvery: 4\n")?;
    let mut model = DiskModel::new(SIZE);
    model.write(&vm, "disk0", 0x31, 0, MIB)?;
    let first = s.window().await?;
    ensure!(
        first
            .iter()
            .all(|b| phase(b) == Some(BackupPhase::Succeeded)),
        "{first:?}"
    );

    // The VM stops and its image goes missing (a stopped VM alone is backed
    // up offline): the next run fails, and the schedule says why.
    vm.quit()?;
    let api: Api<QemuInstance> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, "vm1", T, "QemuInstance stopped", |qi| {
        qi.status.as_ref().and_then(|s| s.run_state.as_deref()) == Some("stopped")
    })
    .await?;
    let image = vm.disks[0].image.clone();
    let moved = image.with_extension("moved");
    std::fs::rename(&image, &moved)?;
    let failed = s.window().await?;
    ensure!(
        failed.iter().all(|b| phase(b) == Some(BackupPhase::Failed)),
        "{failed:?}"
    );
    let lrf = eventually(30, "LastRunFailed", || async {
        Ok(s.condition("LastRunFailed")
            .await?
            .filter(|c| c.0 == "True"))
    })
    .await?;
    ensure!(lrf.1 == "OfflineOpenFailed", "{lrf:?}");

    // It runs again: the next run builds on the last success and restores exactly.
    std::fs::rename(&moved, &image)?;
    vm.launch()?;
    wait::until(&api, "vm1", T, "QemuInstance running", |qi| {
        qi.status.as_ref().and_then(|s| s.run_state.as_deref()) == Some("running")
    })
    .await?;
    model.write(&vm, "disk0", 0x32, 2 * MIB, MIB)?;
    let next = s.window().await?;
    let b = next.last().context("no run")?;
    ensure!(phase(b) == Some(BackupPhase::Succeeded), "{:?}", b.status);
    ensure!(
        b.spec.incremental.as_deref() == Some(first[0].name_any().as_str()),
        "not incremental from the last success: {:?}",
        b.spec.incremental
    );
    eventually(30, "LastRunFailed cleared", || async {
        Ok(s.condition("LastRunFailed")
            .await?
            .filter(|c| c.0 == "False"))
    })
    .await?;
    let out = tempfile::tempdir()?;
    let got = restore(&dir, &b.name_any(), &out.path().join("r.raw"))?;
    ensure!(
        got == model.sha256(),
        "the recovered run does not restore the disk"
    );
    // The failed run is pruned (a success is newer).
    eventually(60, "failed run pruned", || async {
        let r = s.runs().await?;
        Ok((!r.iter().any(|x| phase(x) == Some(BackupPhase::Failed))).then_some(()))
    })
    .await?;
    let _ = s.kubectl(&["delete", "vmbsched", "s", "--cascade=orphan"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_schedule_reaches_nothing_outside_its_namespace() -> Result<()> {
    let _use = CLUSTER_USE.read().await;
    let (tenant, cluster) = TestEnv::with_cluster("sched-tenant").await?;
    let (victim, _) = TestEnv::with_cluster("sched-victim").await?;
    let _mine = start_vm(
        cluster,
        &tenant,
        "node-1",
        "mine",
        &[("disk0", "qcow2", SIZE)],
    )?;
    wait_instance(&tenant, "mine", "node-1").await?;
    let theirs = start_vm(
        cluster,
        &victim,
        "node-1",
        "theirs",
        &[("disk0", "qcow2", SIZE)],
    )?;
    wait_instance(&victim, "theirs", "node-1").await?;
    let kubeconfig = tenant.tenant_kubeconfig("tenant")?;
    let dir = cluster
        .backup_dir("node-1")
        .join(&tenant.namespace)
        .join("sched");
    let as_tenant = |yaml: &str| -> Result<(bool, String)> {
        let mut c = tenant.kubectl_as(&kubeconfig, &["apply", "-f", "-"]);
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };

    // The other namespace's VM by name: not found here.
    let (ok, err) = as_tenant(&schedule_yaml("byname", "virtualMachine: theirs", &dir, ""))?;
    ensure!(ok, "{err}");
    // Every VM there is: only this namespace's.
    let (ok, err) = as_tenant(&schedule_yaml(
        "all",
        "selector: {}",
        &dir,
        "  fullEvery: 1\n",
    ))?;
    ensure!(ok, "{err}");
    let byname = Sched::new(&tenant, "byname");
    eventually(30, "byname not Ready", || async {
        Ok(byname
            .condition("Ready")
            .await?
            .filter(|c| c.0 == "False" && c.1 == "VirtualMachineNotFound"))
    })
    .await?;
    byname.suspend(false).await?;
    let all = Sched::new(&tenant, "all");
    let made = all.window().await?;
    ensure!(
        !made.is_empty() && made.iter().all(|b| b.spec.virtual_machine == "mine"),
        "{:?}",
        made.iter()
            .map(|b| (b.name_any(), b.spec.virtual_machine.clone()))
            .collect::<Vec<_>>()
    );
    ensure!(
        made.iter()
            .all(|b| phase(b) == Some(BackupPhase::Succeeded)),
        "{made:?}"
    );
    ensure!(
        byname.runs().await?.is_empty(),
        "a run for another namespace's VM"
    );
    // Nothing appeared in the victim's namespace, and its VM has no bitmap.
    let vb: Api<VirtualMachineBackup> = Api::namespaced(victim.client.clone(), &victim.namespace);
    let vc: Api<VirtualMachineCheckpoint> =
        Api::namespaced(victim.client.clone(), &victim.namespace);
    ensure!(vb.list(&Default::default()).await?.items.is_empty());
    ensure!(vc.list(&Default::default()).await?.items.is_empty());
    ensure!(
        theirs.bitmaps("disk0")?.is_empty(),
        "{:?}",
        theirs.bitmaps("disk0")
    );

    // The label that ties objects to a schedule is Cairn's alone.
    let forged = format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineCheckpoint\nmetadata:\n  name: forged\n  labels:\n    {SCHEDULE_LABEL}: all\nspec:\n  virtualMachine: mine\n"
    );
    let (ok, err) = as_tenant(&forged)?;
    ensure!(
        !ok && err.contains("cairn.dev/"),
        "a tenant wrote {SCHEDULE_LABEL}: {err}"
    );
    byname.suspend(true).await?;
    let _ = tenant
        .kubectl(&["delete", "vmbsched", "all", "byname"])
        .output();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn forbid_holds_the_next_run_while_a_slow_one_runs() -> Result<()> {
    let _use = CLUSTER_USE.read().await;
    let (env, cluster) = TestEnv::with_cluster("sched-forbid").await?;
    let size = 128 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x41, 0, size)?;
    let (dir, s) = schedule_vm1(&env, cluster, "  fullEvery: 4\n")?;

    // A run's job is slowed down to 1 MiB/s (two minutes for the disk).
    let job = std::thread::scope(|scope| {
        let t = scope.spawn(|| throttle_next_job(&vm, MIB, Duration::from_secs(60)));
        let resumed = s.kubectl(&[
            "patch",
            "vmbsched",
            "s",
            "--type=merge",
            "-p",
            r#"{"spec":{"suspend":false}}"#,
        ]);
        let job = t.join().expect("throttle thread");
        resumed?;
        job
    })?;
    // The slow run: still Running two seconds after it was seen Running.
    let slow = eventually(60, "the slow run", || async {
        let running: Vec<String> = s
            .runs()
            .await?
            .iter()
            .filter(|b| phase(b) == Some(BackupPhase::Running))
            .map(|b| b.name_any())
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let still: Vec<String> = s
            .runs()
            .await?
            .iter()
            .filter(|b| phase(b) == Some(BackupPhase::Running))
            .map(|b| b.name_any())
            .collect();
        Ok(running.into_iter().find(|r| still.contains(r)))
    })
    .await?;
    // Several scheduled seconds pass: no run starts while it runs.
    let before = s.runs().await?;
    let handled = s
        .schedules
        .get("s")
        .await?
        .status
        .unwrap_or_default()
        .last_schedule_time;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = s.runs().await?;
    let names = |r: &[VirtualMachineBackup]| r.iter().map(|b| b.name_any()).collect::<Vec<_>>();
    ensure!(
        names(&after) == names(&before) && after.last().map(|b| b.name_any()) == Some(slow.clone()),
        "Forbid let a run start while {slow} ran: {:?} -> {:?}",
        names(&before),
        names(&after)
    );
    let st = s.schedules.get("s").await?.status.unwrap_or_default();
    ensure!(st.active == [slow.clone()], "{st:?}");
    ensure!(
        st.last_schedule_time == handled,
        "the held-back time was recorded as handled"
    );

    // Released, it finishes, and the held-back run starts then, incremental from it.
    set_job_speed(&vm, &job, 0)?;
    let next = eventually(60, "the held-back run", || async {
        Ok(s.runs()
            .await?
            .into_iter()
            .find(|b| !names(&after).contains(&b.name_any())))
    })
    .await?;
    s.suspend(true).await?;
    ensure!(
        next.spec.incremental.as_deref() == Some(slow.as_str()),
        "{:?}",
        next.spec.incremental
    );
    wait_backup(&env, &slow, BackupPhase::Succeeded).await?;
    let out = tempfile::tempdir()?;
    ensure!(restore(&dir, &slow, &out.path().join("f.raw"))? == model.sha256());
    let _ = s.kubectl(&["delete", "vmbsched", "s", "--cascade=orphan"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_across_scheduled_times_makes_one_catch_up_run() -> Result<()> {
    let _alone = CLUSTER_USE.write().await;
    let (env, cluster) = TestEnv::with_cluster("sched-kill").await?;
    let _vm = start_vm1(cluster, &env, SIZE).await?;
    let (_, s) = schedule_vm1(&env, cluster, "  fullEvery: 99\n")?;
    s.kubectl(&[
        "patch",
        "vmbsched",
        "s",
        "--type=merge",
        "-p",
        r#"{"spec":{"schedule":"*/3 * * * * *","suspend":false}}"#,
    ])?;
    eventually(60, "a first run", || async {
        Ok(s.runs()
            .await?
            .into_iter()
            .find(|b| phase(b) == Some(BackupPhase::Succeeded)))
    })
    .await?;

    cluster.stop_process("operator-0")?;
    let killed = k8s_openapi::jiff::Timestamp::now().as_second();
    let before: BTreeSet<String> = s.runs().await?.iter().map(|b| b.name_any()).collect();
    // Several scheduled times pass with no operator (and the lease expires).
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.start_operator("operator-0")?;
    let catch_up = eventually(90, "the catch-up run", || async {
        let mut new: Vec<VirtualMachineBackup> = s
            .runs()
            .await?
            .into_iter()
            .filter(|b| !before.contains(&b.name_any()))
            .collect();
        new.sort_by_key(|b| b.annotations()[SCHEDULED_TIME_ANNOTATION].clone());
        Ok(new.into_iter().next())
    })
    .await?;
    s.suspend(true).await?;
    let time = |b: &VirtualMachineBackup| {
        b.annotations()[SCHEDULED_TIME_ANNOTATION]
            .parse::<k8s_openapi::jiff::Timestamp>()
            .map(|t| t.as_second())
            .unwrap_or_default()
    };
    let t = time(&catch_up);
    let created = catch_up
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|c| c.0.as_second())
        .unwrap_or_default();
    // One run for the missed times, for the newest of them: created before
    // the scheduled time after it (a burst would start with the oldest).
    ensure!(t > killed, "catch-up for {t}, killed at {killed}");
    ensure!(
        created <= t + 3,
        "the first run after the restart is for {t} but was created at {created}: not the newest missed time"
    );
    let missed: Vec<i64> = s
        .runs()
        .await?
        .iter()
        .map(time)
        .filter(|x| *x > killed && *x <= t)
        .collect();
    ensure!(missed == [t], "runs for the missed times: {missed:?}");
    let _ = s.kubectl(&["delete", "vmbsched", "s", "--cascade=orphan"]);
    Ok(())
}

/// Restores `snapshot`'s disk0 from the (unencrypted) `local-dir` repository
/// with the CLI; the SHA-256 of the raw image, or the CLI's complaint.
fn restore_snapshot(cluster: &LocalCluster, snapshot: &str) -> Result<Result<String, String>> {
    let out = tempfile::tempdir()?;
    let o = std::process::Command::new(cairn_e2e::local_cluster::binary("cairn-agent"))
        .args(["restore", "--repository"])
        .arg(format!("dir://{}", cluster.repository_dir().display()))
        .args([
            "--snapshot",
            snapshot,
            "--format",
            "raw",
            "--disk",
            "disk0",
            "--output",
        ])
        .arg(out.path())
        .output()?;
    if !o.status.success() {
        return Ok(Err(String::from_utf8_lossy(&o.stderr).into_owned()));
    }
    let bytes = std::fs::read(out.path().join("disk0.raw"))?;
    Ok(Ok(hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes))))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_into_a_repository_prunes_snapshots() -> Result<()> {
    let _use = CLUSTER_USE.read().await;
    let (env, cluster) = TestEnv::with_cluster("sched-repo").await?;
    let vm = start_vm1(cluster, &env, SIZE).await?;
    let yaml = "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackupSchedule\nmetadata:\n  name: s\nspec:\n  virtualMachine: vm1\n  schedule: \"* * * * * *\"\n  suspend: true\n  template:\n    target:\n      repository:\n        name: local-dir\n  retention:\n    keepLast: 1\n";
    apply(&env, yaml)?;
    let s = Sched::new(&env, "s");
    let mut model = DiskModel::new(SIZE);
    let mut snapshots: Vec<(String, String, String)> = Vec::new();
    for k in 0..3u64 {
        model.write(&vm, "disk0", 0x51 + k as u8, k * MIB, MIB)?;
        for b in s.window().await? {
            ensure!(phase(&b) == Some(BackupPhase::Succeeded), "{:?}", b.status);
            let snap = b
                .status
                .as_ref()
                .and_then(|st| st.repository.as_ref())
                .and_then(|r| r.snapshot.clone())
                .context("no snapshot")?;
            snapshots.push((b.name_any(), snap, model.sha256()));
        }
    }
    // Every run after the first is incremental (repository chains never restart by default).
    let runs_now = s.runs().await?;
    let (newest, newest_snap, newest_sha) = snapshots.last().cloned().context("no runs")?;
    eventually(60, "only the newest kept", || async {
        let names: Vec<String> = s.runs().await?.iter().map(|b| b.name_any()).collect();
        Ok((names == [newest.clone()]).then_some(()))
    })
    .await
    .with_context(|| {
        format!(
            "{:?}",
            runs_now.iter().map(|b| b.name_any()).collect::<Vec<_>>()
        )
    })?;
    // The kept snapshot restores exactly; the pruned ones are gone from the repository.
    ensure!(restore_snapshot(cluster, &newest_snap)? == Ok(newest_sha));
    for (name, snap, _) in &snapshots[..snapshots.len() - 1] {
        eventually(60, &format!("snapshot of {name} deleted"), || async {
            Ok(restore_snapshot(cluster, snap)?.err())
        })
        .await?;
    }
    let _ = s.kubectl(&["delete", "vmbsched", "s", "--cascade=orphan"]);
    Ok(())
}
