//! Concurrency keys, with no I/O: which limit applies to a key (the
//! longest matching prefix) and, for the keyed jobs a worker was handed,
//! which may start now, which wait held on their key until one of its jobs
//! ends, and which wait out a cool-down the remote side asked for. Both
//! stores decide with [`admit`] under their own serialisation (a lock per
//! key on Postgres, the one writer on SQLite).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Longest prefix a limit may name.
pub const PREFIX_MAX: usize = 200;
/// The most a limit may allow at once.
pub const MAX_RUNNING_MAX: i32 = 100_000;

/// `max_running` of the longest prefix of `key` among `limits`; `None`
/// when no limit names it (the key does not limit anything).
pub fn limit_for(key: &str, limits: &[(String, i32)]) -> Option<i32> {
    limits
        .iter()
        .filter(|(prefix, _)| key.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, max)| *max)
}

/// What a key looks like when a claim consults it.
#[derive(Debug, Clone, Default)]
pub struct KeyState {
    pub limit: Option<i32>,
    /// Jobs of the key running now.
    pub running: i64,
    /// A remote side asked every job of the key to wait until then.
    pub cool_until: Option<DateTime<Utc>>,
}

/// What [`admit`] decided for a batch of keyed jobs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admission {
    /// Claim these now.
    pub start: Vec<Uuid>,
    /// Back to the outbox, held on their key until one of its jobs ends.
    pub hold: Vec<(Uuid, String)>,
    /// Back to the outbox, due again when the key's cool-down ends.
    pub delay: Vec<(Uuid, DateTime<Utc>)>,
}

/// Decides the keyed jobs a worker was handed, most urgent first (the
/// caller's order): each key starts as many as its limit has room for.
pub fn admit(
    jobs: &[(Uuid, String)],
    keys: &HashMap<String, KeyState>,
    now: DateTime<Utc>,
) -> Admission {
    let mut taken: HashMap<&str, i64> = HashMap::new();
    let mut out = Admission::default();
    for (id, key) in jobs {
        let state = keys.get(key).cloned().unwrap_or_default();
        if let Some(until) = state.cool_until.filter(|u| *u > now) {
            out.delay.push((*id, until));
            continue;
        }
        let started = taken.entry(key.as_str()).or_default();
        let room = state
            .limit
            .is_none_or(|l| state.running + *started < i64::from(l));
        if room {
            *started += 1;
            out.start.push(*id);
        } else {
            out.hold.push((*id, key.clone()));
        }
    }
    out
}

/// How many held jobs of each key may be let go now: the room its limit
/// has (all of them when no limit names the key any more).
pub fn room(state: &KeyState, now: DateTime<Utc>) -> i64 {
    if state.cool_until.is_some_and(|u| u > now) {
        return 0;
    }
    state
        .limit
        .map_or(i64::MAX, |l| (i64::from(l) - state.running).max(0))
}

/// How many held jobs of each key to let go now, for the keys with room.
pub fn release_plan(keys: HashMap<String, KeyState>, now: DateTime<Utc>) -> Vec<(String, i64)> {
    keys.into_iter()
        .map(|(k, s)| (k, room(&s, now).min(i64::from(i32::MAX))))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn the_longest_matching_prefix_decides() {
        let limits = vec![
            ("host:".to_owned(), 4),
            ("host:slow.example".to_owned(), 1),
            ("tenant:".to_owned(), 10),
        ];
        assert_eq!(limit_for("host:fast.example", &limits), Some(4));
        assert_eq!(limit_for("host:slow.example", &limits), Some(1));
        assert_eq!(limit_for("tenant:acme", &limits), Some(10));
        assert_eq!(limit_for("other", &limits), None);
    }

    #[test]
    fn each_key_starts_what_its_limit_has_room_for_and_holds_the_rest() {
        let keys = HashMap::from([
            (
                "a".to_owned(),
                KeyState {
                    limit: Some(2),
                    running: 1,
                    cool_until: None,
                },
            ),
            (
                "b".to_owned(),
                KeyState {
                    limit: Some(5),
                    ..KeyState::default()
                },
            ),
        ]);
        let jobs = vec![
            (id(1), "a".to_owned()),
            (id(2), "a".to_owned()),
            (id(3), "b".to_owned()),
            (id(4), "c".to_owned()),
        ];
        let a = admit(&jobs, &keys, Utc::now());
        assert_eq!(a.start, vec![id(1), id(3), id(4)]);
        assert_eq!(a.hold, vec![(id(2), "a".to_owned())]);
        assert!(a.delay.is_empty());
    }

    #[test]
    fn a_cooling_key_delays_its_jobs_until_the_end_of_the_cool_down() {
        let now = Utc::now();
        let until = now + chrono::Duration::seconds(5);
        let keys = HashMap::from([(
            "host:x".to_owned(),
            KeyState {
                limit: None,
                running: 0,
                cool_until: Some(until),
            },
        )]);
        let a = admit(&[(id(1), "host:x".to_owned())], &keys, now);
        assert_eq!(a.delay, vec![(id(1), until)]);
        assert_eq!(room(&keys["host:x"], now), 0);
        let later = admit(
            &[(id(1), "host:x".to_owned())],
            &keys,
            until + chrono::Duration::seconds(1),
        );
        assert_eq!(later.start, vec![id(1)], "a cool-down that ended is gone");
    }

    #[test]
    fn room_is_what_the_limit_leaves_and_unlimited_without_one() {
        let now = Utc::now();
        let full = KeyState {
            limit: Some(2),
            running: 3,
            cool_until: None,
        };
        assert_eq!(room(&full, now), 0);
        assert_eq!(
            room(
                &KeyState {
                    running: 1,
                    ..full.clone()
                },
                now
            ),
            1
        );
        assert_eq!(room(&KeyState::default(), now), i64::MAX);
    }
}
