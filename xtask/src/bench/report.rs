//! BENCHMARKS.md: machine facts, one table per section (min / median / max over
//! the runs, Cairn ÷ peer beside the absolute figures) and the targets.

use std::fmt::Write;

use super::control::ControlResults;
use super::data::{DataResults, FRACTIONS, mib};
use super::peer::PeerResults;
use super::repository::RepoResults;
use super::{Config, Samples};

/// Everything one bench run measured.
#[derive(Default)]
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
    /// Sections that failed, with why.
    pub errors: Vec<String>,
    /// Wall time of the bench.
    pub elapsed: f64,
    /// 1-minute load average when the bench started (other work on the machine).
    pub load_at_start: Option<f64>,
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

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn ratio(a: &Samples, b: &Samples) -> Option<f64> {
    Some(a.median()? / b.median()?)
}

/// The whole file.
pub fn render(cfg: &Config, r: &Results) -> String {
    let d = &r.data;
    let p = &r.peer;
    let c = &r.control;
    let size = cfg.disk_size;
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut o = String::new();
    let cmd = if cfg.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let _ = writeln!(o, "# Cairn benchmarks\n");
    let _ = writeln!(
        o,
        "Produced by `{cmd}` on {} in {:.0} s ({} runs per row, {gib:.0} GiB disk). \
         Method: [docs/BENCHMARKS-METHOD.md](docs/BENCHMARKS-METHOD.md). \
         Times are wall-clock seconds; *Cairn ÷ peer* divides Cairn's median time by the \
         peer's (below 1 = Cairn faster). Absolute figures move between machines; compare \
         ratios from one run.\n",
        chrono_now(),
        r.elapsed,
        cfg.runs
    );
    let _ = writeln!(o, "## Machine\n\n{}", super::machine::facts(&cfg.work));
    let _ = writeln!(
        o,
        "- Page cache dropped before each timed step: {}\n\
         - 1-minute load average when the bench started: {} (other work on the \
         {} cores moves the figures; min/max show the spread)\n",
        if d.cold_cache {
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

    // 1.
    let _ = writeln!(
        o,
        "## 1. Full push backup, {gib:.0} GiB qcow2 of random data\n\n{HEAD}"
    );
    o.pop();
    let peers_full: Vec<(&str, &Samples)> = vec![
        ("convert", &d.full_convert),
        ("QEMU", &d.full_qemu),
        ("virtnbdbackup", &p.full),
    ];
    row(
        &mut o,
        "Cairn end to end (`kubectl apply` → Succeeded)",
        &c.e2e_full,
        Some(size),
        &peers_full,
    );
    row(
        &mut o,
        "Cairn library (`run_push_backup`)",
        &d.full_cairn,
        Some(size),
        &peers_full,
    );
    row(
        &mut o,
        "  then, separately: verification `verify_backup` (SHA-256 of the new file; not in the time above)",
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
    let _ = writeln!(o);

    // 2.
    let _ = writeln!(
        o,
        "## 2. Incremental push backup after random 64 KiB guest writes\n\nEach run: full backup with checkpoint, then 1 %, 10 %, 50 % of the disk dirtied in turn (distinct random 64 KiB clusters through HMP `qemu-io`), an incremental after each. *QEMU's own job* is `blockdev-backup sync: bitmap` over QMP with a bitmap made at the same moment as Cairn's checkpoint.\n\n{HEAD}"
    );
    o.pop();
    for (i, frac) in FRACTIONS.iter().enumerate() {
        let bytes = (size as f64 * frac) as u64;
        let pct = frac * 100.0;
        let peers: Vec<(&str, &Samples)> =
            vec![("QEMU", &d.inc_qemu[i]), ("virtnbdbackup", &p.inc[i])];
        row(
            &mut o,
            &format!("{pct:.0} %: Cairn library"),
            &d.inc_cairn[i],
            Some(bytes),
            &peers,
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

    // 3.
    let _ = writeln!(
        o,
        "## 3. Pull mode\n\nCairn has no NBD reader of its own yet: reads use `nbdcopy` (whole export → `null:`) and, for the dirty extents, a libnbd (Python) client that queries the `qemu:dirty-bitmap` context and reads only dirty extents, 16 × ≤4 MiB requests in flight (nbdcopy cannot select extents).\n\n{HEAD}"
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
        "`nbdcopy` of a plain `qemu-nbd` export of the same image",
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
        "`qemu-img convert -t none -T none` of the chain",
        &d.restore_convert,
        Some(size),
        &[],
    );
    let _ = writeln!(o);

    // 5.
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
    let _ = writeln!(
        o,
        "| operator RSS, idle (before objects) | {:.1} MiB |",
        c.operator_rss_empty_mib
    );
    let _ = writeln!(
        o,
        "| creating {} checkpoint objects through the API (32 in flight) | {:.1} s |",
        c.objects, c.create_secs
    );
    let _ = writeln!(
        o,
        "| … until the operator routed (labelled) all of them | {:.1} s |",
        c.route_secs
    );
    let _ = writeln!(
        o,
        "| operator RSS with {} checkpoint objects reconciled | {:.1} MiB |",
        c.objects + lat.0.len(),
        c.operator_rss_mib
    );
    let _ = writeln!(
        o,
        "| full resync: new operator process → leader lease held | {:.1} s |",
        c.resync_leader_secs
    );
    let _ = writeln!(
        o,
        "| full resync: new operator process → every object reconciled again | {:.1} s |",
        c.resync_secs
    );
    let _ = writeln!(
        o,
        "| operator RSS after the resync | {:.1} MiB |",
        c.operator_rss_resync_mib
    );
    let _ = writeln!(
        o,
        "| agent RSS with 1 VM | {:.1} MiB |",
        c.agent_rss_one_mib
    );
    let _ = writeln!(
        o,
        "| agent RSS with {} VMs | {:.1} MiB |",
        c.vms, c.agent_rss_mib
    );
    let _ = writeln!(
        o,
        "| agent CPU while idle with {} VMs, over {} s | {:.2} % of one core |",
        c.vms,
        c.idle_window,
        c.agent_idle_cpu * 100.0
    );
    let _ = writeln!(o);

    // 6. Guest impact: measured with a real guest, section 9.
    let _ = writeln!(
        o,
        "## 6. Guest impact\n\nMeasured with a real guest writing from inside: section 9 (the earlier rows here drove writes through the QEMU monitor, which shares the main loop with the job; they measured the method more than the guest).\n"
    );

    // 7.
    repository_section(&mut o, cfg, &r.repository);

    // 8.
    o.push_str(&super::instant::render(&r.instant));
    o.push_str(&super::guest::render(&r.guest));

    // Targets.
    let _ = writeln!(
        o,
        "## Targets\n\n| target | measured | verdict |\n|---|---|---|"
    );
    let speed = |a: &Samples, b: &Samples| ratio(b, a);
    let line = |o: &mut String, t: &str, m: String, ok: Option<bool>| {
        let _ = writeln!(o, "| {t} | {m} | {} |", verdict(ok));
    };
    let s = speed(&d.full_cairn, &d.full_convert);
    line(
        &mut o,
        "full push ≥ 0.95× `qemu-img convert` (library)",
        format!("{}×", f(s, 1.0, 2)),
        s.map(|v| v >= 0.95),
    );
    let s = speed(&c.e2e_full, &d.full_convert);
    line(
        &mut o,
        "full push ≥ 0.95× `qemu-img convert` (end to end)",
        format!("{}×", f(s, 1.0, 2)),
        s.map(|v| v >= 0.95),
    );
    let s = speed(&d.full_cairn, &p.full);
    line(
        &mut o,
        "full ≥ 2× faster than virtnbdbackup",
        format!("{}×", f(s, 1.0, 2)),
        s.map(|v| v >= 2.0),
    );
    for (i, frac) in FRACTIONS.iter().enumerate() {
        let s = speed(&d.inc_cairn[i], &p.inc[i]);
        line(
            &mut o,
            &format!(
                "incremental {:.0} % ≥ 2× faster than virtnbdbackup",
                frac * 100.0
            ),
            format!("{}×", f(s, 1.0, 2)),
            s.map(|v| v >= 2.0),
        );
    }
    let s = speed(&d.restore_cairn, &d.restore_convert);
    line(
        &mut o,
        "restore ≥ 0.9× `qemu-img convert` of the chain",
        format!("{}×", f(s, 1.0, 2)),
        s.map(|v| v >= 0.9),
    );
    let extra = d.inc_cairn[0]
        .median()
        .zip(d.inc_qemu[0].median())
        .map(|(a, b)| a - b);
    line(
        &mut o,
        "incremental 1 % adds ≤ 0.3 s over QEMU's own job",
        format!("{} s", extra.map_or("–".into(), |v| format!("{v:+.2}"))),
        extra.map(|v| v <= 0.3),
    );
    let p50 = lat.percentile(50.0);
    line(
        &mut o,
        "apply → Ready p50 ≤ 300 ms",
        format!("{} ms", f(p50, 1e3, 0)),
        p50.map(|v| v <= 0.3),
    );
    let p99 = lat.percentile(99.0);
    line(
        &mut o,
        "apply → Ready p99 ≤ 1 s",
        format!("{} ms", f(p99, 1e3, 0)),
        p99.map(|v| v <= 1.0),
    );
    let has = c.objects > 0;
    line(
        &mut o,
        &format!(
            "operator RSS ≤ 150 MiB at 10k checkpoints (here {})",
            c.objects
        ),
        format!("{:.1} MiB", c.operator_rss_mib),
        has.then_some(c.operator_rss_mib <= 150.0),
    );
    line(
        &mut o,
        &format!("full resync ≤ 10 s (here {} objects)", c.objects),
        format!("{:.1} s", c.resync_secs),
        has.then_some(c.resync_secs <= 10.0),
    );
    line(
        &mut o,
        &format!("agent RSS ≤ 40 MiB with 100 VMs (here {})", c.vms),
        format!("{:.1} MiB", c.agent_rss_mib),
        (c.vms > 0).then_some(c.agent_rss_mib <= 40.0),
    );
    line(
        &mut o,
        "agent idle CPU near zero (≤ 1 % of a core)",
        format!("{:.2} %", c.agent_idle_cpu * 100.0),
        (c.vms > 0).then_some(c.agent_idle_cpu <= 0.01),
    );
    repository_targets(&mut o, &r.repository);
    let _ = writeln!(o);
    o
}

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

/// Target rows of section 7.
fn repository_targets(o: &mut String, r: &RepoResults) {
    let line = |o: &mut String, t: &str, m: String, ok: Option<bool>| {
        let _ = writeln!(o, "| {t} | {m} | {} |", verdict(ok));
    };
    let speed = |cairn: &Samples, peer: &Samples| ratio(peer, cairn);
    let s = speed(&r.full_dir, &r.full_nbdcopy);
    line(
        o,
        "repository full (directory) ≥ 0.8× `nbdcopy`'s speed",
        format!("{}×", f(s, 1.0, 2)),
        s.map(|v| v >= 0.8),
    );
    let m = r.inc_dir.median();
    line(
        o,
        "repository incremental 1 % ≤ 1.5 s (library, directory)",
        format!("{} s", f(m, 1.0, 2)),
        m.map(|v| v <= 1.5),
    );
    let pairs: Vec<(u64, u64)> = r
        .inc_bytes_read
        .iter()
        .copied()
        .zip(r.dirty_chunk_bytes.iter().copied())
        .collect();
    let over = pairs
        .iter()
        .map(|(read, due)| read.saturating_sub(*due))
        .max();
    line(
        o,
        "incremental reads ≤ dirty bytes rounded up to chunks (every run)",
        format!(
            "{} MiB over, at most",
            f(over.map(|b| b as f64), 1.0 / (1u64 << 20) as f64, 1)
        ),
        over.map(|b| b == 0),
    );
    let s = speed(&r.restore_dir, &r.restore_convert);
    line(
        o,
        "repository restore to raw ≥ 0.8× `qemu-img convert` qcow2 → raw",
        format!("{}×", f(s, 1.0, 2)),
        s.map(|v| v >= 0.8),
    );
    let s = speed(&r.inc_dir, &r.restic_inc);
    line(
        o,
        "repository incremental 1 % ≥ 5× faster than restic",
        format!("{}×", f(s, 1.0, 2)),
        s.map(|v| v >= 5.0),
    );
    let s = speed(&r.full_dir, &r.restic_full);
    line(
        o,
        "repository full not slower than restic",
        format!("{}×", f(s, 1.0, 2)),
        s.map(|v| v >= 1.0),
    );
    let share = r
        .clone
        .map(|c| c.added as f64 * 100.0 / c.size.max(1) as f64);
    line(
        o,
        "a clone of the same base adds < 5 % of its size",
        format!("{} %", f(share, 1.0, 3)),
        share.map(|v| v < 5.0),
    );
    let per = samples(&r.inc_stored_s3)
        .median()
        .map(|m| m / r.dirty_bytes.max(1) as f64);
    line(
        o,
        "stored bytes per dirty byte ≤ 8 (1 % of 64 KiB writes, S3)",
        f(per, 1.0, 2),
        per.map(|v| v <= 8.0),
    );
    let (n, b) = r
        .inc_objects_s3
        .iter()
        .fold((0u64, 0u64), |(n, b), (x, y)| (n + x, b + y));
    let avg = (n > 0).then(|| b as f64 / n as f64);
    line(
        o,
        "S3 objects written by the incremental average ≥ 4 MiB",
        format!("{} MiB", f(avg, 1.0 / (1u64 << 20) as f64, 2)),
        avg.map(|v| v >= (4u64 << 20) as f64),
    );
}

fn chrono_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
