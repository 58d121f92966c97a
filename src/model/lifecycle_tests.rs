//! The rules over every pair of state and outcome, without a database.

use super::*;

const B: Backoff = Backoff {
    base_ms: 100,
    max_ms: 1_000,
};

fn state(status: JobStatus, attempt: i32, limit: i32) -> JobState {
    JobState {
        id: Uuid::nil(),
        status,
        attempt,
        attempt_limit: limit,
        max_attempts: 3,
        backoff: B,
        cancel_requested: false,
    }
}

fn outcomes() -> Vec<Outcome> {
    vec![
        Outcome::Succeeded {
            result: serde_json::json!({"ok": true}),
            children: vec![],
        },
        Outcome::Failed(JobError::retryable("flaky")),
        Outcome::Failed(JobError::permanent("bad input")),
        Outcome::Failed(JobError::snooze("not ready", Duration::from_secs(5))),
        Outcome::HandedBack,
        Outcome::StoppedForCancel,
        Outcome::LeaseExpired,
        Outcome::Cancel,
        Outcome::Replay,
    ]
}

/// The whole table: which outcome may happen in which state, and where it
/// leads (for a job on attempt 1 of 3 with no cancel requested).
#[test]
fn every_state_and_outcome_pair_is_decided() {
    use JobStatus::*;
    let now = Utc::now();
    for from in JobStatus::ALL {
        for outcome in outcomes() {
            let name = outcome.name();
            let permanent = matches!(&outcome, Outcome::Failed(JobError::Permanent { .. }));
            let expected: Option<JobStatus> = match (from, &outcome) {
                (Running, Outcome::Succeeded { .. }) => Some(Succeeded),
                (Running, Outcome::Failed(_)) if permanent => Some(Dead),
                (Running, Outcome::Failed(_)) => Some(Retrying),
                (Running, Outcome::HandedBack) => Some(Queued),
                (Running, Outcome::StoppedForCancel) => Some(Cancelled),
                (Running, Outcome::LeaseExpired) => Some(Retrying),
                (Queued | Retrying, Outcome::Cancel) => Some(Cancelled),
                (Running, Outcome::Cancel) => Some(Running),
                (Dead, Outcome::Replay) => Some(Queued),
                _ => None,
            };
            let got = next(&state(from, 1, 3), outcome, now);
            match (expected, got) {
                (Some(to), Ok(t)) => {
                    assert_eq!(t.to, to, "{name} from {from:?}");
                    assert_eq!((t.from, t.attempt), (from, 1), "fenced on the state read");
                    let event = (from != to).then(|| EventType::entering(to));
                    assert_eq!(t.event, event, "{name} from {from:?}");
                    let enqueued = matches!(to, Queued | Retrying);
                    assert_eq!(t.enqueue.is_some(), enqueued, "{name} from {from:?}");
                }
                (None, Err(e)) => assert_eq!(
                    e,
                    Illegal {
                        from,
                        outcome: name
                    }
                ),
                (want, got) => panic!("{name} from {from:?}: expected {want:?}, got {got:?}"),
            }
        }
    }
}

#[test]
fn success_keeps_the_result_and_its_children() {
    let child = NewJob {
        id: Uuid::now_v7(),
        kind: "probe".into(),
        payload: serde_json::json!({}),
        max_attempts: 1,
        timeout_secs: 1,
        backoff: B,
        run_at: None,
        idempotency_key: None,
        parent_id: Some(Uuid::nil()),
        webhook: None,
        priority: 0,
        tenant: "default".into(),
        scheduled: None,
        concurrency_key: None,
        traceparent: None,
    };
    let t = next(
        &state(JobStatus::Running, 1, 3),
        Outcome::Succeeded {
            result: serde_json::json!(7),
            children: vec![child.clone()],
        },
        Utc::now(),
    )
    .expect("legal");
    assert_eq!(t.result, Some(serde_json::json!(7)));
    assert_eq!(t.children.len(), 1);
    assert_eq!(t.children[0].id, child.id);
    assert!(t.error.is_none() && t.next_run_at.is_none());
}

#[test]
fn ceiling_doubles_then_caps() {
    let ms: Vec<u128> = (1..=6).map(|a| ceiling(B, a).as_millis()).collect();
    assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
}

#[test]
fn delay_is_jittered_below_the_ceiling() {
    let draws: Vec<Duration> = (0..200).map(|_| retry_delay(B, 3)).collect();
    assert!(draws.iter().all(|d| *d <= Duration::from_millis(400)));
    let distinct: std::collections::HashSet<_> = draws.iter().collect();
    assert!(distinct.len() > 20, "full jitter spreads the delays");
}

#[test]
fn a_snooze_waits_as_asked_without_using_an_attempt() {
    let now = Utc::now();
    let snooze = |secs| Outcome::Failed(JobError::snooze("not ready", Duration::from_secs(secs)));
    // On the last allowed attempt, where a failure would be dead.
    let t = next(&state(JobStatus::Running, 3, 3), snooze(90), now).expect("legal");
    let at = now + chrono::Duration::seconds(90);
    assert_eq!(
        (t.to, t.attempt_limit, t.next_run_at, t.enqueue),
        (
            JobStatus::Retrying,
            Some(4),
            Some(at),
            Some(Enqueue::At(at))
        )
    );
    let e = t.error.expect("recorded in the history");
    assert_eq!(
        (e.class.as_str(), e.message.as_str(), e.retry_at),
        ("snoozed", "not ready", Some(at))
    );
    let t = next(&state(JobStatus::Running, 1, 3), snooze(30 * 86_400), now).expect("legal");
    assert_eq!(
        t.next_run_at,
        Some(now + chrono::Duration::from_std(SNOOZE_MAX).expect("max")),
        "a snooze is capped"
    );
}

