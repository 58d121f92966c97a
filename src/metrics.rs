//! Prometheus metrics of the core, in one registry that `/metrics` renders.
//! Worker crates register their own metrics into the same [`REGISTRY`].

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn reg<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    // Registering the same name twice only happens if a metric is defined
    // twice, a programming error caught by the first test that renders.
    if let Err(e) = REGISTRY.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "Metric registration failed.");
    }
    c
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition"))
}

fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = exponential_buckets(0.001, 2.5, 14).unwrap_or_default();
    reg(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .expect("static metric definition"),
    )
}

pub static SUBMITTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_jobs_submitted_total",
        "Jobs accepted by the API.",
        &["kind"],
    )
});
pub static STARTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_jobs_started_total",
        "Attempts started (claims).",
        &["kind"],
    )
});
pub static FINISHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_jobs_finished_total",
        "Attempts finished, by outcome (succeeded, retrying, dead, cancelled, queued = handed back).",
        &["kind", "outcome"],
    )
});
pub static RUN_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "stevedore_job_run_seconds",
        "Handler run time per attempt.",
        &["kind"],
    )
});
pub static WAIT_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "stevedore_job_wait_seconds",
        "Time from submit to the start of an attempt.",
        &["kind"],
    )
});
pub static START_LAG: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "stevedore_job_start_lag_seconds",
        "Time from when the job became runnable (submit, run_at, retry or snooze time, hand-back) to the start of an attempt.",
        &["kind"],
    )
});
pub static DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    reg(IntGaugeVec::new(
        Opts::new(
            "stevedore_queue_depth",
            "Jobs by kind and status (queued, retrying, running, dead).",
        ),
        &["kind", "status"],
    )
    .expect("static metric definition"))
});
pub static POOL_WORKERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    pool_gauge(
        "stevedore_pool_workers",
        "Worker processes of the pool seen alive in the last few seconds (set by the dispatcher).",
    )
});
pub static POOL_WORKER_SLOTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    pool_gauge(
        "stevedore_pool_worker_slots",
        "Those workers' concurrency added up: jobs the pool can run at once.",
    )
});
pub static POOL_PAUSED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    pool_gauge(
        "stevedore_pool_paused",
        "1 while the pool is paused (it starts no job), else 0.",
    )
});

fn pool_gauge(name: &str, help: &str) -> IntGaugeVec {
    reg(IntGaugeVec::new(Opts::new(name, help), &["pool"]).expect("static metric definition"))
}

/// Sets the pool gauges from the stores' pool rows, with a zero for every
/// other pool in `kinds` (pools with jobs but no worker ever seen): the
/// alert on queued jobs without a worker then compares with a series.
pub fn set_pools<'a>(states: &[crate::store::PoolState], kinds: impl Iterator<Item = &'a str>) {
    // Reset first: a pool whose workers all aged out leaves the rows.
    for g in [&*POOL_WORKERS, &*POOL_WORKER_SLOTS, &*POOL_PAUSED] {
        g.reset();
    }
    for kind in kinds {
        for g in [&*POOL_WORKERS, &*POOL_WORKER_SLOTS, &*POOL_PAUSED] {
            g.with_label_values(&[kind]).set(0);
        }
    }
    for s in states {
        POOL_WORKERS.with_label_values(&[&s.name]).set(s.workers);
        POOL_WORKER_SLOTS
            .with_label_values(&[&s.name])
            .set(s.concurrency);
        POOL_PAUSED
            .with_label_values(&[&s.name])
            .set(i64::from(s.paused));
    }
}

pub static FENCED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_fenced_writes_total",
        "Writes refused because the attempt lost its lease (heartbeat, finish or progress).",
        &["op"],
    )
});
pub static BROKER_PUBLISH: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_broker_publish_total",
        "Job ids published, by broker and outcome.",
        &["broker", "outcome"],
    )
});
pub static BROKER_ACK_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    reg(IntCounter::new(
        "stevedore_broker_ack_errors_total",
        "Broker acks that failed.",
    )
    .expect("static metric definition"))
});
pub static API_SHED: LazyLock<IntCounter> = LazyLock::new(|| {
    reg(IntCounter::new(
        "stevedore_api_shed_total",
        "API requests turned away with 503 because too many were in flight.",
    )
    .expect("static metric definition"))
});
pub static POISON: LazyLock<IntCounter> = LazyLock::new(|| {
    reg(IntCounter::new(
        "stevedore_poison_messages_total",
        "Undecodable broker messages moved aside.",
    )
    .expect("static metric definition"))
});
pub static REPAIRED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_dispatcher_repairs_total",
        "Jobs moved by the dispatcher's repair services.",
        &["service"],
    )
});
pub static SCHEDULE_FIRES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_schedule_fires_total",
        "Cron schedule fires: `job` made a job, `error` could not (the schedule says why).",
        &["outcome"],
    )
});

