//! Cron schedules, with no I/O: what a schedule is ([`ScheduleRequest`],
//! [`Schedule`]), when it fires ([`Plan`], five or six fields, seconds
//! optional, in an IANA time zone) and what one firing does ([`fire`]): the
//! latest fire time that is due makes one job, and the next fire time is
//! the first one after now, so a dispatcher that was down runs a missed
//! schedule once rather than once per missed time.

use std::str::FromStr as _;

use chrono::{DateTime, SubsecRound as _, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::{Deserialize, Serialize};
use stevedore_handler::FieldError;
use utoipa::ToSchema;
use uuid::Uuid;

use super::job::{NewJob, SubmitRequest};
use crate::kinds::Kinds;

/// Longest schedule name; names appear in URLs and on every job they make.
const NAME_MAX: usize = 100;
/// A day: more jitter than that is a different schedule.
pub const JITTER_MAX: u32 = 86_400;

/// `POST /v1/schedules` body.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({
    "name": "nightly-probe",
    "cron": "0 3 * * *",
    "timezone": "Europe/Berlin",
    "job": {"kind": "probe", "payload": {}}
})))]
pub struct ScheduleRequest {
    /// 1 to 100 letters, digits, `-`, `_` and `.`; unique within the tenant.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,100}$")]
    pub name: String,
    /// Five fields (minute hour day month weekday) or six with seconds first.
    pub cron: String,
    /// IANA name such as `Europe/Berlin`; default `UTC`.
    pub timezone: Option<String>,
    /// Each job runs up to this many seconds after its fire time (0..=86400).
    #[schema(maximum = 86_400)]
    pub jitter_secs: Option<u32>,
    /// The job each fire submits, as `POST /v1/jobs` takes it (without
    /// `run_at`, `idempotency_key` and `webhook`).
    pub job: SubmitRequest,
}

/// A stored schedule, as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Schedule {
    pub name: String,
    pub tenant: String,
    pub cron: String,
    pub timezone: String,
    pub jitter_secs: u32,
    pub job: SubmitRequest,
    pub paused: bool,
    /// When it fires next (none while paused, or when the pattern never
    /// matches again).
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_fire_at: Option<DateTime<Utc>>,
    /// The job the last fire made.
    pub last_job_id: Option<Uuid>,
    /// Why the last fire made no job, when it made none.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A checked request, ready to store.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub name: String,
    pub tenant: String,
    pub cron: String,
    pub timezone: String,
    pub jitter_secs: u32,
    pub job: SubmitRequest,
    /// The first fire time after the request was made.
    pub next_fire_at: Option<DateTime<Utc>>,
}

impl NewSchedule {
    /// Checks every field (the job as a submit would be checked) and works
    /// out the first fire time after `now`.
    pub fn parse(
        req: ScheduleRequest,
        tenant: &str,
        kinds: &Kinds,
        now: DateTime<Utc>,
    ) -> Result<Self, FieldError> {
        let name_ok = !req.name.is_empty()
            && req.name.len() <= NAME_MAX
            && req
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(FieldError::new(
                "name",
                format!("1 to {NAME_MAX} letters, digits, '-', '_' or '.'"),
            ));
        }
        let timezone = req.timezone.unwrap_or_else(|| "UTC".to_owned());
        let plan = Plan::parse(&req.cron, &timezone)?;
        let jitter_secs = req.jitter_secs.unwrap_or(0);
        if jitter_secs > JITTER_MAX {
            return Err(FieldError::new(
                "jitter_secs",
                format!("must be at most {JITTER_MAX}"),
            ));
        }
        // Each fire sets these itself; a fixed key would make every fire
        // after the first return the first job.
        for (set, field, why) in [
            (
                req.job.run_at.is_some(),
                "job.run_at",
                "each fire sets the job's run time",
            ),
            (
                req.job.idempotency_key.is_some(),
                "job.idempotency_key",
                "each fire makes its own job",
            ),
            (
                req.job.webhook.is_some(),
                "job.webhook",
                "register a webhook for the kind (POST /v1/webhooks) instead",
            ),
        ] {
            if set {
                return Err(FieldError::new(
                    field,
                    format!("not allowed on a schedule: {why}"),
                ));
            }
        }
        let parsed = NewJob::parse(req.job.clone(), kinds)
            .map_err(|e| FieldError::new(format!("job.{}", e.field), e.message))?;
        // Each fire builds its job without the kind's handler: keep the key
        // the kind gives (a scrape's site) in the stored body.
        let mut job = req.job;
        job.concurrency_key = parsed.concurrency_key;
        let next_fire_at = plan.next_after(now);
        if next_fire_at.is_none() {
            return Err(FieldError::new(
                "cron",
                "the pattern never matches a future time",
            ));
        }
        Ok(Self {
            name: req.name,
            tenant: tenant.to_owned(),
            cron: req.cron,
            timezone,
            jitter_secs,
            job,
            next_fire_at,
        })
    }
}

