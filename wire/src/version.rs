//! Versions: a hybrid logical clock plus the writing node, compared
//! last-writer-wins.
//!
//! The HLC keeps versions close to wall-clock time (so "newest" means what an
//! operator expects) while never going backwards on one node and always
//! moving past any version the node has seen, so a write issued after
//! observing another is ordered after it even across skewed clocks.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::xxh3_64;

/// Bits of the HLC given to the logical counter under the millisecond clock.
const LOGICAL_BITS: u32 = 16;

/// The version of one write. Ordered by `hlc`, then `node` to break ties, so
/// any two versions from different writers compare unequal.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    /// Milliseconds since the Unix epoch in the high 48 bits, a logical
    /// counter in the low 16.
    pub hlc: u64,
    /// The writing node, as [`Version::node_tag`] of its id.
    pub node: u64,
}

/// `t` in milliseconds since the Unix epoch (0 before it): the wall time
/// versions and registration proofs are stamped with.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl std::fmt::Display for Version {
    /// `millis.logical@node`, e.g. `1764127433123.0@9f1c2d3e4a5b6c7d`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let logical = self.hlc & ((1 << LOGICAL_BITS) - 1);
        write!(f, "{}.{logical}@{:016x}", self.millis(), self.node)
    }
}

impl std::str::FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Version, String> {
        let bad = || format!("{s:?} is not a version (millis.logical@node)");
        let (clock, node) = s.split_once('@').ok_or_else(bad)?;
        let (millis, logical) = clock.split_once('.').ok_or_else(bad)?;
        let millis: u64 = millis.parse().map_err(|_| bad())?;
        let logical: u64 = logical.parse().map_err(|_| bad())?;
        if logical >> LOGICAL_BITS != 0 || millis >> (64 - LOGICAL_BITS) != 0 {
            return Err(bad());
        }
        Ok(Version {
            hlc: millis << LOGICAL_BITS | logical,
            node: u64::from_str_radix(node, 16).map_err(|_| bad())?,
        })
    }
}

impl Version {
    /// A node's tag in versions: a stable hash of its id, so it needs no
    /// coordination and survives controller restarts.
    pub fn node_tag(id: &str) -> u64 {
        xxh3_64(id.as_bytes())
    }

    /// The wall-clock milliseconds part.
    pub fn millis(&self) -> u64 {
        self.hlc >> LOGICAL_BITS
    }
}

/// A node's hybrid logical clock. Shared by reference between tasks.
#[derive(Debug)]
pub struct Clock {
    last: AtomicU64,
    node: u64,
}

impl Clock {
    /// A clock for the node with this id.
    pub fn new(id: &str) -> Clock {
        Clock {
            last: AtomicU64::new(0),
            node: Version::node_tag(id),
        }
    }

    /// A new version, greater than every version this clock issued or
    /// observed, and at least `now_ms` (milliseconds since the Unix epoch).
    pub fn tick(&self, now_ms: u64) -> Version {
        let physical = now_ms << LOGICAL_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = physical.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Version {
                        hlc: next,
                        node: self.node,
                    }
                }
                Err(current) => last = current,
            }
        }
    }

    /// Moves the clock past a version seen from elsewhere, so the next tick
    /// orders after it.
    pub fn observe(&self, seen: Version) {
        self.last.fetch_max(seen.hlc, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_strictly_increase_even_when_the_wall_clock_stalls_or_steps_back() {
        let clock = Clock::new("worker1");
        let a = clock.tick(1_000);
        let b = clock.tick(1_000);
        let c = clock.tick(900);
        assert!(a < b && b < c);
        assert_eq!(c.millis(), 1_000);
        let d = clock.tick(2_000);
        assert_eq!(d.millis(), 2_000);
    }

    #[test]
    fn a_tick_after_observing_orders_after_the_observed_version() {
        let ahead = Clock::new("worker1");
        let behind = Clock::new("worker2");
        let remote = ahead.tick(5_000);
        behind.observe(remote);
        let local = behind.tick(1_000);
        assert!(local > remote);
    }

    #[test]
    fn versions_print_and_parse_back() {
        let v = Clock::new("worker1").tick(1_764_127_433_123);
        let text = v.to_string();
        assert!(text.starts_with("1764127433123.0@"), "{text}");
        assert_eq!(text.parse::<Version>(), Ok(v));
        for bad in ["", "1.2", "x.1@00", "1.70000@00", "1.1@zz"] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_with_equal_clocks_are_ordered_by_node() {
        let a = Version { hlc: 7, node: 1 };
        let b = Version { hlc: 7, node: 2 };
        assert!(a < b);
        assert_ne!(Version::node_tag("worker1"), Version::node_tag("worker2"));
    }
}
