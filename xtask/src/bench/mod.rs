//! `cargo xtask bench [--quick]`: Cairn against the tools people use today
//! (QEMU over QMP, `qemu-img convert`, `qemu-nbd` + `nbdcopy`, virtnbdbackup on
//! libvirt), in one run; writes `BENCHMARKS.md` at the repository root.
//!
//! The parts: [`qemu`] (images, guestless QEMUs, simulated guest writes),
//! [`data`] (data path without a cluster), [`peer`] (libvirt + virtnbdbackup),
//! [`control`] (local cluster: end-to-end backup, latency), [`fleet`]
//! (local cluster: the agent with hundreds of VMs), [`routing`] (10,000
//! checkpoints routed, operator memory and resync), [`targets`] (verdicts),
//! [`repository`] (BackupRepository ingest, restore, dedup; restic), [`report`]
//! (Markdown). The method is in docs/BENCHMARKS-METHOD.md.

mod control;
mod data;
mod fleet;
mod guest;
mod instant;
mod machine;
mod peer;
mod qemu;
mod report;
mod repository;
mod routing;
mod targets;

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
#[derive(Default, Clone, Debug, serde::Serialize, serde::Deserialize)]
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

/// The sections, in the order a full run measures them (issue 14's first:
/// the end-to-end rows need the data path's references).
pub const SECTIONS: [&str; 8] = [
    "data",
    "control",
    "routing",
    "fleet",
    "peer",
    "repository",
    "instant",
    "guest",
];

/// The longest the bench waits for the machine to go quiet before a section.
pub const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(240);

