//! Which backups a schedule keeps: Proxmox Backup Server's prune rules
//! (`keep-last`, `keep-hourly`, … `keep-yearly`), then the chain rule.
//!
//! Each option, in that order, walks the backups newest first and keeps the
//! newest backup of each period (hour, day, ISO week, month, year in the
//! schedule's time zone) until it kept N; a period that an earlier option
//! already covered is skipped, so every option only reaches further into the
//! past. No option (or only zeros) keeps everything.

use std::collections::HashSet;

use cairn_api::Retention;
use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;

/// Indices (into `times`, newest first) of the backups `retention` keeps.
/// `times` must be sorted newest first.
pub fn select(times: &[DateTime<Utc>], retention: &Retention, zone: Tz) -> HashSet<usize> {
    let opts = [
        (retention.keep_last, Period::Instant),
        (retention.keep_hourly, Period::Hour),
        (retention.keep_daily, Period::Day),
        (retention.keep_weekly, Period::Week),
        (retention.keep_monthly, Period::Month),
        (retention.keep_yearly, Period::Year),
    ];
    if opts.iter().all(|(n, _)| n.unwrap_or(0) <= 0) {
        return (0..times.len()).collect();
    }
    let mut decided: HashSet<usize> = HashSet::new();
    let mut kept: HashSet<usize> = HashSet::new();
    for (keep, period) in opts {
        let Some(keep) = keep else { continue };
        let keep = usize::try_from(keep).unwrap_or(0);
        let key = |i: usize| period.key(times[i], zone);
        let covered: HashSet<String> = kept.iter().map(|&i| key(i)).collect();
        let mut selected: HashSet<String> = HashSet::new();
        for i in 0..times.len() {
            if decided.contains(&i) {
                continue;
            }
            let k = key(i);
            if covered.contains(&k) {
                continue;
            }
            if selected.contains(&k) {
                // Not the newest of its period: removed, and not looked at again.
                decided.insert(i);
                continue;
            }
            if selected.len() >= keep {
                break;
            }
            selected.insert(k);
            decided.insert(i);
            kept.insert(i);
        }
    }
    kept
}

