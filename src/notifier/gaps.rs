//! Reading `job_events` in id order without skipping a late commit.
//!
//! Ids come from a sequence when the row is written, not when its
//! transaction commits, so id 7 can be visible while id 6 is still in
//! flight. Advancing past 6 would lose it for good. [`Frontier`] hands out
//! events only up to the first missing id, and treats a missing id as gone
//! (rolled back, or a sequence jump) only once every transaction that could
//! still write it has ended: when the gap was seen, the writer of the
//! missing id had already taken its id, hence already had a transaction id
//! below that snapshot's `xmax`; once a later snapshot's `xmin` (the oldest
//! transaction still running) reaches that `xmax`, the writer is finished,
//! and a row still missing will never appear.

use crate::store::events::Snapshot;

/// A range of missing ids and the snapshot `xmax` when it was first seen.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Gap {
    lo: i64,
    hi: i64,
    xmax: i64,
}

#[derive(Debug, Default)]
pub struct Frontier {
    gaps: Vec<Gap>,
}

impl Frontier {
    /// Given the ids read after `cursor` (ascending), returns how many of
    /// them may be handed out now and the new cursor.
    pub fn advance(&mut self, cursor: i64, ids: &[i64], snap: Snapshot) -> (usize, i64) {
        let mut c = cursor;
        let mut taken = 0;
        for &id in ids {
            if id > c + 1 {
                let (lo, hi) = (c + 1, id - 1);
                let known = self.gaps.iter().find(|g| g.lo <= lo && hi <= g.hi).copied();
                match known {
                    Some(g) if g.xmax <= snap.xmin => {}
                    Some(_) => break,
                    None if snap.xmax <= snap.xmin => {}
                    None => {
                        self.gaps.push(Gap {
                            lo,
                            hi,
                            xmax: snap.xmax,
                        });
                        break;
                    }
                }
            }
            c = id;
            taken += 1;
        }
        self.gaps.retain(|g| g.hi > c);
        (taken, c)
    }

    /// Forget everything (the cursor moved under us).
    pub fn reset(&mut self) {
        self.gaps.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(xmin: i64, xmax: i64) -> Snapshot {
        Snapshot { xmin, xmax }
    }

    #[test]
    fn contiguous_ids_pass() {
        let mut f = Frontier::default();
        assert_eq!(f.advance(0, &[1, 2, 3], snap(10, 12)), (3, 3));
    }

    #[test]
    fn a_gap_holds_back_until_its_writer_may_have_finished() {
        let mut f = Frontier::default();
        // 2 is in flight: stop at 1.
        assert_eq!(f.advance(0, &[1, 3, 4], snap(10, 12)), (1, 1));
        // Still running (xmin 11 < 12): hold.
        assert_eq!(f.advance(1, &[3, 4], snap(11, 13)), (0, 1));
        // 2 committed late: everything passes in order.
        assert_eq!(f.advance(1, &[2, 3, 4], snap(11, 13)), (3, 4));
    }

    #[test]
    fn a_rolled_back_id_is_skipped_once_all_older_transactions_ended() {
        let mut f = Frontier::default();
        assert_eq!(f.advance(0, &[3], snap(10, 12)), (0, 0));
        assert_eq!(f.advance(0, &[3], snap(12, 14)), (1, 3));
        assert_eq!(f.advance(3, &[5], Snapshot::SERIAL), (1, 5));
    }
}