/// When a schedule fires: its pattern in its time zone.
#[derive(Debug, Clone)]
pub struct Plan {
    cron: Cron,
    tz: chrono_tz::Tz,
}

impl Plan {
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, FieldError> {
        let tz = chrono_tz::Tz::from_str(timezone).map_err(|_| {
            FieldError::new(
                "timezone",
                "an IANA time zone name such as Europe/Berlin or UTC",
            )
        })?;
        let fields = cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(FieldError::new(
                "cron",
                "five fields (minute hour day month weekday), or six with seconds first",
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| FieldError::new("cron", e.to_string()))?;
        Ok(Self { cron, tz })
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // croner keeps the start's fraction of a second; fire times are
        // whole seconds.
        self.cron
            .find_next_occurrence(&t.trunc_subsecs(0).with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The latest fire time at or before `now` that is not before `since`.
    pub fn latest_due(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if since > now {
            return None;
        }
        let latest = self
            .cron
            .find_previous_occurrence(&now.trunc_subsecs(0).with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc));
        // `since` was itself a fire time, so one at or after it exists; the
        // fallback only guards against a pattern the two searches disagree on.
        Some(latest.filter(|l| *l >= since).unwrap_or(since))
    }
}

/// What one firing of a due schedule does.
#[derive(Debug, Clone)]
pub struct Firing {
    /// The job to submit, none when its body no longer passes the checks
    /// (`error` says why).
    pub job: Option<NewJob>,
    pub fire_at: Option<DateTime<Utc>>,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// Fires `s`, due at `now`: one job for the latest due fire time, run
/// `jitter` after it, and the first fire time after `now` as the next.
/// `jitter` is drawn by the caller (0..=jitter_secs) so this stays pure.
pub fn fire(s: &Schedule, now: DateTime<Utc>, jitter: chrono::Duration) -> Firing {
    let plan = match Plan::parse(&s.cron, &s.timezone) {
        Ok(p) => p,
        Err(e) => {
            return Firing {
                job: None,
                fire_at: None,
                next_fire_at: None,
                error: Some(format!("{}: {}", e.field, e.message)),
            }
        }
    };
    let fire_at = s.next_fire_at.and_then(|since| plan.latest_due(since, now));
    let next_fire_at = plan.next_after(now);
    let Some(at) = fire_at else {
        return Firing {
            job: None,
            fire_at: None,
            next_fire_at,
            error: None,
        };
    };
    match NewJob::checked(s.job.clone()) {
        Ok(mut job) => {
            job.tenant.clone_from(&s.tenant);
            job.run_at = Some(at + jitter);
            job.scheduled = Some((s.name.clone(), at));
            Firing {
                job: Some(job),
                fire_at: Some(at),
                next_fire_at,
                error: None,
            }
        }
        Err(e) => Firing {
            job: None,
            fire_at: Some(at),
            next_fire_at,
            error: Some(format!("job.{}: {}", e.field, e.message)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test time")
            .with_timezone(&Utc)
    }

    fn schedule(cron: &str, tz: &str, next: &str) -> Schedule {
        Schedule {
            name: "nightly".into(),
            tenant: "acme".into(),
            cron: cron.into(),
            timezone: tz.into(),
            jitter_secs: 0,
            job: serde_json::from_value(serde_json::json!({"kind": "probe", "payload": {}}))
                .expect("request"),
            paused: false,
            next_fire_at: Some(utc(next)),
            last_fire_at: None,
            last_job_id: None,
            last_error: None,
            created_at: utc(next),
            updated_at: utc(next),
        }
    }

    #[test]
    fn five_and_six_fields_parse_and_other_counts_name_the_field() {
        assert!(Plan::parse("*/5 * * * *", "UTC").is_ok());
        assert!(Plan::parse("*/10 * * * * *", "UTC").is_ok());
        for bad in ["* * * *", "0 0 0 1 1 * 2030", "61 * * * *", "banana"] {
            let e = Plan::parse(bad, "UTC").expect_err(bad);
            assert_eq!(e.field, "cron", "{bad}");
        }
        assert_eq!(
            Plan::parse("* * * * *", "Mars/Olympus")
                .expect_err("zone")
                .field,
            "timezone"
        );
    }

    #[test]
    fn seconds_fire_every_second() {
        let p = Plan::parse("* * * * * *", "UTC").expect("plan");
        let t = utc("2026-12-06T10:00:00.400Z");
        assert_eq!(p.next_after(t), Some(utc("2026-12-06T10:00:01Z")));
        let p = Plan::parse("30 * * * * *", "UTC").expect("plan");
        assert_eq!(p.next_after(t), Some(utc("2026-12-06T10:00:30Z")));
    }

    #[test]
    fn after_downtime_the_latest_missed_fire_runs_once() {
        // Every 5 minutes; due since 08:00, the dispatcher back at 10:07:12.
        let s = schedule("*/5 * * * *", "UTC", "2026-12-06T08:00:00Z");
        let f = fire(&s, utc("2026-12-06T10:07:12Z"), chrono::Duration::zero());
        assert_eq!(f.fire_at, Some(utc("2026-12-06T10:05:00Z")));
        assert_eq!(f.next_fire_at, Some(utc("2026-12-06T10:10:00Z")));
        let job = f.job.expect("a job");
        assert_eq!(job.tenant, "acme");
        assert_eq!(
            job.scheduled,
            Some(("nightly".into(), utc("2026-12-06T10:05:00Z")))
        );
        assert_eq!(job.run_at, Some(utc("2026-12-06T10:05:00Z")));
    }

    #[test]
    fn a_fire_exactly_on_time_is_that_time() {
        let s = schedule("* * * * * *", "UTC", "2026-12-06T10:00:01Z");
        let f = fire(&s, utc("2026-12-06T10:00:01Z"), chrono::Duration::zero());
        assert_eq!(f.fire_at, Some(utc("2026-12-06T10:00:01Z")));
        assert_eq!(f.next_fire_at, Some(utc("2026-12-06T10:00:02Z")));
    }

    #[test]
    fn not_yet_due_makes_nothing() {
        let s = schedule("0 3 * * *", "UTC", "2026-12-07T03:00:00Z");
        let f = fire(&s, utc("2026-12-06T10:00:00Z"), chrono::Duration::zero());
        assert!(f.job.is_none() && f.fire_at.is_none());
    }

    #[test]
    fn jitter_delays_the_run_not_the_fire_time() {
        let s = schedule("0 * * * *", "UTC", "2026-12-06T10:00:00Z");
        let f = fire(
            &s,
            utc("2026-12-06T10:00:00.2Z"),
            chrono::Duration::seconds(42),
        );
        let job = f.job.expect("a job");
        assert_eq!(
            job.scheduled.map(|(_, at)| at),
            Some(utc("2026-12-06T10:00:00Z"))
        );
        assert_eq!(job.run_at, Some(utc("2026-12-06T10:00:42Z")));
    }

    #[test]
    fn time_zones_follow_daylight_saving() {
        // 03:30 in Berlin is 01:30 UTC in summer (CEST) and 02:30 in winter.
        let p = Plan::parse("30 3 * * *", "Europe/Berlin").expect("plan");
        assert_eq!(
            p.next_after(utc("2026-07-01T00:00:00Z")),
            Utc.with_ymd_and_hms(2026, 7, 1, 1, 30, 0).single()
        );
        assert_eq!(
            p.next_after(utc("2026-12-01T00:00:00Z")),
            Utc.with_ymd_and_hms(2026, 12, 1, 2, 30, 0).single()
        );
        // 02:30 does not exist on 2026-03-29 in Berlin: it fires once, just
        // after the gap, rather than never.
        let p = Plan::parse("30 2 * * *", "Europe/Berlin").expect("plan");
        let next = p.next_after(utc("2026-03-28T12:00:00Z")).expect("next");
        assert_eq!(
            next.date_naive(),
            chrono::NaiveDate::from_ymd_opt(2026, 3, 29).expect("date")
        );
    }
}
