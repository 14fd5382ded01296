//! BENCHMARKS.md: machine facts, one table per section (min / median / max over
//! the runs, Cairn ÷ peer beside the absolute figures) and the targets.

use std::fmt::Write;

use super::control::ControlResults;
use super::data::{DataResults, FRACTIONS, mib};
use super::peer::PeerResults;
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

    // 6.
    let _ = writeln!(
        o,
        "## 6. Guest impact: random 4 KiB writes into the disk's block layer (HMP `qemu-io`, one at a time)\n"
    );
    let _ = writeln!(
        o,
        "| what | min IOPS | median IOPS | max IOPS | during ÷ idle |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        o,
        "| idle | {} | {} | {} | – |",
        f(d.iops_idle.min(), 1.0, 0),
        f(d.iops_idle.median(), 1.0, 0),
        f(d.iops_idle.max(), 1.0, 0)
    );
    let _ = writeln!(
        o,
        "| during a Cairn full push backup | {} | {} | {} | {} |\n",
        f(d.iops_backup.min(), 1.0, 0),
        f(d.iops_backup.median(), 1.0, 0),
        f(d.iops_backup.max(), 1.0, 0),
        f(ratio(&d.iops_backup, &d.iops_idle), 1.0, 2)
    );

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
    let _ = writeln!(o);
    o
}

fn chrono_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