/// The 1-minute load average.
fn load1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Waits (up to [`SETTLE_LIMIT`]) until the 1-minute load average is at most
/// [`targets::QUIET_LOAD`]; returns the seconds waited.
async fn settle() -> f64 {
    let t = std::time::Instant::now();
    while load1().is_some_and(|l| l > targets::QUIET_LOAD) && t.elapsed() < SETTLE_LIMIT {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    t.elapsed().as_secs_f64()
}

/// The saved results of the last full run, from which `--render` writes BENCHMARKS.md.
pub const RESULTS: &str = "docs/BENCHMARKS-RESULTS.json";

/// Writes the results JSON and the Markdown of a run (a section's own files
/// for `CAIRN_BENCH_ONLY`); returns the Markdown's path.
fn write_results(
    root: &Path,
    cfg: &Config,
    only: Option<&str>,
    results: &report::Results,
) -> Result<PathBuf> {
    let json = serde_json::to_vec_pretty(results)?;
    let out = match only {
        Some(o) => {
            std::fs::write(cfg.work.join(format!("{o}-only.json")), &json)?;
            cfg.work.join(format!("{o}-only.md"))
        }
        None => {
            std::fs::write(root.join(RESULTS), &json)?;
            root.join("BENCHMARKS.md")
        }
    };
    std::fs::write(&out, report::render(cfg, results))?;
    Ok(out)
}

/// Entry point of `cargo xtask bench`.
pub fn run(quick: bool, allow_noisy: bool, render: Option<PathBuf>) -> Result<()> {
    let root = cairn_e2e::tools::repo_root();
    if let Some(saved) = render {
        let results: report::Results = serde_json::from_slice(&std::fs::read(&saved)?)?;
        let cfg = Config {
            quick: results.quick,
            runs: results.runs,
            disk_size: results.disk_size,
            checkpoints: 0,
            objects: 0,
            vms: 0,
            idle_secs: 0,
            work: root.join("target/bench"),
        };
        let out = if results.sections.len() == 1 {
            root.join("target/bench")
                .join(format!("{}-only.md", results.sections[0]))
        } else {
            root.join("BENCHMARKS.md")
        };
        std::fs::write(&out, report::render(&cfg, &results))?;
        eprintln!("bench: wrote {}", out.display());
        return Ok(());
    }
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
        vms: if quick { 20 } else { 500 },
        idle_secs: if quick { 10 } else { 30 },
        work: work.canonicalize()?,
    };
    // `CAIRN_BENCH_ONLY=data|peer|control|repository|instant|guest|fleet` re-measures one section, into
    // target/bench/<section>-only.md, leaving BENCHMARKS.md alone
    // (`CAIRN_BENCH_CONTROL_ONLY=1` is the older spelling of `control`).
    let only = match std::env::var("CAIRN_BENCH_ONLY") {
        Ok(s) if SECTIONS.contains(&s.as_str()) => Some(s),
        Ok(s) => bail!(
            "CAIRN_BENCH_ONLY={s}: expected one of {}",
            SECTIONS.join(", ")
        ),
        Err(_) => std::env::var_os("CAIRN_BENCH_CONTROL_ONLY").map(|_| "control".to_string()),
    };
    let section = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = report::Results {
        load_at_start: load1(),
        allow_noisy,
        started: machine::utc_now(),
        command: std::iter::once("cargo xtask bench".to_string())
            .chain(std::env::args().skip(2))
            .collect::<Vec<_>>()
            .join(" "),
        sections: SECTIONS
            .iter()
            .filter(|s| section(s))
            .map(|s| s.to_string())
            .collect(),
        machine: machine::facts(&cfg.work),
        quick: cfg.quick,
        runs: cfg.runs,
        disk_size: cfg.disk_size,
        cold_cache: qemu::drop_caches(),
        ..Default::default()
    };
    if let Some(o) = &only {
        results.command = format!("CAIRN_BENCH_ONLY={o} {}", results.command);
    }
    rt.block_on(async {
        // The guest and fleet sections bring their own images.
        let base = if ["data", "peer", "control", "repository", "instant"]
            .into_iter()
            .any(section)
        {
            eprintln!(
                "bench: preparing a {} MiB random image",
                cfg.disk_size >> 20
            );
            qemu::random_base_image(&cfg.work, cfg.disk_size)?
        } else {
            PathBuf::new()
        };
        for name in SECTIONS.iter().copied().filter(|s| section(s)) {
            let waited = settle().await;
            let before = load1();
            eprintln!("bench: section {name} (load {before:?} after {waited:.0} s of waiting)");
            let r = &mut results;
            let outcome = match name {
                "data" => data::run_all(&cfg, &base, &mut r.data).await,
                "peer" => peer::run_all(&cfg, &base, &mut r.peer).await,
                "control" => control::run_all(&cfg, &base, &mut r.control).await,
                "repository" => repository::run_all(&cfg, &base, &mut r.repository).await,
                "instant" => instant::run_all(&cfg, &base, &mut r.instant).await,
                "guest" => guest::run_all(&cfg, &mut r.guest).await,
                "fleet" => fleet::run_all(&cfg, &mut r.fleet).await,
                "routing" => routing::run_all(&cfg, &mut r.routing).await,
                _ => unreachable!("every section is listed"),
            };
            if let Err(e) = outcome {
                eprintln!("bench: section {name} failed: {e:#}");
                if name == "peer" {
                    results.peer.unavailable = Some(format!("{e:#}"));
                } else {
                    results.errors.push(format!("{name}: {e:#}"));
                }
            }
            results.loads.insert(
                name.to_string(),
                report::SectionLoad {
                    waited,
                    before,
                    after: load1(),
                },
            );
            // Versions of tools a section installed (libvirt, virtnbdbackup, restic).
            results.machine = machine::facts(&cfg.work);
            // After every section: a run cut short still leaves its results.
            results.elapsed = started.elapsed().as_secs_f64();
            write_results(&root, &cfg, only.as_deref(), &results)?;
        }
        anyhow::Ok(())
    })?;
    results.elapsed = started.elapsed().as_secs_f64();
    results.finished = true;
    let out = write_results(&root, &cfg, only.as_deref(), &results)?;
    print!("{}", std::fs::read_to_string(&out)?);
    eprintln!("bench: wrote {}", out.display());
    Ok(())
}
