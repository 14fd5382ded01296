//! BENCHMARKS.md: machine facts, one table per section (min / median / max over
//! the runs, Cairn ÷ peer beside the absolute figures) and the targets.

use std::fmt::Write;

use super::control::ControlResults;
use super::data::{DataResults, FRACTIONS, mib};
use super::peer::PeerResults;
use super::repository::RepoResults;
use super::{Config, Samples};

/// Everything one bench run measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Results {
    /// Data path.
    pub data: DataResults,
    /// virtnbdbackup.
    pub peer: PeerResults,
    /// Cluster.
    pub control: ControlResults,
    /// Routing many checkpoints (render/targets in `super::routing`).
    pub routing: super::routing::RoutingResults,
    /// BackupRepository and restic.
    pub repository: RepoResults,
    /// Instant recovery.
    pub instant: super::instant::InstantResults,
    /// The real-guest section.
    pub guest: super::guest::GuestResults,
    /// The agent with many VMs.
    pub fleet: super::fleet::FleetResults,
    /// Sections that failed, with why.
    pub errors: Vec<String>,
    /// Wall time of the bench.
    pub elapsed: f64,
    /// 1-minute load average when the bench started (other work on the machine).
    pub load_at_start: Option<f64>,
    /// 1-minute load average before and after each section, by section.
    pub loads: std::collections::BTreeMap<String, SectionLoad>,
    /// `--allow-noisy`: targets may be called met although a section started under load.
    pub allow_noisy: bool,
    /// When the run started (UTC).
    pub started: String,
    /// The command that produced the run.
    pub command: String,
    /// Sections this run measured (all, or the one of `CAIRN_BENCH_ONLY`).
    pub sections: Vec<String>,
    /// Machine facts, as Markdown list items.
    pub machine: String,
    /// `--quick`, runs per row and disk size of the run.
    pub quick: bool,
    /// Runs per timed row.
    pub runs: usize,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Whether the bench may drop the page cache (root).
    pub cold_cache: bool,
    /// Whether every section ran (false while the run is under way or was cut short).
    pub finished: bool,
}

/// The machine's 1-minute load average around one section.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SectionLoad {
    /// Seconds spent waiting for the load to settle before the section.
    pub waited: f64,
    /// When the section started.
    pub before: Option<f64>,
    /// When it ended.
    pub after: Option<f64>,
}

fn f(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{:.*}", digits, v * scale))
}

/// A row of seconds: `| what | min | median | max | MiB/s | ratios |`.
fn row(out: &mut String, what: &str, s: &Samples, bytes: Option<u64>, ratios: &[(&str, &Samples)]) {
    let tput = match (bytes, s.median()) {
        (Some(b), Some(m)) if m > 0.0 => format!("{:.0}", mib(b) / m),
        _ => "–".into(),
    };
    let ratio = ratios
        .iter()
        .filter_map(|(name, peer)| Some(format!("{:.2}× {name}", s.median()? / peer.median()?)))
        .collect::<Vec<_>>()
        .join("; ");
    let _ = writeln!(
        out,
        "| {what} | {} | {} | {} | {tput} | {} |",
        f(s.min(), 1.0, 2),
        f(s.median(), 1.0, 2),
        f(s.max(), 1.0, 2),
        if ratio.is_empty() {
            "–".into()
        } else {
            ratio
        }
    );
}

const HEAD: &str = "| what | min s | median s | max s | MiB/s (median) | Cairn ÷ peer (time) |\n|---|---|---|---|---|---|\n";

/// Per-stage medians of end-to-end backups: when each stage was reached
/// after `kubectl apply` started, and the time since the stage before.
fn timeline_table(title: &str, runs: &[super::control::Timeline]) -> String {
    let mut o = String::new();
    let Some(first) = runs.first() else {
        return o;
    };
    let _ = writeln!(
        o,
        "{title} (median over {} runs of the time each stage was reached after `kubectl apply` started; stages from the bench's watch of the object and the agent's log, same clock):\n\n| stage | at s (median) | since the stage before s |\n|---|---|---|",
        runs.len()
    );
    let mut previous = 0.0;
    for (stage, _) in &first.0 {
        let at = Samples(
            runs.iter()
                .filter_map(|r| r.0.iter().find(|(s, _)| s == stage).map(|(_, t)| *t))
                .collect(),
        );
        let Some(m) = at.median() else { continue };
        let _ = writeln!(o, "| {stage} | {m:.3} | {:+.3} |", m - previous);
        previous = m;
    }
    let _ = writeln!(o);
    o
}

