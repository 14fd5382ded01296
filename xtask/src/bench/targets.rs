//! The targets table: every target of the issues, judged from one run.
//!
//! A speed target is judged twice, from the medians and from the ratio of the
//! minimums (each side's best run), and is met only when both meet it. A time
//! or size limit is judged from the median; the worst run is shown beside it.
//! No target is called met when the 1-minute load average exceeded
//! [`QUIET_LOAD`] at the start of its section, unless `--allow-noisy` was given.

use std::fmt::Write;

use super::Samples;
use super::data::FRACTIONS;
use super::report::Results;

/// The 1-minute load average above which a section's targets are not called met.
pub const QUIET_LOAD: f64 = 0.5;

/// One target and what the run measured for it.
pub struct Target {
    /// Bench section whose start load decides whether "met" may be written.
    pub section: &'static str,
    /// The target, as the issue states it.
    pub what: String,
    /// The median figure.
    pub median: String,
    /// The ratio of minimums (speed) or the worst run (limits).
    pub second: String,
    /// Whether the median meets it (`None`: not measured).
    pub met_median: Option<bool>,
    /// Whether the second figure meets it (`None`: not applicable).
    pub met_second: Option<bool>,
}

/// `cairn` at least `factor`× as fast as `peer`: peer time ÷ Cairn time.
pub fn speed(
    section: &'static str,
    what: &str,
    cairn: &Samples,
    peer: &Samples,
    factor: f64,
) -> Target {
    let med = peer.median().zip(cairn.median()).map(|(p, c)| p / c);
    let min = peer.min().zip(cairn.min()).map(|(p, c)| p / c);
    Target {
        section,
        what: what.into(),
        median: fmt(med, "×"),
        second: format!("{} (ratio of minimums)", fmt(min, "×")),
        met_median: med.map(|v| v >= factor),
        met_second: Some(min.is_some_and(|v| v >= factor)),
    }
}

/// `cairn` takes at most `limit` seconds more than `peer`.
pub fn over(
    section: &'static str,
    what: &str,
    cairn: &Samples,
    peer: &Samples,
    limit: f64,
) -> Target {
    let med = cairn.median().zip(peer.median()).map(|(c, p)| c - p);
    let min = cairn.min().zip(peer.min()).map(|(c, p)| c - p);
    Target {
        section,
        what: what.into(),
        median: med.map_or("–".into(), |v| format!("{v:+.2} s")),
        second: format!(
            "{} (difference of minimums)",
            min.map_or("–".into(), |v| format!("{v:+.2} s"))
        ),
        met_median: med.map(|v| v <= limit),
        met_second: Some(min.is_some_and(|v| v <= limit)),
    }
}

/// Samples whose median must stay at or below `limit` (shown × `scale` in `unit`).
pub fn at_most(
    section: &'static str,
    what: &str,
    s: &Samples,
    limit: f64,
    scale: f64,
    unit: &str,
) -> Target {
    let show = |v: Option<f64>| v.map_or("–".into(), |v| format!("{:.2} {unit}", v * scale));
    Target {
        section,
        what: what.into(),
        median: show(s.median()),
        second: format!("{} (worst run)", show(s.max())),
        met_median: s.median().map(|v| v <= limit),
        met_second: None,
    }
}

/// A single figure and its verdict.
pub fn single(section: &'static str, what: &str, measured: String, met: Option<bool>) -> Target {
    Target {
        section,
        what: what.into(),
        median: measured,
        second: "–".into(),
        met_median: met,
        met_second: None,
    }
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    v.map_or("–".into(), |v| format!("{v:.3}{unit}"))
}

/// The verdict cell: met only when every judged figure meets the target and
/// the section started quiet (or `--allow-noisy`).
pub fn verdict(t: &Target, r: &Results) -> String {
    let load = r.loads.get(t.section).and_then(|l| l.before);
    match (t.met_median, t.met_second) {
        (None, _) => "not measured".into(),
        (Some(true), None | Some(true)) => match load {
            Some(l) if l > QUIET_LOAD && !r.allow_noisy => {
                format!("not claimed: load {l:.2} > {QUIET_LOAD} when the section started")
            }
            Some(l) if l > QUIET_LOAD => format!("**met** (noisy: load {l:.2}, `--allow-noisy`)"),
            _ => "**met**".into(),
        },
        (Some(true), Some(false)) => "**missed** (median met, minimums not)".into(),
        (Some(false), _) => "**missed**".into(),
    }
}