pub static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_events_emitted_total",
        "Events handled by the notifier, by type.",
        &["type"],
    )
});
pub static STREAM_CLIENTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    reg(IntGaugeVec::new(
        Opts::new(
            "stevedore_stream_clients",
            "Connected stream clients, by transport (sse, ws).",
        ),
        &["transport"],
    )
    .expect("static metric definition"))
});
pub static STREAM_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_stream_clients_dropped_total",
        "Stream clients the server disconnected, by transport and reason (slow_client, keepalive).",
        &["transport", "reason"],
    )
});
pub static WEBHOOK_DELIVERIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_webhook_deliveries_total",
        "Webhook attempts by outcome (delivered, retry, failed, gone) and attempt number.",
        &["outcome", "attempt"],
    )
});
pub static WEBHOOK_LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
    let buckets = exponential_buckets(0.001, 2.5, 16).unwrap_or_default();
    reg(Histogram::with_opts(
        HistogramOpts::new(
            "stevedore_webhook_delivery_latency_seconds",
            "From the event's commit to its webhook's 2xx.",
        )
        .buckets(buckets),
    )
    .expect("static metric definition"))
});
pub static EVENT_LAG: LazyLock<GaugeVec> = LazyLock::new(|| {
    reg(GaugeVec::new(
        Opts::new(
            "stevedore_oldest_undelivered_event_age_seconds",
            "Age of the oldest event not yet handled by the notifier, or not yet delivered to a webhook.",
        ),
        &["stage"],
    )
    .expect("static metric definition"))
});

pub static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "stevedore_http_requests_total",
        "API requests by route template, method and status class (2xx, 4xx, 5xx...).",
        &["route", "method", "status_class"],
    )
});
pub static HTTP_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    // 0.5 s is a bucket edge so the p95 < 500 ms objective is an exact
    // ratio of two series, not an interpolation.
    let buckets = vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    reg(HistogramVec::new(
        HistogramOpts::new(
            "stevedore_http_request_duration_seconds",
            "API request latency until the response head, by route template and method.",
        )
        .buckets(buckets),
        &["route", "method"],
    )
    .expect("static metric definition"))
});
pub static DEPENDENCY_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    reg(IntGaugeVec::new(
        Opts::new(
            "stevedore_dependency_up",
            "1 when the API process reached the dependency (database, or a broker by name) at its last /metrics scrape.",
        ),
        &["dependency"],
    )
    .expect("static metric definition"))
});

pub fn broker_publish(broker: &str, n: usize, ok: bool) {
    BROKER_PUBLISH
        .with_label_values(&[broker, if ok { "ok" } else { "error" }])
        .inc_by(n as u64);
}

/// Touches every metric so `/metrics` lists them before first use.
pub fn init() {
    LazyLock::force(&SUBMITTED);
    LazyLock::force(&STARTED);
    LazyLock::force(&FINISHED);
    LazyLock::force(&RUN_SECONDS);
    LazyLock::force(&WAIT_SECONDS);
    LazyLock::force(&START_LAG);
    LazyLock::force(&POOL_WORKERS);
    LazyLock::force(&POOL_WORKER_SLOTS);
    LazyLock::force(&POOL_PAUSED);
    LazyLock::force(&DEPTH);
    LazyLock::force(&FENCED);
    LazyLock::force(&BROKER_PUBLISH);
    LazyLock::force(&BROKER_ACK_ERRORS);
    LazyLock::force(&POISON);
    LazyLock::force(&API_SHED);
    LazyLock::force(&REPAIRED);
    LazyLock::force(&EVENTS);
    LazyLock::force(&STREAM_CLIENTS);
    LazyLock::force(&STREAM_DROPPED);
    LazyLock::force(&WEBHOOK_DELIVERIES);
    LazyLock::force(&WEBHOOK_LATENCY);
    LazyLock::force(&EVENT_LAG);
    LazyLock::force(&HTTP_REQUESTS);
    LazyLock::force(&HTTP_DURATION);
    LazyLock::force(&DEPENDENCY_UP);
    // Rare events start at an explicit zero: `increase()` over a series
    // that appears only with its first event misses that event, and alert
    // rules on them would name a series no process exports yet.
    for op in ["heartbeat", "finish", "progress"] {
        FENCED.with_label_values(&[op]);
    }
    for transport in ["sse", "ws"] {
        STREAM_CLIENTS.with_label_values(&[transport]);
        for reason in ["slow_client", "keepalive"] {
            STREAM_DROPPED.with_label_values(&[transport, reason]);
        }
    }
    for service in ["lease_rescuer", "lost_message_repair"] {
        REPAIRED.with_label_values(&[service]);
    }
    for outcome in ["delivered", "retry", "failed", "gone"] {
        WEBHOOK_DELIVERIES.with_label_values(&[outcome, "1"]);
    }
}

pub fn render() -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf) {
        tracing::error!(error = %e, "Encoding metrics failed.");
    }
    String::from_utf8(buf).unwrap_or_default()
}