/// The whole file.
pub fn render(cfg: &Config, r: &Results) -> String {
    let d = &r.data;
    let p = &r.peer;
    let c = &r.control;
    let size = cfg.disk_size;
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut o = String::new();
    let _ = writeln!(o, "# Cairn benchmarks\n");
    let _ = writeln!(
        o,
        "Generated by `cargo xtask bench` from one run: `{}` started {} and took {:.0} s ({} runs per row, {gib:.0} GiB disk; sections: {}). \
         Nothing in this file is edited by hand: the notes at the end come from `{NOTES}`. \
         Method: [docs/BENCHMARKS-METHOD.md](docs/BENCHMARKS-METHOD.md). \
         Times are wall-clock seconds; *Cairn ÷ peer* divides Cairn's median time by the \
         peer's (below 1 = Cairn faster). Absolute figures move between machines; compare \
         ratios from one run.\n",
        r.command,
        r.started,
        r.elapsed,
        cfg.runs,
        r.sections.join(", "),
    );
    if !r.finished {
        let _ = writeln!(
            o,
            "**This run did not finish**: it wrote this file after each section, and stopped after {:.0} s; the sections it did not reach say \"not measured\".\n",
            r.elapsed
        );
    }
    let _ = writeln!(o, "## Machine\n\n{}", r.machine);
    let _ = writeln!(
        o,
        "- Page cache dropped before each timed step: {}\n\
         - 1-minute load average when the bench started: {}; before and after each section: see *Load* at the end \
         ({} cores; other work moves the figures, min/max show the spread)\n",
        if r.cold_cache {
            "yes"
        } else {
            "no (not permitted)"
        },
        f(r.load_at_start, 1.0, 2),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    if !r.errors.is_empty() {
        let _ = writeln!(o, "**Sections that failed:**\n");
        for e in &r.errors {
            let _ = writeln!(o, "- {}", e.replace('\n', " "));
        }
        let _ = writeln!(o);
    }

    let mut parts: Vec<(usize, &[&str])> = Vec::new();
    // 1.
    parts.push((o.len(), &["data", "peer", "control"]));
    let _ = writeln!(
        o,
        "## 1. Full push backup, {gib:.0} GiB qcow2 of random data\n\n{HEAD}"
    );
    o.pop();
    // Like for like: whole commands against whole commands (`kubectl apply`
    // → `Succeeded` against `qemu-img convert` and virtnbdbackup), the library
    // path against QEMU's own job.
    row(
        &mut o,
        "Cairn end to end (`kubectl apply` → `Succeeded`)",
        &c.e2e_full,
        Some(size),
        &[("convert", &d.full_convert), ("virtnbdbackup", &p.full)],
    );
    row(
        &mut o,
        "Cairn library (`run_push_backup`)",
        &d.full_cairn,
        Some(size),
        &[("QEMU", &d.full_qemu)],
    );
    row(
        &mut o,
        "  then, separately: verification `verify_backup` (SHA-256 of the new file; not in the times above)",
        &d.full_checksum,
        Some(size),
        &[],
    );
    row(
        &mut o,
        "QEMU `blockdev-backup` over QMP, O_DIRECT target",
        &d.full_qemu,
        Some(size),
        &[],
    );
    row(
        &mut o,
        "`qemu-img convert -t none -T none`",
        &d.full_convert,
        Some(size),
        &[],
    );
    row(&mut o, "virtnbdbackup `-l full`", &p.full, Some(size), &[]);
    if let Some(why) = &p.unavailable {
        let _ = writeln!(
            o,
            "\nvirtnbdbackup could not run here: {why}. The comparison falls back to QEMU driven directly and `qemu-img convert`."
        );
    }
    let _ = writeln!(
        o,
        "\nSource reads: every VM (Cairn's, the libvirt domain of virtnbdbackup) opens its disk with `cache.direct=on` (O_DIRECT, libvirt's `cache='none'`), and `qemu-img convert` reads with `-T none`; targets are written with O_DIRECT by Cairn, QEMU's job and convert (`-t none`); virtnbdbackup writes its own files buffered.\n"
    );
    o.push_str(&timeline_table(
        "Where the time of one end-to-end full backup goes",
        &c.e2e_full_timelines,
    ));

    // 2.
    parts.push((o.len(), &["data", "peer", "control"]));
    let _ = writeln!(
        o,
        "## 2. Incremental push backup after random 64 KiB guest writes\n\nEach run: full backup with checkpoint, then 1 %, 10 %, 50 % of the disk dirtied in turn (distinct random 64 KiB clusters through HMP `qemu-io`), an incremental after each. *QEMU's own job* is `blockdev-backup sync: bitmap` over QMP with a bitmap made at the same moment as Cairn's checkpoint. The end-to-end row is section 5's cluster VM: a full backup that creates a checkpoint, the same 1 % of distinct 64 KiB clusters dirtied, then an incremental `VirtualMachineBackup` from that checkpoint; QEMU's own job of the library rows is its reference (same disk size, same number of writes).\n\n{HEAD}"
    );
    o.pop();
    for (i, frac) in FRACTIONS.iter().enumerate() {
        let bytes = (size as f64 * frac) as u64;
        let pct = frac * 100.0;
        if i == 0 {
            row(
                &mut o,
                "1 %: Cairn end to end (`kubectl apply` → `Succeeded`)",
                &c.e2e_inc,
                Some(bytes),
                &[("QEMU", &d.inc_qemu[i]), ("virtnbdbackup", &p.inc[i])],
            );
        }
        row(
            &mut o,
            &format!("{pct:.0} %: Cairn library"),
            &d.inc_cairn[i],
            Some(bytes),
            &[("QEMU", &d.inc_qemu[i])],
        );
        row(
            &mut o,
            &format!(
                "{pct:.0} %:   then, separately: verification `verify_backup` (not in the time above)"
            ),
            &d.inc_checksum[i],
            None,
            &[],
        );
        row(
            &mut o,
            &format!("{pct:.0} %: QEMU's own job over QMP"),
            &d.inc_qemu[i],
            Some(bytes),
            &[],
        );
        row(
            &mut o,
            &format!("{pct:.0} %: virtnbdbackup `-l inc`"),
            &p.inc[i],
            Some(bytes),
            &[],
        );
    }
    let _ = writeln!(o);
    o.push_str(&timeline_table(
        "Where the time of one end-to-end 1 % incremental goes",
        &c.e2e_inc_timelines,
    ));

    // 3.
    parts.push((o.len(), &["data"]));
    let _ = writeln!(
        o,
        "## 3. Pull mode\n\nA pull export is read here as a user's tool would read it: `nbdcopy` (whole export → `null:`) and, for the dirty extents, a libnbd (Python) client that queries the `qemu:dirty-bitmap` context and reads only dirty extents, 16 × ≤4 MiB requests in flight (nbdcopy cannot select extents). Cairn's own NBD client (`cairn-nbd`) reads exports for the repository: section 7.\n\n{HEAD}"
    );
    o.pop();
    row(
        &mut o,
        "Cairn `start_pull_export` (full, fleecing) → ready",
        &d.pull_ready,
        None,
        &[("qemu-nbd", &d.qemu_nbd_ready)],
    );
    row(
        &mut o,
        "Cairn `start_pull_export` (incremental, 10 % dirty) → ready",
        &d.pull_ready_inc,
        None,
        &[],
    );
    row(
        &mut o,
        "`qemu-nbd -r` start → export answers",
        &d.qemu_nbd_ready,
        None,
        &[],
    );
    row(
        &mut o,
        "`nbdcopy` of Cairn's full export",
        &d.pull_read_full,
        Some(size),
        &[("qemu-nbd", &d.qemu_nbd_read)],
    );
    row(
        &mut o,
        if d.qemu_nbd_direct {
            "`nbdcopy` of a plain `qemu-nbd --cache=none` export of the same image (O_DIRECT, as the VM reads)"
        } else {
            "`nbdcopy` of a plain `qemu-nbd` export of the same image (through the page cache: not like for like, see the notes)"
        },
        &d.qemu_nbd_read,
        Some(size),
        &[],
    );
    row(
        &mut o,
        &format!(
            "dirty extents only ({:.0} MiB) of Cairn's incremental export",
            mib(d.pull_dirty_bytes)
        ),
        &d.pull_read_dirty,
        Some(d.pull_dirty_bytes),
        &[],
    );
    let _ = writeln!(o);

    // 4.
    parts.push((o.len(), &["data"]));
    let _ = writeln!(
        o,
        "## 4. Restore of full + 3 incrementals (1 %, 10 %, 50 %) to a standalone qcow2\n\n{HEAD}"
    );
    o.pop();
    row(
        &mut o,
        "`cairn-agent restore` (SHA-256 of the chain files while converting, both through the page cache)",
        &d.restore_cairn,
        Some(size),
        &[("convert", &d.restore_convert)],
    );
    row(
        &mut o,
        "`qemu-img convert -t none -T writeback` of the chain (the flags of Cairn's own convert)",
        &d.restore_convert,
        Some(size),
        &[],
    );
    let _ = writeln!(o);

    // 5.
    parts.push((o.len(), &["control", "routing", "fleet"]));
    let lat = &c.checkpoint_latency;
    let _ = writeln!(
        o,
        "## 5. Control plane (local cluster: etcd + kube-apiserver, release operator and agent)\n"
    );
    let _ = writeln!(o, "| what | value |\n|---|---|");
    let _ = writeln!(
        o,
        "| checkpoint create → Ready, {} sequential checkpoints: p50 / p99 / max | {} / {} / {} ms |",
        lat.0.len(),
        f(lat.percentile(50.0), 1e3, 0),
        f(lat.percentile(99.0), 1e3, 0),
        f(lat.max(), 1e3, 0)
    );
    for (what, s) in [
        (
            "full backup into the `local-dir` BackupRepository, `kubectl apply` → `Succeeded`: min / median / max",
            &c.e2e_repo_full,
        ),
        (
            "1 % incremental into it, `kubectl apply` → `Succeeded`: min / median / max",
            &c.e2e_repo_inc,
        ),
    ] {
        let _ = writeln!(
            o,
            "| {what} | {} / {} / {} s |",
            f(s.min(), 1.0, 2),
            f(s.median(), 1.0, 2),
            f(s.max(), 1.0, 2)
        );
    }
    let _ = writeln!(o);
    if r.routing.objects > 0 {
        let _ = writeln!(
            o,
            "### Routing {} checkpoints\n\n{}",
            r.routing.objects,
            super::routing::render(&r.routing)
        );
    }
    if r.fleet.vms > 0 {
        let _ = writeln!(
            o,
            "### The agent with {} VMs on one node\n\n{}",
            r.fleet.vms,
            super::fleet::render(&r.fleet)
        );
    }

    // 6. Guest impact: measured with a real guest, section 9.
    parts.push((o.len(), &["data", "guest"]));
    let _ = writeln!(
        o,
        "## 6. Guest impact\n\nMeasured with a real guest writing from inside: section 9 (the earlier rows here drove writes through the QEMU monitor, which shares the main loop with the job; they measured the method more than the guest).\n"
    );

    // 7.
    parts.push((o.len(), &["repository"]));
    repository_section(&mut o, cfg, &r.repository);

    // 8.
    parts.push((o.len(), &["instant", "guest"]));
    o.push_str(&super::instant::render(&r.instant));
    o.push_str(&super::guest::render(&r.guest));

    parts.push((o.len(), &[]));
    // A run of some sections shows only theirs.
    let measured =
        |of: &[&str]| of.is_empty() || of.iter().any(|s| r.sections.iter().any(|x| x == s));
    let mut kept = o[..parts[0].0].to_string();
    for w in parts.windows(2) {
        if measured(w[0].1) {
            kept.push_str(&o[w[0].0..w[1].0]);
        }
    }
    kept.push_str(&o[parts[parts.len() - 1].0..]);
    let mut o = kept;
    o.push_str(&super::targets::render(r));
    o.push_str(&loads_table(r));
    o.push_str(&notes(r));
    o
}

/// Each section's 1-minute load average before and after it.
fn loads_table(r: &Results) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## Load\n\nThe 1-minute load average before and after each section (the bench waits up to {} s for it to fall to {} before a section starts).\n\n| section | waited s | before | after |\n|---|---|---|---|",
        super::SETTLE_LIMIT.as_secs(),
        super::targets::QUIET_LOAD
    );
    for (section, l) in &r.loads {
        let _ = writeln!(
            o,
            "| {section} | {:.0} | {} | {} |",
            l.waited,
            f(l.before, 1.0, 2),
            f(l.after, 1.0, 2)
        );
    }
    let _ = writeln!(o);
    o
}