#[derive(Clone, Copy)]
enum Period {
    Instant,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    fn key(self, t: DateTime<Utc>, zone: Tz) -> String {
        let l = t.with_timezone(&zone);
        match self {
            Self::Instant => t.timestamp_millis().to_string(),
            Self::Hour => format!("{}/{}/{}/{}", l.year(), l.month(), l.day(), l.hour()),
            Self::Day => format!("{}/{}/{}", l.year(), l.month(), l.day()),
            Self::Week => {
                let w = l.iso_week();
                format!("{}/{}", w.year(), w.week())
            }
            Self::Month => format!("{}/{}", l.year(), l.month()),
            Self::Year => l.year().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proxmox Backup Server's own prune tests (tests/prune.rs): the list,
    /// the options, and the times kept (or removed), oldest first.
    fn kept(list: &[&str], r: Retention) -> Vec<String> {
        let mut times: Vec<DateTime<Utc>> = list
            .iter()
            .map(|s| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
            .collect();
        times.sort_by(|a, b| b.cmp(a));
        let keep = select(&times, &r, Tz::UTC);
        let mut out: Vec<String> = (0..times.len())
            .filter(|i| keep.contains(i))
            .map(|i| times[i].format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .collect();
        out.reverse();
        out
    }

    fn removed(list: &[&str], r: Retention) -> Vec<String> {
        let k = kept(list, r);
        list.iter()
            .map(|s| s.to_string())
            .filter(|s| !k.contains(s))
            .collect()
    }

    fn r(f: impl FnOnce(&mut Retention)) -> Retention {
        let mut r = Retention::default();
        f(&mut r);
        r
    }

    const SIMPLE: &[&str] = &[
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
        "2019-12-04T12:59:15Z",
    ];

    #[test]
    fn proxmox_prune_simple() {
        let cases: Vec<(Retention, Vec<&str>)> = vec![
            (r(|r| r.keep_last = Some(4)), vec![]),
            (r(|r| r.keep_last = Some(3)), vec!["2019-12-02T11:59:15Z"]),
            (
                r(|r| r.keep_last = Some(2)),
                vec!["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z"],
            ),
            (
                r(|r| r.keep_last = Some(1)),
                vec![
                    "2019-12-02T11:59:15Z",
                    "2019-12-03T11:59:15Z",
                    "2019-12-04T11:59:15Z",
                ],
            ),
            (
                r(|r| {
                    r.keep_last = Some(2);
                    r.keep_daily = Some(2);
                }),
                vec![],
            ),
            (r(|r| r.keep_daily = Some(3)), vec!["2019-12-04T11:59:15Z"]),
            (
                r(|r| r.keep_daily = Some(2)),
                vec!["2019-12-02T11:59:15Z", "2019-12-04T11:59:15Z"],
            ),
            (
                r(|r| r.keep_weekly = Some(5)),
                vec![
                    "2019-12-02T11:59:15Z",
                    "2019-12-03T11:59:15Z",
                    "2019-12-04T11:59:15Z",
                ],
            ),
            (
                r(|r| {
                    r.keep_daily = Some(1);
                    r.keep_weekly = Some(5);
                }),
                vec![
                    "2019-12-02T11:59:15Z",
                    "2019-12-03T11:59:15Z",
                    "2019-12-04T11:59:15Z",
                ],
            ),
            (
                r(|r| r.keep_monthly = Some(6)),
                vec![
                    "2019-12-02T11:59:15Z",
                    "2019-12-03T11:59:15Z",
                    "2019-12-04T11:59:15Z",
                ],
            ),
            (
                r(|r| r.keep_yearly = Some(7)),
                vec![
                    "2019-12-02T11:59:15Z",
                    "2019-12-03T11:59:15Z",
                    "2019-12-04T11:59:15Z",
                ],
            ),
            (
                r(|r| {
                    r.keep_weekly = Some(5);
                    r.keep_monthly = Some(6);
                    r.keep_yearly = Some(7);
                }),
                vec![
                    "2019-12-02T11:59:15Z",
                    "2019-12-03T11:59:15Z",
                    "2019-12-04T11:59:15Z",
                ],
            ),
        ];
        for (retention, want) in cases {
            assert_eq!(removed(SIMPLE, retention.clone()), want, "{retention:?}");
        }
    }

    #[test]
    fn proxmox_prune_simple2() {
        let list = &[
            "2018-11-15T11:59:15Z",
            "2019-11-15T11:59:15Z",
            "2019-11-21T11:59:15Z",
            "2019-11-22T11:59:15Z",
            "2019-11-29T11:59:15Z",
            "2019-12-01T11:59:15Z",
            "2019-12-02T11:59:15Z",
            "2019-12-03T11:59:15Z",
            "2019-12-04T11:59:15Z",
        ];
        let cases: Vec<(Retention, Vec<&str>)> = vec![
            (r(|r| r.keep_daily = Some(1)), vec!["2019-12-04T11:59:15Z"]),
            (
                r(|r| {
                    r.keep_last = Some(1);
                    r.keep_daily = Some(1);
                }),
                vec!["2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"],
            ),
            (
                r(|r| {
                    r.keep_daily = Some(1);
                    r.keep_weekly = Some(1);
                }),
                vec!["2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"],
            ),
            (
                r(|r| {
                    r.keep_daily = Some(1);
                    r.keep_weekly = Some(1);
                    r.keep_monthly = Some(1);
                }),
                vec![
                    "2019-11-22T11:59:15Z",
                    "2019-12-01T11:59:15Z",
                    "2019-12-04T11:59:15Z",
                ],
            ),
            (
                r(|r| {
                    r.keep_monthly = Some(1);
                    r.keep_yearly = Some(1);
                }),
                vec!["2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"],
            ),
        ];
        for (retention, want) in cases {
            assert_eq!(kept(list, retention.clone()), want, "{retention:?}");
        }
    }

    #[test]
    fn proxmox_prune_hourly() {
        let list = &[
            "2019-11-15T09:39:15Z",
            "2019-11-15T10:49:15Z",
            "2019-11-15T10:59:15Z",
            "2019-11-15T11:39:15Z",
            "2019-11-15T11:49:15Z",
            "2019-11-15T11:59:15Z",
        ];
        assert_eq!(
            removed(list, r(|r| r.keep_hourly = Some(3))),
            [
                "2019-11-15T10:49:15Z",
                "2019-11-15T11:39:15Z",
                "2019-11-15T11:49:15Z"
            ]
        );
        assert_eq!(
            kept(list, r(|r| r.keep_hourly = Some(2))),
            ["2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"]
        );
    }

    /// The example table of docs/operations.md ("Backup schedules").
    #[test]
    fn the_documented_example() {
        let days: Vec<String> = (0..17)
            .map(|i| {
                (DateTime::parse_from_rfc3339("2019-11-18T12:00:00Z").unwrap()
                    + chrono::Duration::days(i))
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
            })
            .collect();
        let list: Vec<&str> = days.iter().map(String::as_str).collect();
        assert_eq!(
            kept(
                &list,
                r(|r| {
                    r.keep_daily = Some(3);
                    r.keep_weekly = Some(2);
                    r.keep_monthly = Some(2);
                })
            ),
            [
                "2019-11-24T12:00:00Z",
                "2019-12-01T12:00:00Z",
                "2019-12-02T12:00:00Z",
                "2019-12-03T12:00:00Z",
                "2019-12-04T12:00:00Z"
            ]
        );
    }

    #[test]
    fn no_option_or_only_zeros_keeps_everything() {
        assert_eq!(kept(SIMPLE, Retention::default()), SIMPLE);
        assert_eq!(
            kept(
                SIMPLE,
                r(|r| {
                    r.keep_last = Some(0);
                    r.keep_daily = Some(0);
                })
            ),
            SIMPLE
        );
    }

    #[test]
    fn periods_are_read_in_the_time_zone() {
        // 23:30 UTC on Dec 2 is Dec 3 in Berlin: two different days there, one in UTC.
        let times: Vec<DateTime<Utc>> = ["2019-12-02T23:30:00Z", "2019-12-02T12:00:00Z"]
            .iter()
            .map(|s| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
            .collect();
        let daily = r(|r| r.keep_daily = Some(5));
        assert_eq!(select(&times, &daily, Tz::UTC).len(), 1);
        assert_eq!(select(&times, &daily, Tz::Europe__Berlin).len(), 2);
    }
}
