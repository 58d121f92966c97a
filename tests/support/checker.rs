//! The accounting every drill ends with: each accepted id ends in exactly
//! one terminal state, no unknown id appears, every attempt ran once, and
//! the attempts recorded in `job_events` match each job's attempt counter.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Default)]
pub struct Report {
    pub submitted: usize,
    pub succeeded: usize,
    pub dead: usize,
    pub lost: usize,
    pub unknown: usize,
    pub attempts_ran_twice: usize,
    pub duplicate_completions: usize,
    pub attempt_mismatches: usize,
    pub fenced_writes: u64,
    /// Attempts ended by the lease rescuer (worker dead, frozen or cut off).
    pub lease_expiries: i64,
}

impl Report {
    pub fn assert_clean(&self, drill: &str) {
        println!("DRILL {drill}: {self:?}");
        assert_eq!(self.lost, 0, "{drill}: jobs lost: {self:?}");
        assert_eq!(self.unknown, 0, "{drill}: unknown jobs: {self:?}");
        assert_eq!(self.attempts_ran_twice, 0, "{drill}: {self:?}");
        assert_eq!(self.duplicate_completions, 0, "{drill}: {self:?}");
        assert_eq!(self.attempt_mismatches, 0, "{drill}: {self:?}");
        assert_eq!(
            self.succeeded, self.submitted,
            "{drill}: every accepted job succeeds: {self:?}"
        );
    }
}

/// Waits until every accepted job is terminal (or `secs` pass), then counts.
pub async fn check(db: &PgPool, accepted: &[Uuid], secs: u64, fenced_writes: u64) -> Report {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status IN ('succeeded', 'dead', 'cancelled')",
        )
        .bind(accepted)
        .fetch_one(db)
        .await
        .unwrap_or(0);
        if done as usize >= accepted.len() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let jobs: Vec<(Uuid, String, i32)> = sqlx::query_as("SELECT id, status, attempt FROM jobs")
        .fetch_all(db)
        .await
        .expect("jobs");
    let events: Vec<(Uuid, String, i32, i64)> = sqlx::query_as(
        "SELECT job_id, type, attempt, count(*) FROM job_events GROUP BY job_id, type, attempt",
    )
    .fetch_all(db)
    .await
    .expect("events");
    let lease_expiries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs, jsonb_array_elements(errors) e WHERE e->>'message' LIKE 'lease expired%'",
    )
    .fetch_one(db)
    .await
    .expect("lease expiries");
    let accepted_set: HashSet<Uuid> = accepted.iter().copied().collect();
    let by_id: HashMap<Uuid, (&str, i32)> = jobs
        .iter()
        .map(|(id, s, a)| (*id, (s.as_str(), *a)))
        .collect();
    let mut r = Report {
        submitted: accepted.len(),
        fenced_writes,
        lease_expiries,
        ..Report::default()
    };
    for id in accepted {
        match by_id.get(id) {
            Some(("succeeded", _)) => r.succeeded += 1,
            Some(("dead", _)) => r.dead += 1,
            Some(("cancelled", _)) => {}
            _ => r.lost += 1,
        }
    }
    r.unknown = by_id.keys().filter(|id| !accepted_set.contains(id)).count();
    let mut started: HashMap<Uuid, i32> = HashMap::new();
    let mut completions: HashMap<Uuid, i64> = HashMap::new();
    for (id, kind, _attempt, n) in &events {
        match kind.as_str() {
            "job.started" => {
                if *n > 1 {
                    r.attempts_ran_twice += 1;
                }
                *started.entry(*id).or_default() += 1;
            }
            "job.succeeded" => *completions.entry(*id).or_default() += n,
            _ => {}
        }
    }
    r.duplicate_completions = completions.values().filter(|n| **n > 1).count();
    r.attempt_mismatches = by_id
        .iter()
        .filter(|(id, (_, attempt))| started.get(id).copied().unwrap_or(0) != *attempt)
        .count();
    r
}

/// Sums `stevedore_fenced_writes_total` from a process's `/metrics`.
pub async fn fenced_from_metrics(port: u16) -> u64 {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("stevedore_fenced_writes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Sums every series of metric `name` from a process's `/metrics` (0 when
/// the process does not answer).
pub async fn metric_sum(port: u16, name: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