/// The checked-in notes ([`NOTES`]), under the heading they get in the file.
fn notes(r: &Results) -> String {
    let root = cairn_e2e::tools::repo_root();
    match std::fs::read_to_string(root.join(NOTES)) {
        Ok(text) => format!(
            "## Notes\n\nFrom [`{NOTES}`]({NOTES}), written by hand; each note names the run it refers to (this run: {}).\n\n{}\n",
            r.started,
            text.trim()
        ),
        Err(_) => String::new(),
    }
}

/// The hand-written notes the generator includes.
pub const NOTES: &str = "docs/BENCHMARKS-NOTES.md";

fn samples(v: &[u64]) -> Samples {
    Samples(v.iter().map(|&b| b as f64).collect())
}

/// Section 7: times against `nbdcopy`, `qemu-img convert` and restic, then bytes.
fn repository_section(o: &mut String, cfg: &Config, r: &RepoResults) {
    let size = cfg.disk_size;
    let _ = writeln!(
        o,
        "## 7. Backup repository (chunks of {} KiB; directory, and versitygw S3 on loopback) against restic\n\n\
         Cairn is the agent's library path `run_repository_backup` (point-in-time export, Cairn's NBD client, \
         chunk, hash, compress, encrypt on S3, pack, upload, commit). The incremental follows {:.0} % of the disk \
         dirtied with distinct random 64 KiB writes; restic backs up the same bytes as a raw file.\n\n{HEAD}",
        r.chunk_size >> 10,
        super::repository::DIRTY * 100.0
    );
    o.pop();
    if let Some(why) = &r.restic_unavailable {
        let _ = writeln!(o, "restic could not run: {why}\n");
    }
    let dirty = Some(r.dirty_bytes);
    type Row<'a> = (
        &'a str,
        &'a Samples,
        Option<u64>,
        Vec<(&'a str, &'a Samples)>,
    );
    let rows: [Row; 11] = [
        (
            "full into a directory repository",
            &r.full_dir,
            Some(size),
            vec![("nbdcopy", &r.full_nbdcopy), ("restic", &r.restic_full)],
        ),
        (
            "`nbdcopy` of the same kind of export into a file (export start to teardown)",
            &r.full_nbdcopy,
            Some(size),
            vec![],
        ),
        (
            "full into S3 (encrypted)",
            &r.full_s3,
            Some(size),
            vec![("restic", &r.restic_full)],
        ),
        (
            "restic `backup` of the raw image, full",
            &r.restic_full,
            Some(size),
            vec![],
        ),
        (
            "incremental, 1 %, directory",
            &r.inc_dir,
            dirty,
            vec![("restic", &r.restic_inc)],
        ),
        (
            "incremental, 1 %, S3",
            &r.inc_s3,
            dirty,
            vec![("restic", &r.restic_inc)],
        ),
        (
            "restic `backup` after the same 1 %",
            &r.restic_inc,
            dirty,
            vec![],
        ),
        (
            "restore of the incremental snapshot to raw, directory",
            &r.restore_dir,
            Some(size),
            vec![
                ("convert", &r.restore_convert),
                ("restic", &r.restic_restore),
            ],
        ),
        (
            "restore of the incremental snapshot to raw, S3",
            &r.restore_s3,
            Some(size),
            vec![("convert", &r.restore_convert)],
        ),
        (
            "`qemu-img convert -t none -T none` of the base qcow2 to raw",
            &r.restore_convert,
            Some(size),
            vec![],
        ),
        (
            "restic `restore latest`",
            &r.restic_restore,
            Some(size),
            vec![],
        ),
    ];
    for (what, s, bytes, peers) in &rows {
        row(o, what, s, *bytes, peers);
    }
    let per_dirty = |v: &[u64]| samples(v).median().map(|m| m / r.dirty_bytes.max(1) as f64);
    let avg = |v: &[(u64, u64)]| {
        let (n, b) = v.iter().fold((0, 0), |(n, b), (x, y)| (n + x, b + y));
        (n > 0).then(|| b as f64 / n as f64)
    };
    let per_run = |v: &[u64]| {
        v.iter()
            .map(|&b| format!("{:.1}", mib(b)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let _ = writeln!(o, "\n| bytes | value |\n|---|---|");
    let _ = writeln!(
        o,
        "| dirtied before the incremental | {:.1} MiB ({} writes of 64 KiB) |",
        mib(r.dirty_bytes),
        r.dirty_bytes / (64 << 10),
    );
    let _ = writeln!(
        o,
        "| … rounded up to the chunks they touch, per run | {} MiB |",
        per_run(&r.dirty_chunk_bytes)
    );
    let _ = writeln!(
        o,
        "| read from the export by the incremental (directory), per run | {} MiB |",
        per_run(&r.inc_bytes_read)
    );
    for (what, v) in [
        ("Cairn, directory", &r.inc_stored_dir),
        ("Cairn, S3", &r.inc_stored_s3),
        ("restic", &r.restic_inc_stored),
    ] {
        let _ = writeln!(
            o,
            "| stored by the incremental, {what} (median) | {} MiB = {} bytes per dirty byte |",
            f(samples(v).median(), 1.0 / (1u64 << 20) as f64, 1),
            f(per_dirty(v), 1.0, 2)
        );
    }
    let n: u64 = r.inc_objects_s3.iter().map(|x| x.0).sum();
    let _ = writeln!(
        o,
        "| S3 objects the incremental wrote (all runs) | {n}, {} MiB on average |",
        f(avg(&r.inc_objects_s3), 1.0 / (1u64 << 20) as f64, 2)
    );
    let n: u64 = r.packs_s3.iter().map(|x| x.0).sum();
    let _ = writeln!(
        o,
        "| pack objects in the bucket after each run (all runs) | {n}, {} MiB on average |",
        f(avg(&r.packs_s3), 1.0 / (1u64 << 20) as f64, 2)
    );
    if let Some(c) = &r.clone {
        let _ = writeln!(
            o,
            "| a second VM cloned from the same base: full backup into the directory repository | adds {:.2} MiB = {:.3} % of its {:.0} MiB; chunks new / reused / zero {} / {} / {} |",
            mib(c.added),
            c.added as f64 * 100.0 / c.size.max(1) as f64,
            mib(c.size),
            c.chunks.0,
            c.chunks.1,
            c.chunks.2
        );
        let _ = writeln!(
            o,
            "| directory repository after it: logical / stored | {:.0} MiB / {:.0} MiB ({:.2}×) |",
            mib(c.logical),
            mib(c.stored),
            c.logical as f64 / c.stored.max(1) as f64
        );
    }
    let _ = writeln!(o);
}
