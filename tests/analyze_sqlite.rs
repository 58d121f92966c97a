//! The analyze kind's dev-mode state in the SQLite file: two processes (two
//! pools on one file) share one rate-limit bucket without ever exceeding it
//! together, a drain by one stops the other, and the answer cache is shared,
//! expires and is pruned.

use std::time::{Duration, Instant};

use stevedore::store::sqlite::analyze::{SqliteAnswerCache, SqliteRateLimiter};
use stevedore::store::sqlite::SqliteStore;
use stevedore::store::Store;
use stevedore_analyze::cache::{AnswerCache, CachedAnswer};
use stevedore_analyze::ratelimit::{Cost, Decision, RateLimiter, RateLimits};

const ONE: Cost = Cost {
    requests: 1,
    tokens: 10,
};

/// Two stores on one file, each with its own single-connection pool, as two
/// processes would open it.
async fn two_processes(dir: &tempfile::TempDir) -> (SqliteStore, SqliteStore) {
    let path = dir.path().join("stevedore.db");
    let a = SqliteStore::open(&path).await.expect("open");
    a.migrate().await.expect("migrate");
    let b = SqliteStore::open(&path).await.expect("open again");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_file_never_exceed_the_limit_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_processes(&dir).await;
    let window = Duration::from_millis(1000);
    let limit = 10;
    let limits = RateLimits {
        requests: limit,
        tokens: 1_000_000,
        window,
    };
    let limiters = [
        SqliteRateLimiter::new(a.pool().clone(), limits),
        SqliteRateLimiter::new(b.pool().clone(), limits),
    ];
    let deadline = Instant::now() + Duration::from_millis(3200);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let limiter = limiters[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut granted = Vec::new();
            while Instant::now() < deadline {
                match limiter
                    .try_acquire_at("openai:m", ONE)
                    .await
                    .expect("sqlite")
                {
                    (Decision::Granted, at) => granted.push((at, i % 2)),
                    (Decision::Wait(d), _) => {
                        tokio::time::sleep(d.max(Duration::from_millis(1))).await
                    }
                }
            }
            granted
        }));
    }
    let mut grants = Vec::new();
    for t in tasks {
        grants.extend(t.await.expect("task"));
    }
    grants.sort_by(|x, y| x.0.total_cmp(&y.0));
    let times: Vec<f64> = grants.iter().map(|g| g.0).collect();
    let window_ms = window.as_secs_f64() * 1000.0;
    for (i, start) in times.iter().enumerate() {
        let inside = times[i..]
            .iter()
            .take_while(|t| **t < start + window_ms)
            .count();
        assert!(
            inside as u64 <= limit,
            "{inside} grants in the window from {start}: {times:?}"
        );
    }
    // It is a limit, not a wall: over ~3 windows close to 3 * limit pass,
    // and both processes got some.
    assert!(times.len() >= 2 * limit as usize, "only {}", times.len());
    for p in 0..2 {
        assert!(grants.iter().any(|g| g.1 == p), "process {p} got nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_by_one_process_stops_the_other_for_its_duration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_processes(&dir).await;
    let limits = RateLimits {
        requests: 600,
        tokens: 1_000_000,
        window: Duration::from_secs(1),
    };
    let got_429 = SqliteRateLimiter::new(a.pool().clone(), limits);
    let other = SqliteRateLimiter::new(b.pool().clone(), limits);
    let started = Instant::now();
    got_429
        .drain("openai:m", Duration::from_millis(400))
        .await
        .expect("drain");
    let Ok(Decision::Wait(d)) = other.try_acquire("openai:m", ONE).await else {
        panic!("the other process was granted a call during the drain");
    };
    assert!(d >= Duration::from_millis(380), "{d:?}");
    let at = loop {
        if let Ok(Decision::Granted) = other.try_acquire("openai:m", ONE).await {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never granted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        at >= Duration::from_millis(395) && at < Duration::from_millis(900),
        "first grant {at:?} after a 400 ms drain"
    );
}

fn answer(choice: usize) -> CachedAnswer {
    CachedAnswer {
        choice,
        confidence: 0.75,
        reason: Some("because".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_cache_is_shared_through_the_file_expires_and_is_pruned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_processes(&dir).await;
    let writer = SqliteAnswerCache::new(a.pool().clone(), Duration::from_secs(3600));
    let reader = SqliteAnswerCache::new(b.pool().clone(), Duration::from_secs(3600));
    writer
        .put_many(&[("k1".into(), answer(1)), ("k2".into(), answer(2))])
        .await
        .expect("put");
    let got = reader
        .get_many(&["k2".into(), "missing".into(), "k1".into()])
        .await
        .expect("get");
    assert_eq!(got, vec![Some(answer(2)), None, Some(answer(1))]);
    // A second put of a key replaces its answer.
    reader
        .put_many(&[("k1".into(), answer(0))])
        .await
        .expect("put");
    assert_eq!(
        writer.get_many(&["k1".into()]).await.expect("get"),
        vec![Some(answer(0))]
    );

    let expired = SqliteAnswerCache::new(a.pool().clone(), Duration::ZERO);
    expired
        .put_many(&[("old1".into(), answer(1)), ("old2".into(), answer(1))])
        .await
        .expect("put");
    assert_eq!(
        reader
            .get_many(&["old1".into(), "old2".into()])
            .await
            .expect("get"),
        vec![None, None],
        "expired entries are misses"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Any later write prunes the expired rows.
    writer
        .put_many(&[("k3".into(), answer(1))])
        .await
        .expect("put");
    let rows: Vec<String> = sqlx::query_scalar("SELECT key FROM analyze_answers ORDER BY key")
        .fetch_all(a.pool())
        .await
        .expect("rows");
    assert_eq!(rows, ["k1", "k2", "k3"]);
    assert_eq!(
        reader.get_many(&[]).await.expect("empty get"),
        Vec::<Option<CachedAnswer>>::new()
    );
}
