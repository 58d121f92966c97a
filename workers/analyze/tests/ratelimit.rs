//! The Redis token bucket under concurrent callers, drained by one process
//! for all, and the handler waiting for it instead of failing.

mod support;

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use serde_json::json;
use stevedore_analyze::ratelimit::{acquire, AcquireError, Cost, Decision};
use stevedore_analyze::{
    AnalyzeConfig, AnalyzeHandler, OpenAiConfig, RateLimits, RedisRateLimiter,
};
use stevedore_handler::{parse_payload, Handler, JobContext};
use support::fake_openai::{FakeOpenAi, Reply};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ONE: Cost = Cost {
    requests: 1,
    tokens: 10,
};

#[tokio::test]
async fn redis_bucket_never_admits_more_than_the_limit_in_any_window() {
    let prefix = support::unique_prefix("ratelimit-window");
    let mut conn = support::redis().await;
    let window = Duration::from_millis(1000);
    let limit = 10;
    let limits = RateLimits {
        requests: limit,
        tokens: 1_000_000,
        window,
    };
    // Several limiters on one key stand for several worker processes.
    let limiters: Vec<_> = (0..3)
        .map(|_| RedisRateLimiter::new(conn.clone(), prefix.clone(), limits))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3200);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let limiter = limiters[i % limiters.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut granted = Vec::new();
            while tokio::time::Instant::now() < deadline {
                match limiter
                    .try_acquire_at("openai:m", ONE)
                    .await
                    .expect("redis")
                {
                    (Decision::Granted, at) => granted.push(at),
                    (Decision::Wait(d), _) => {
                        tokio::time::sleep(d.max(Duration::from_millis(1))).await
                    }
                }
            }
            granted
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.expect("task"));
    }
    times.sort_unstable();
    let window_ms = window.as_millis() as u64;
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
    // It is a limit, not a wall: over ~3 windows close to 3 * limit pass.
    assert!(
        times.len() >= 2 * limit as usize,
        "only {} grants: {times:?}",
        times.len()
    );
    support::cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn waiting_for_the_bucket_is_not_a_failure_and_stops_on_cancel() {
    let prefix = support::unique_prefix("ratelimit-wait");
    let mut conn = support::redis().await;
    let server = FakeOpenAi::start(vec![], Reply::Answer { choice: 0 }).await;
    // Burst 1, then one call per 300 ms.
    let limits = RateLimits {
        requests: 2,
        tokens: 1_000_000,
        window: Duration::from_millis(300),
    };
    let limiter = Arc::new(RedisRateLimiter::new(conn.clone(), prefix.clone(), limits));
    let mut config = AnalyzeConfig::in_process(
        Some(OpenAiConfig {
            base_url: server.base_url.clone(),
            api_key: Some("sk-test".into()),
            model: "gpt-4o-mini".into(),
            timeout: Duration::from_secs(5),
        }),
        "/unused.gguf",
    );
    config.rate_limiter = limiter.clone();
    let registry = Registry::new();
    let h = AnalyzeHandler::new(config, &registry).expect("handler");
    let started = std::time::Instant::now();
    for i in 0..3 {
        let payload = parse_payload(
            &json!({"questions": [{"text": format!("q{i}"), "options": ["a", "b"]}]}),
        )
        .expect("payload");
        h.run(&support::ctx(1), payload)
            .await
            .expect("waits, then succeeds");
    }
    assert_eq!(server.requests(), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "{:?}",
        started.elapsed()
    );
    let waited: f64 = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "stevedore_analyze_rate_limit_wait_seconds")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| m.get_histogram().get_sample_sum())
        .sum();
    assert!(waited >= 0.5, "wait recorded: {waited}");

    // An empty bucket and a cancelled job: the wait ends at once.
    let slow = RedisRateLimiter::new(
        conn.clone(),
        prefix.clone(),
        RateLimits {
            requests: 2,
            tokens: 1_000_000,
            window: Duration::from_secs(600),
        },
    );
    assert_eq!(
        slow.try_acquire_at("k", ONE).await.expect("redis").0,
        Decision::Granted
    );
    let ctx = JobContext::new(Uuid::now_v7(), 1, CancellationToken::new());
    ctx.cancelled.cancel();
    let err = acquire(&slow, "k", ONE, &ctx.cancelled)
        .await
        .expect_err("cancelled");
    assert!(matches!(err, AcquireError::Cancelled));
    support::cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn settled_tokens_are_charged_to_later_callers() {
    let prefix = support::unique_prefix("ratelimit-settle");
    let mut conn = support::redis().await;
    let limits = RateLimits {
        requests: 1000,
        tokens: 1000,
        window: Duration::from_secs(60),
    };
    let limiter = RedisRateLimiter::new(conn.clone(), prefix.clone(), limits);
    let small = Cost {
        requests: 1,
        tokens: 50,
    };
    assert_eq!(
        limiter.try_acquire_at("k", small).await.expect("redis").0,
        Decision::Granted
    );
    // The call really used 500 tokens, far over the burst of 100.
    stevedore_analyze::RateLimiter::settle(&limiter, "k", 450)
        .await
        .expect("settle");
    let (decision, _) = limiter.try_acquire_at("k", small).await.expect("redis");
    let Decision::Wait(d) = decision else {
        panic!("bucket is in debt")
    };
    assert!(d > Duration::from_secs(20), "{d:?}");
    support::cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn a_drain_in_one_process_stops_every_process_on_the_bucket_for_its_duration() {
    let prefix = support::unique_prefix("ratelimit-drain");
    let mut conn = support::redis().await;
    // 600 a second: without the drain every call below would be granted.
    let limits = RateLimits {
        requests: 600,
        tokens: 1_000_000,
        window: Duration::from_secs(1),
    };
    let got_429 = RedisRateLimiter::new(conn.clone(), prefix.clone(), limits);
    let other = RedisRateLimiter::new(conn.clone(), prefix.clone(), limits);
    assert_eq!(
        other
            .try_acquire_at("openai:m", ONE)
            .await
            .expect("redis")
            .0,
        Decision::Granted
    );
    let started = std::time::Instant::now();
    stevedore_analyze::RateLimiter::drain(&got_429, "openai:m", Duration::from_millis(400))
        .await
        .expect("drain");
    let Decision::Wait(d) = other
        .try_acquire_at("openai:m", ONE)
        .await
        .expect("redis")
        .0
    else {
        panic!("the other process was granted a call during the drain");
    };
    assert!(d >= Duration::from_millis(380), "{d:?}");
    assert_eq!(
        other
            .try_acquire_at("openai:other", ONE)
            .await
            .expect("redis")
            .0,
        Decision::Granted,
        "other keys are not drained"
    );
    let at = loop {
        if let (Decision::Granted, _) = other.try_acquire_at("openai:m", ONE).await.expect("redis")
        {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never granted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        at >= Duration::from_millis(395) && at < Duration::from_millis(900),
        "first grant {at:?} after a 400 ms drain"
    );

    // A drain longer than the key's usual lifetime (two windows) is kept.
    let short = RateLimits {
        requests: 600,
        tokens: 1_000_000,
        window: Duration::from_millis(100),
    };
    let a = RedisRateLimiter::new(conn.clone(), prefix.clone(), short);
    stevedore_analyze::RateLimiter::drain(&a, "long", Duration::from_secs(2))
        .await
        .expect("drain");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        matches!(
            a.try_acquire_at("long", ONE).await.expect("redis").0,
            Decision::Wait(d) if d >= Duration::from_millis(1300)
        ),
        "the drained key expired early"
    );
    support::cleanup(&mut conn, &prefix).await;
}
