//! The analyze kind's rate-limit buckets and answer cache in the SQLite
//! file, for dev mode: every process that opens the file (a `stevedore dev`,
//! workers started next to it) shares one bucket per provider+model and one
//! cache, as production processes share them in Redis. Tables are in
//! `migrations/sqlite/0003_analyze.sql`; the bucket arithmetic is the analyze
//! crate's [`Levels`], so all stores agree on it.
//!
//! Both take the store's pool: it holds one connection, so these writes queue
//! behind the store's own instead of racing them for the file lock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::SqlitePool;
use stevedore_analyze::cache::{AnswerCache, CacheError, CachedAnswer};
use stevedore_analyze::ratelimit::{
    Cost, Decision, Levels, RateLimitError, RateLimiter, RateLimits,
};

/// Wall-clock ms: the one clock every process on this machine shares.
fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// Token buckets in the `analyze_buckets` table.
#[derive(Clone)]
pub struct SqliteRateLimiter {
    pool: SqlitePool,
    limits: RateLimits,
}

impl SqliteRateLimiter {
    pub fn new(pool: SqlitePool, limits: RateLimits) -> Self {
        Self { pool, limits }
    }

    /// Like [`RateLimiter::try_acquire`], plus the time (ms since the epoch)
    /// the decision was made at, so tests can check the limit on the
    /// limiter's own timeline.
    pub async fn try_acquire_at(
        &self,
        key: &str,
        cost: Cost,
    ) -> Result<(Decision, f64), RateLimitError> {
        self.update(key, |l, limits| l.take(limits, cost)).await
    }

    /// Reads, changes and writes one bucket row in a single write transaction.
    async fn update<T>(
        &self,
        key: &str,
        f: impl FnOnce(&mut Levels, &RateLimits) -> T,
    ) -> Result<(T, f64), RateLimitError> {
        // BEGIN IMMEDIATE takes the file's write lock before the read, so a
        // second process waits (busy_timeout) instead of reading the same
        // levels and spending the same last token. A deferred BEGIN would
        // read first and fail to upgrade with SQLITE_BUSY.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(RateLimitError::new)?;
        let row: Option<(f64, f64, f64)> =
            sqlx::query_as("SELECT requests, tokens, at_ms FROM analyze_buckets WHERE key = ?")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(RateLimitError::new)?;
        // Read under the lock: writers are serialised, so the timestamps
        // they store only move forward (bar a clock step, which `refill`
        // treats as no time passing).
        let now = wall_ms();
        let mut levels = match row {
            Some((requests, tokens, at_ms)) => Levels {
                requests,
                tokens,
                at_ms,
            },
            None => Levels::full(&self.limits, now),
        };
        levels.refill(&self.limits, now);
        let out = f(&mut levels, &self.limits);
        sqlx::query(
            "INSERT INTO analyze_buckets (key, requests, tokens, at_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (key) DO UPDATE SET requests = excluded.requests,
                 tokens = excluded.tokens, at_ms = excluded.at_ms",
        )
        .bind(key)
        .bind(levels.requests)
        .bind(levels.tokens)
        .bind(levels.at_ms)
        .execute(&mut *tx)
        .await
        .map_err(RateLimitError::new)?;
        tx.commit().await.map_err(RateLimitError::new)?;
        Ok((out, now))
    }
}

#[async_trait]
impl RateLimiter for SqliteRateLimiter {
    async fn try_acquire(&self, key: &str, cost: Cost) -> Result<Decision, RateLimitError> {
        Ok(self.try_acquire_at(key, cost).await?.0)
    }

    async fn settle(&self, key: &str, extra_tokens: i64) -> Result<(), RateLimitError> {
        self.update(key, |l, limits| l.settle(limits, extra_tokens))
            .await
            .map(|_| ())
    }

    async fn drain(&self, key: &str, for_: Duration) -> Result<(), RateLimitError> {
        self.update(key, |l, limits| l.drain(limits, for_))
            .await
            .map(|_| ())
    }
}

/// Answers in the `analyze_answers` table, each with its expiry.
#[derive(Clone)]
pub struct SqliteAnswerCache {
    pool: SqlitePool,
    ttl: Duration,
}

/// Expired rows deleted per write at most: pruning rides along with writes
/// and must not turn one of them into a long scan.
const PRUNE_BATCH: i64 = 500;

fn store_err(e: sqlx::Error) -> CacheError {
    CacheError::Store(Box::new(e))
}

impl SqliteAnswerCache {
    pub fn new(pool: SqlitePool, ttl: Duration) -> Self {
        Self { pool, ttl }
    }
}

#[async_trait]
impl AnswerCache for SqliteAnswerCache {
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<CachedAnswer>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // json_each binds the whole list as one parameter: one statement
        // however many questions, and no SQL built from strings.
        let list = serde_json::to_string(keys).map_err(|e| CacheError::Store(Box::new(e)))?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT key, answer FROM analyze_answers
             WHERE key IN (SELECT value FROM json_each(?)) AND expires_at > ?",
        )
        .bind(list)
        .bind(wall_ms() as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        let found: std::collections::HashMap<String, String> = rows.into_iter().collect();
        // An entry that no longer parses (written by an older version) is a
        // miss, not an error: it will be overwritten with a fresh answer.
        Ok(keys
            .iter()
            .map(|k| found.get(k).and_then(|v| serde_json::from_str(v).ok()))
            .collect())
    }

    async fn put_many(&self, entries: &[(String, CachedAnswer)]) -> Result<(), CacheError> {
        if entries.is_empty() {
            return Ok(());
        }
        let now = wall_ms() as i64;
        let expires = now.saturating_add(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX));
        // One transaction: SQLite's cost is the commit, not the rows.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_err)?;
        for (key, answer) in entries {
            let json = serde_json::to_string(answer).map_err(|e| CacheError::Store(Box::new(e)))?;
            sqlx::query(
                "INSERT INTO analyze_answers (key, answer, expires_at) VALUES (?, ?, ?)
                 ON CONFLICT (key) DO UPDATE SET answer = excluded.answer,
                     expires_at = excluded.expires_at",
            )
            .bind(key)
            .bind(json)
            .bind(expires)
            .execute(&mut *tx)
            .await
            .map_err(store_err)?;
        }
        sqlx::query(
            "DELETE FROM analyze_answers WHERE key IN
                 (SELECT key FROM analyze_answers WHERE expires_at <= ? LIMIT ?)",
        )
        .bind(now)
        .bind(PRUNE_BATCH)
        .execute(&mut *tx)
        .await
        .map_err(store_err)?;
        tx.commit().await.map_err(store_err)?;
        Ok(())
    }
}