/// Every target, in the order of the sections.
pub fn all(r: &Results) -> Vec<Target> {
    let d = &r.data;
    let p = &r.peer;
    let c = &r.control;
    let mut t = vec![
        speed(
            "control",
            "full push, `kubectl apply` → `Succeeded`, ≥ 0.95× `qemu-img convert -t none -T none`",
            &c.e2e_full,
            &d.full_convert,
            0.95,
        ),
        speed(
            "data",
            "full push, library path, not slower than QEMU's own job (≥ 0.95×)",
            &d.full_cairn,
            &d.full_qemu,
            0.95,
        ),
        speed(
            "control",
            "full push end to end ≥ 2× faster than virtnbdbackup's command",
            &c.e2e_full,
            &p.full,
            2.0,
        ),
        over(
            "control",
            "incremental 1 %, `kubectl apply` → `Succeeded`, ≤ 0.5 s over QEMU's own job",
            &c.e2e_inc,
            &d.inc_qemu[0],
            0.5,
        ),
        speed(
            "control",
            "incremental 1 % end to end ≥ 2× faster than virtnbdbackup's command",
            &c.e2e_inc,
            &p.inc[0],
            2.0,
        ),
        over(
            "data",
            "incremental 1 %, library path, ≤ 0.3 s over QEMU's own job",
            &d.inc_cairn[0],
            &d.inc_qemu[0],
            0.3,
        ),
    ];
    for (i, frac) in FRACTIONS.iter().enumerate().skip(1) {
        t.push(speed(
            "data",
            &format!(
                "incremental {:.0} %, library path, not slower than QEMU's own job (≥ 0.95×)",
                frac * 100.0
            ),
            &d.inc_cairn[i],
            &d.inc_qemu[i],
            0.95,
        ));
    }
    t.push(speed(
        "data",
        "restore of a chain ≥ 0.9× `qemu-img convert` with the same cache flags",
        &d.restore_cairn,
        &d.restore_convert,
        0.9,
    ));
    let lat = &c.checkpoint_latency;
    t.push(single(
        "control",
        "checkpoint apply → Ready p50 ≤ 300 ms",
        format!("{:.0} ms", lat.percentile(50.0).unwrap_or(f64::NAN) * 1e3),
        lat.percentile(50.0).map(|v| v <= 0.3),
    ));
    t.push(single(
        "control",
        "checkpoint apply → Ready p99 ≤ 1 s",
        format!("{:.0} ms", lat.percentile(99.0).unwrap_or(f64::NAN) * 1e3),
        lat.percentile(99.0).map(|v| v <= 1.0),
    ));
    for (what, measured, met) in super::routing::targets(&r.routing) {
        t.push(single("routing", &what, measured, met));
    }
    for (what, measured, met) in super::fleet::targets(&r.fleet) {
        t.push(single("fleet", &what, measured, met));
    }
    t.extend(super::repository::targets(&r.repository, c));
    t.extend(super::instant::targets(&r.instant));
    t.extend(super::guest::targets(&r.guest));
    t
}

/// The `## Targets` section.
pub fn render(r: &Results) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## Targets\n\nSpeed targets are judged from the medians and from the ratio of the minimums (each side's best run); both must meet the target. Limits are judged from the median, the worst run shown beside it. A target is not called met when the 1-minute load average exceeded {QUIET_LOAD} at the start of its section{}.\n",
        if r.allow_noisy {
            " — this run was made with `--allow-noisy`, so such targets say **met (noisy)**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "| target | median | second figure | verdict |\n|---|---|---|---|"
    );
    for t in all(r)
        .into_iter()
        .filter(|t| r.sections.iter().any(|s| s == t.section) || r.sections.is_empty())
    {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            t.what,
            t.median,
            t.second,
            verdict(&t, r)
        );
    }
    let _ = writeln!(o);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::SectionLoad;

    fn results(load: f64, allow_noisy: bool) -> Results {
        let mut r = Results {
            allow_noisy,
            ..Default::default()
        };
        r.loads.insert(
            "data".into(),
            SectionLoad {
                waited: 0.0,
                before: Some(load),
                after: None,
            },
        );
        r
    }

    #[test]
    fn a_speed_target_needs_the_medians_and_the_minimums() {
        let quiet = results(0.1, false);
        // Medians 10 s vs 10 s (1.0×); minimums 9 s vs 6 s: Cairn's best run is slower.
        let cairn = Samples(vec![9.0, 10.0, 11.0]);
        let peer = Samples(vec![6.0, 10.0, 12.0]);
        let t = speed("data", "x", &cairn, &peer, 0.95);
        assert_eq!(t.met_median, Some(true));
        assert_eq!(t.met_second, Some(false));
        assert!(verdict(&t, &quiet).starts_with("**missed**"));
        let t = speed("data", "x", &peer, &cairn, 0.95);
        assert_eq!(verdict(&t, &quiet), "**met**");
        let t = speed("data", "x", &cairn, &Samples(vec![]), 0.95);
        assert_eq!(verdict(&t, &quiet), "not measured");
    }

    #[test]
    fn met_is_not_claimed_when_the_section_started_under_load() {
        let t = single("data", "x", "1".into(), Some(true));
        assert!(verdict(&t, &results(0.9, false)).starts_with("not claimed: load 0.90"));
        assert!(verdict(&t, &results(0.9, true)).contains("noisy"));
        assert_eq!(verdict(&t, &results(0.5, false)), "**met**");
        // A miss is a miss whatever the load.
        let t = single("data", "x", "1".into(), Some(false));
        assert_eq!(verdict(&t, &results(3.0, false)), "**missed**");
    }

    #[test]
    fn over_compares_medians_and_minimums() {
        let cairn = Samples(vec![0.5, 0.6, 0.7]);
        let qemu = Samples(vec![0.2, 0.2, 0.3]);
        let t = over("data", "x", &cairn, &qemu, 0.5);
        assert_eq!(t.median, "+0.40 s");
        assert_eq!(verdict(&t, &results(0.0, false)), "**met**");
        let t = over("data", "x", &cairn, &qemu, 0.35);
        assert!(verdict(&t, &results(0.0, false)).starts_with("**missed**"));
    }
}
