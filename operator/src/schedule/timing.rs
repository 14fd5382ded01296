//! When a schedule runs: cron evaluation in a time zone, and CronJob's rules
//! for missed runs (only the newest missed time is made up, and only within
//! `startingDeadlineSeconds`; never a burst).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// A parsed schedule: the cron expression and the zone it is read in.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    cron: Cron,
    zone: Tz,
}

/// Why a schedule cannot be used (reason `InvalidSchedule`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron expression does not parse.
    #[error(
        "schedule {schedule:?} is not a valid cron expression ({detail}): use 5 fields (minute hour day-of-month month day-of-week), a nickname such as @daily, or 6 fields with leading seconds"
    )]
    Cron {
        /// The expression.
        schedule: String,
        /// The parser's complaint.
        detail: String,
    },
    /// The time zone is not an IANA zone name.
    #[error(
        "timeZone {0:?} is not an IANA time zone name (e.g. UTC, Europe/Berlin, America/New_York)"
    )]
    Zone(String),
}

impl CronSchedule {
    /// Parses `schedule` (5 fields, a nickname, or 6 fields with leading
    /// seconds) read in `zone` (IANA name; `None` = UTC).
    pub fn parse(schedule: &str, zone: Option<&str>) -> Result<Self, ScheduleError> {
        let zone = match zone {
            None => Tz::UTC,
            Some(z) => z
                .parse::<Tz>()
                .map_err(|_| ScheduleError::Zone(z.to_string()))?,
        };
        let fields = schedule.split_whitespace().count();
        let nickname = schedule.trim_start().starts_with('@');
        if !nickname && !(5..=6).contains(&fields) {
            return Err(ScheduleError::Cron {
                schedule: schedule.into(),
                detail: format!("{fields} fields"),
            });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(schedule)
            .map_err(|e| ScheduleError::Cron {
                schedule: schedule.into(),
                detail: e.to_string(),
            })?;
        Ok(Self { cron, zone })
    }

    /// The zone the schedule is read in.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// The newest scheduled time at or before `now`.
    pub fn previous(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&now.with_timezone(&self.zone), true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The first scheduled time after `now`.
    pub fn next(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&now.with_timezone(&self.zone), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// What the schedule should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing is due (the newest scheduled time already ran, or none passed).
    No,
    /// Run for this scheduled time.
    Run(DateTime<Utc>),
    /// The newest scheduled time passed more than `startingDeadlineSeconds` ago:
    /// it is skipped (and recorded as handled).
    Missed(DateTime<Utc>),
}

/// CronJob's rule: of the scheduled times after `since` (the newest time
/// already handled, or the schedule's creation) up to `now`, only the newest
/// is run, and only if it is at most `deadline_secs` late.
pub fn due(
    schedule: &CronSchedule,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    deadline_secs: Option<i64>,
) -> Due {
    let Some(newest) = schedule.previous(now) else {
        return Due::No;
    };
    if newest <= since {
        return Due::No;
    }
    match deadline_secs {
        Some(d) if (now - newest).num_seconds() > d => Due::Missed(newest),
        _ => Due::Run(newest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn nexts(s: &CronSchedule, from: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = t(from);
        for _ in 0..n {
            at = s.next(at).unwrap();
            out.push(at.to_rfc3339());
        }
        out
    }

    #[test]
    fn five_fields_in_utc_by_default() {
        let s = CronSchedule::parse("30 2 * * *", None).unwrap();
        assert_eq!(
            nexts(&s, "2026-03-01T00:00:00Z", 2),
            ["2026-03-01T02:30:00+00:00", "2026-03-02T02:30:00+00:00"]
        );
        assert_eq!(
            s.previous(t("2026-03-01T02:30:00Z")),
            Some(t("2026-03-01T02:30:00Z")),
            "a run is due at its own second"
        );
    }

    #[test]
    fn six_fields_have_leading_seconds() {
        let s = CronSchedule::parse("*/20 * * * * *", None).unwrap();
        assert_eq!(
            nexts(&s, "2026-03-01T00:00:05Z", 3),
            [
                "2026-03-01T00:00:20+00:00",
                "2026-03-01T00:00:40+00:00",
                "2026-03-01T00:01:00+00:00"
            ]
        );
    }

    #[test]
    fn bad_input_is_named() {
        for (schedule, zone) in [
            ("* * *", None),
            ("61 * * * *", None),
            ("* * * * * * *", None),
            ("0 2 * * *", Some("Mars/Olympus")),
        ] {
            let e = CronSchedule::parse(schedule, zone).unwrap_err();
            assert!(
                e.to_string().contains(zone.unwrap_or(schedule)),
                "{schedule:?} {zone:?}: {e}"
            );
        }
    }

    #[test]
    fn a_zone_moves_the_instant() {
        let s = CronSchedule::parse("0 2 * * *", Some("Europe/Berlin")).unwrap();
        // Winter: UTC+1.
        assert_eq!(
            nexts(&s, "2026-01-10T00:00:00Z", 1),
            ["2026-01-10T01:00:00+00:00"]
        );
        // Summer: UTC+2.
        assert_eq!(
            nexts(&s, "2026-07-09T12:00:00Z", 1),
            ["2026-07-10T00:00:00+00:00"]
        );
    }

    #[test]
    fn spring_forward_runs_a_skipped_time_once_right_after_the_gap() {
        // Europe/Berlin skips 02:00–03:00 on 2026-03-29.
        let s = CronSchedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            nexts(&s, "2026-03-27T12:00:00Z", 3),
            [
                "2026-03-28T01:30:00+00:00", // 02:30 CET
                "2026-03-29T01:00:00+00:00", // the gap: 03:00 CEST, once
                "2026-03-30T00:30:00+00:00"  // 02:30 CEST
            ]
        );
    }

    #[test]
    fn fall_back_runs_a_repeated_time_once() {
        // Europe/Berlin repeats 02:00–03:00 on 2026-10-25.
        let s = CronSchedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            nexts(&s, "2026-10-24T12:00:00Z", 2),
            [
                "2026-10-25T00:30:00+00:00", // the first 02:30 (CEST) only
                "2026-10-26T01:30:00+00:00"  // 02:30 CET
            ]
        );
        // An hourly schedule runs on every real hour, the repeated one included.
        let hourly = CronSchedule::parse("0 * * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            nexts(&hourly, "2026-10-24T23:30:00Z", 3),
            [
                "2026-10-25T00:00:00+00:00",
                "2026-10-25T01:00:00+00:00",
                "2026-10-25T02:00:00+00:00"
            ]
        );
    }

    #[test]
    fn missed_runs_follow_cronjob() {
        let s = CronSchedule::parse("0 * * * *", None).unwrap();
        let since = t("2026-03-01T00:00:00Z");
        // Nothing passed since the last run.
        assert_eq!(due(&s, since, t("2026-03-01T00:59:59Z"), None), Due::No);
        // Down for five hours: one run, for the newest time, no burst.
        assert_eq!(
            due(&s, since, t("2026-03-01T05:10:00Z"), None),
            Due::Run(t("2026-03-01T05:00:00Z"))
        );
        // Within the deadline it still runs; beyond it, it is skipped.
        assert_eq!(
            due(&s, since, t("2026-03-01T05:10:00Z"), Some(600)),
            Due::Run(t("2026-03-01T05:00:00Z"))
        );
        assert_eq!(
            due(&s, since, t("2026-03-01T05:10:01Z"), Some(600)),
            Due::Missed(t("2026-03-01T05:00:00Z"))
        );
        // Once handled, the same time is not due again.
        assert_eq!(
            due(
                &s,
                t("2026-03-01T05:00:00Z"),
                t("2026-03-01T05:30:00Z"),
                None
            ),
            Due::No
        );
    }
}