#[test]
fn retryable_failure_retries_until_the_limit_then_dies() {
    let now = Utc::now();
    let err = || Outcome::Failed(JobError::retryable("flaky"));
    let t = next(&state(JobStatus::Running, 2, 3), err(), now).expect("legal");
    assert_eq!(t.to, JobStatus::Retrying);
    let at = t.next_run_at.expect("next run");
    assert!(at >= now && at <= now + chrono::Duration::milliseconds(200));
    assert_eq!(
        t.enqueue,
        Some(Enqueue::At(at)),
        "due on the broker when it may run"
    );
    let e = t.error.expect("error recorded");
    assert_eq!(
        (e.class.as_str(), e.attempt, e.retry_at),
        ("retryable", 2, Some(at))
    );

    let t = next(&state(JobStatus::Running, 3, 3), err(), now).expect("legal");
    assert_eq!(t.to, JobStatus::Dead);
    assert!(t.enqueue.is_none() && t.next_run_at.is_none());
    assert_eq!(t.error.map(|e| e.retry_at), Some(None));
}

#[test]
fn permanent_error_dies_at_once_and_retry_after_is_honoured() {
    let now = Utc::now();
    let running = state(JobStatus::Running, 1, 5);
    let dead = next(&running, Outcome::Failed(JobError::permanent("bad")), now).expect("legal");
    assert_eq!(dead.to, JobStatus::Dead);
    assert_eq!(dead.error.map(|e| e.class), Some("permanent".to_owned()));
    let err = JobError::retry_after("429", Duration::from_secs(7));
    let t = next(&running, Outcome::Failed(err), now).expect("legal");
    assert_eq!(t.next_run_at, Some(now + chrono::Duration::seconds(7)));
}

#[test]
fn hand_back_returns_the_attempt_to_the_budget() {
    let t = next(
        &state(JobStatus::Running, 2, 3),
        Outcome::HandedBack,
        Utc::now(),
    )
    .expect("legal");
    assert_eq!(t.to, JobStatus::Queued);
    assert_eq!(t.attempt_limit, Some(4));
    assert_eq!(t.enqueue, Some(Enqueue::Now));
    assert!(t.error.is_none(), "an interrupted attempt is not a failure");
}

#[test]
fn lease_expiry_retries_dies_on_the_last_attempt_or_honours_a_cancel() {
    let now = Utc::now();
    let expire = |s: JobState| next(&s, Outcome::LeaseExpired, now).expect("legal");
    let t = expire(state(JobStatus::Running, 1, 3));
    assert_eq!((t.to, t.enqueue), (JobStatus::Retrying, Some(Enqueue::Now)));
    let e = t.error.expect("recorded");
    assert_eq!(
        (e.message.as_str(), e.class.as_str()),
        (LEASE_EXPIRED, "retryable")
    );

    let t = expire(state(JobStatus::Running, 3, 3));
    assert_eq!((t.to, t.enqueue), (JobStatus::Dead, None));
    assert!(t.error.is_some());

    let t = expire(JobState {
        cancel_requested: true,
        ..state(JobStatus::Running, 1, 3)
    });
    assert_eq!(
        (t.to, t.event),
        (JobStatus::Cancelled, Some(EventType::Cancelled))
    );
}

#[test]
fn cancel_ends_a_waiting_job_and_only_flags_a_running_one() {
    let now = Utc::now();
    for waiting in [JobStatus::Queued, JobStatus::Retrying] {
        let t = next(&state(waiting, 1, 3), Outcome::Cancel, now).expect("legal");
        assert_eq!(
            (t.to, t.cancel_requested),
            (JobStatus::Cancelled, Some(true))
        );
        assert!(t.next_run_at.is_none(), "a cancelled job has no next run");
    }
    let t = next(&state(JobStatus::Running, 1, 3), Outcome::Cancel, now).expect("legal");
    assert_eq!(
        (t.to, t.cancel_requested, t.event),
        (JobStatus::Running, Some(true), None)
    );
    for done in [JobStatus::Succeeded, JobStatus::Dead, JobStatus::Cancelled] {
        let e = next(&state(done, 1, 3), Outcome::Cancel, now).expect_err("finished");
        assert_eq!(e.from, done);
    }
}

#[test]
fn replay_gives_a_fresh_budget_from_the_attempts_used() {
    let dead = JobState {
        cancel_requested: true,
        ..state(JobStatus::Dead, 3, 3)
    };
    let t = next(&dead, Outcome::Replay, Utc::now()).expect("legal");
    assert_eq!(t.to, JobStatus::Queued);
    assert_eq!(t.attempt_limit, Some(6), "attempt + max_attempts");
    assert_eq!(t.cancel_requested, Some(false));
    assert_eq!(t.enqueue, Some(Enqueue::Now));
    assert_eq!(t.event, Some(EventType::Queued));
}
