//! `cargo xtask bench [--quick]`: Cairn against the tools people use today
//! (QEMU over QMP, `qemu-img convert`, `qemu-nbd` + `nbdcopy`, virtnbdbackup on
//! libvirt), in one run; writes `BENCHMARKS.md` at the repository root.
//!
//! The parts: [`qemu`] (images, guestless QEMUs, simulated guest writes),
//! [`data`] (data path without a cluster), [`peer`] (libvirt + virtnbdbackup),
//! [`control`] (local cluster: end-to-end backup, latency, memory),
//! [`routing`] (10,000 checkpoints routed, operator memory and resync),
//! [`repository`] (BackupRepository ingest, restore, dedup; restic), [`report`]
//! (Markdown). The method is in docs/BENCHMARKS-METHOD.md.

mod control;
mod data;
mod guest;
mod instant;
mod machine;
mod peer;
mod qemu;
mod report;
mod repository;
mod routing;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

/// Sizes and repetitions of one benchmark run.
pub struct Config {
    /// `--quick`.
    pub quick: bool,
    /// Repetitions of each timed step.
    pub runs: usize,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Checkpoints for the latency measurement.
    pub checkpoints: usize,
    /// Checkpoint objects for the operator memory measurement.
    pub objects: usize,
    /// VMs for the agent memory measurement.
    pub vms: usize,
    /// Idle CPU window, seconds.
    pub idle_secs: u64,
    /// Scratch directory (on the repository's filesystem).
    pub work: PathBuf,
}

/// Repeated measurements of one quantity.
#[derive(Default, Clone, Debug)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    /// Adds one.
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    /// Smallest.
    pub fn min(&self) -> Option<f64> {
        self.sorted().first().copied()
    }
    /// Largest.
    pub fn max(&self) -> Option<f64> {
        self.sorted().last().copied()
    }
    /// Median (mean of the middle two for an even count).
    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }
    /// Nearest-rank percentile.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let v = self.sorted();
        if v.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        Some(v[rank.min(v.len()) - 1])
    }
}

/// Writes the dirty-extent reader next to the work files; returns its path.
pub fn dirty_read_script(work: &Path) -> Result<PathBuf> {
    let p = work.join("dirty_read.py");
    std::fs::write(&p, include_str!("dirty_read.py"))?;
    Ok(p)
}

/// Entry point of `cargo xtask bench`.
pub fn run(quick: bool) -> Result<()> {
    let root = cairn_e2e::tools::repo_root();
    // Release binaries for the cluster and restore: re-run with CAIRN_BIN_DIR set
    // (the environment cannot be changed in-process without `unsafe`).
    if std::env::var_os("CAIRN_BIN_DIR").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(&cargo)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "cairn-operator",
                "-p",
                "cairn-agent",
                "-p",
                "xtask",
            ])
            .current_dir(&root)
            .status()?;
        if !status.success() {
            bail!("building release binaries failed");
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        // The bench itself runs optimised too: the repository section ingests
        // and restores in this process, through the agent's library.
        let status = Command::new(target.join("release/xtask"))
            .args(std::env::args_os().skip(1))
            .env("CAIRN_BIN_DIR", target.join("release"))
            // One operator: the control-plane section measures that process.
            .env("CAIRN_OPERATOR_REPLICAS", "1")
            .status()?;
        if !status.success() {
            bail!("benchmark failed");
        }
        return Ok(());
    }
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let cfg = Config {
        quick,
        runs: if quick { 2 } else { 3 },
        disk_size: if quick { 1 << 30 } else { 4 << 30 },
        checkpoints: if quick { 30 } else { 100 },
        objects: if quick { 2_000 } else { 10_000 },
        vms: if quick { 20 } else { 100 },
        idle_secs: if quick { 10 } else { 30 },
        work: work.canonicalize()?,
    };
    // `CAIRN_BENCH_ONLY=data|peer|control|repository` re-measures one section, into
    // target/bench/<section>-only.md, leaving BENCHMARKS.md alone
    // (`CAIRN_BENCH_CONTROL_ONLY=1` is the older spelling of `control`).
    let only = match std::env::var("CAIRN_BENCH_ONLY") {
        Ok(s)
            if [
                "data",
                "peer",
                "control",
                "routing",
                "repository",
                "instant",
                "guest",
            ]
            .contains(&s.as_str()) =>
        {
            Some(s)
        }
        Ok(s) => bail!(
            "CAIRN_BENCH_ONLY={s}: expected data, peer, control, routing, repository, instant or guest"
        ),
        Err(_) => std::env::var_os("CAIRN_BENCH_CONTROL_ONLY").map(|_| "control".to_string()),
    };
    let section = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = report::Results {
        load_at_start: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok()),
        ..Default::default()
    };
    rt.block_on(async {
        eprintln!(
            "bench: preparing a {} MiB random image",
            cfg.disk_size >> 20
        );
        let base = qemu::random_base_image(&cfg.work, cfg.disk_size)?;
        if section("data")
            && let Err(e) = data::run_all(&cfg, &base, &mut results.data).await
        {
            eprintln!("bench: data path failed: {e:#}");
            results.errors.push(format!("data path: {e:#}"));
        }
        if section("peer")
            && let Err(e) = peer::run_all(&cfg, &base, &mut results.peer).await
        {
            eprintln!("bench: virtnbdbackup failed: {e:#}");
            results.peer.unavailable = Some(format!("{e:#}"));
        }
        if section("control")
            && let Err(e) = control::run_all(&cfg, &base, &mut results.control).await
        {
            eprintln!("bench: cluster part failed: {e:#}");
            results.errors.push(format!("cluster: {e:#}"));
        }
        if section("routing")
            && let Err(e) = routing::run_all(&cfg, &mut results.routing).await
        {
            eprintln!("bench: routing part failed: {e:#}");
            results.errors.push(format!("routing: {e:#}"));
        }
        if section("repository")
            && let Err(e) = repository::run_all(&cfg, &base, &mut results.repository).await
        {
            eprintln!("bench: repository part failed: {e:#}");
            results.errors.push(format!("repository: {e:#}"));
        }
        if section("instant")
            && let Err(e) = instant::run_all(&cfg, &base, &mut results.instant).await
        {
            eprintln!("bench: instant recovery failed: {e:#}");
            results.errors.push(format!("instant recovery: {e:#}"));
        }
        if section("guest")
            && let Err(e) = guest::run_all(&cfg, &mut results.guest).await
        {
            eprintln!("bench: guest section failed: {e:#}");
            results.errors.push(format!("guest: {e:#}"));
        }
        anyhow::Ok(())
    })?;
    results.elapsed = started.elapsed().as_secs_f64();
    let mut text = report::render(&cfg, &results);
    // Until report.rs places the routing section itself: appended here.
    if section("routing") {
        text.push_str("\n## Routing many checkpoints\n\n");
        text.push_str(&routing::render(&results.routing));
        text.push_str("\n| target | measured | met |\n|---|---|---|\n");
        for (target, measured, met) in routing::targets(&results.routing) {
            let met = met.map_or("–", |m| if m { "yes" } else { "no" });
            text.push_str(&format!("| {target} | {measured} | {met} |\n"));
        }
    }
    let out = match &only {
        Some(o) => cfg.work.join(format!("{o}-only.md")),
        None => root.join("BENCHMARKS.md"),
    };
    std::fs::write(out, &text)?;
    print!("{text}");
    Ok(())
}
