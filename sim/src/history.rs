//! What the clients did and saw, and the checks the run must pass: every
//! acknowledged write survives, nothing read or left behind was never
//! written, the owners of each key end up agreeing, and a quorum read sees
//! every write acknowledged before it began — SPEC promises that "with a
//! stable owner set", so reads are held to it when no owner set changed
//! (no topology published, no worker crashed or started, every worker on
//! the published topology) from the write's start to the read's end. Pure: the run feeds it; the tests below feed it
//! by hand.

use bytes::Bytes;
use kv_wire::Version;
use std::collections::BTreeMap;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A write of this (unique) value.
    Put(Bytes),
    /// A delete.
    Delete,
    /// A quorum read.
    Get,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not yet (or never: the worker running it crashed): it may or may
    /// not have taken effect.
    Unknown,
    /// A write or delete acknowledged at this version.
    Written(Version),
    /// A read's answer: the live copy's version and value, if any.
    Read(Option<(Version, Bytes)>),
    /// Refused or failed: a write may still have taken effect.
    Failed(String),
}

/// One operation of one client.
#[derive(Debug, Clone)]
pub struct Op {
    /// The key.
    pub key: String,
    /// What was asked.
    pub kind: Kind,
    /// Simulated milliseconds when it began.
    pub invoked: u64,
    /// When it ended, if it did.
    pub done: Option<u64>,
    /// How.
    pub outcome: Outcome,
}

/// A key's copy as an owner holds it at the end: version, and value
/// (`None`: a tombstone).
pub type Copy = Option<(Version, Option<Bytes>)>;

/// Every operation of the run.
#[derive(Debug, Default)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    /// Records the start of an operation; its index.
    pub fn invoke(&mut self, key: &str, kind: Kind, now: u64) -> usize {
        self.ops.push(Op {
            key: key.to_string(),
            kind,
            invoked: now,
            done: None,
            outcome: Outcome::Unknown,
        });
        self.ops.len() - 1
    }

    /// Records how operation `i` ended.
    pub fn complete(&mut self, i: usize, outcome: Outcome, now: u64) {
        if let Some(op) = self.ops.get_mut(i) {
            op.done = Some(now);
            op.outcome = outcome;
        }
    }

    /// The operations so far.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// What is wrong with the run, given what each key's owners hold at the
    /// end (`finals[key]`: one copy per owner) and when owner sets changed
    /// (`changes`, simulated ms): empty when nothing is.
    pub fn check(&self, finals: &BTreeMap<String, Vec<Copy>>, changes: &[u64]) -> Vec<String> {
        let mut wrong = Vec::new();
        let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            by_key.entry(&op.key).or_default().push(op);
        }
        for (key, copies) in finals {
            let ops = by_key.get(key.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            check_final(key, ops, copies, &mut wrong);
        }
        for (key, ops) in &by_key {
            check_reads(key, ops, changes, &mut wrong);
        }
        wrong
    }
}

impl History {
    /// The newest version of `key` acknowledged by `before` (simulated ms)
    /// by a write during which no owner set changed (see `changes` in
    /// [`History::check`]) and that `counts`: what a worker that says it is
    /// ready at a topology published at `before` must hold if it owns `key`
    /// (`counts` picks the writes it must have had from a sync).
    pub fn owed(
        &self,
        key: &str,
        before: u64,
        changes: &[u64],
        counts: impl Fn(&Op) -> bool,
    ) -> Option<Version> {
        self.ops
            .iter()
            .filter(|op| op.key == key && op.done.is_some_and(|done| done < before))
            .filter(|op| counts(op))
            .filter(|op| {
                let done = op.done.unwrap_or(u64::MAX);
                !changes.iter().any(|t| (op.invoked..=done).contains(t))
            })
            .filter_map(acked)
            .max()
    }
}

fn acked(op: &Op) -> Option<Version> {
    match (&op.kind, &op.outcome) {
        (Kind::Put(_) | Kind::Delete, Outcome::Written(v)) => Some(*v),
        _ => None,
    }
}

fn write_of<'o>(ops: &[&'o Op], value: &Bytes) -> Option<&'o Op> {
    ops.iter()
        .copied()
        .find(|op| matches!(&op.kind, Kind::Put(v) if v == value))
}

/// The owners agree, the copy they hold was written, and no acknowledged
/// write is newer than it.
fn check_final(key: &str, ops: &[&Op], copies: &[Copy], wrong: &mut Vec<String>) {
    let Some(first) = copies.first() else {
        wrong.push(format!("{key}: no owners at the end"));
        return;
    };
    if copies.iter().any(|c| c != first) {
        wrong.push(format!("{key}: the owners disagree: {copies:?}"));
    }
    let newest_acked = ops.iter().filter_map(|op| acked(op)).max();
    let held = first.as_ref().map(|(v, _)| *v);
    if let Some(acked) = newest_acked {
        if held.is_none_or(|held| held < acked) {
            wrong.push(format!(
                "{key}: acknowledged write {acked} lost: the owners hold {first:?}"
            ));
        }
    }
    match first {
        Some((version, Some(value))) => match write_of(ops, value) {
            None => wrong.push(format!("{key}: holds {value:?}, which nobody wrote")),
            Some(op) => {
                if let Some(acked) = acked(op) {
                    if acked != *version {
                        wrong.push(format!(
                            "{key}: holds {value:?} at {version}, acknowledged at {acked}"
                        ));
                    }
                }
            }
        },
        Some((version, None)) => {
            let deleted = ops
                .iter()
                .any(|op| op.kind == Kind::Delete && acked(op).is_none_or(|v| v == *version));
            if !deleted {
                wrong.push(format!("{key}: a tombstone at {version} nobody wrote"));
            }
        }
        None => {}
    }
}

/// Each read returned a written value, no older than every write
/// acknowledged before it began while the owner sets stayed put.
fn check_reads(key: &str, ops: &[&Op], changes: &[u64], wrong: &mut Vec<String>) {
    for read in ops.iter().filter(|op| op.kind == Kind::Get) {
        let Outcome::Read(answer) = &read.outcome else {
            continue;
        };
        let before = |op: &&&Op| op.done.is_some_and(|done| done < read.invoked);
        let must = ops
            .iter()
            .filter(before)
            .filter_map(|op| acked(op).map(|v| (v, *op)))
            .max_by_key(|(v, _)| *v);
        let end = read.done.unwrap_or(u64::MAX);
        let stable = |since: u64| !changes.iter().any(|t| (since..=end).contains(t));
        let must = must.filter(|(_, write)| stable(write.invoked));
        match answer {
            Some((version, value)) => {
                if write_of(ops, value).is_none() {
                    wrong.push(format!("{key}: read {value:?}, which nobody wrote"));
                }
                if let Some((acked, _)) = must {
                    if *version < acked {
                        wrong.push(format!(
                            "{key}: a read at {} saw {version}, older than {acked} acknowledged before it",
                            read.invoked
                        ));
                    }
                }
            }
            None => {
                // Nothing found: stale if the newest acknowledged write
                // before the read is a value and no delete could have
                // removed it by the time the read ended.
                let Some((
                    acked,
                    Op {
                        kind: Kind::Put(_), ..
                    },
                )) = must
                else {
                    continue;
                };
                let deleted = ops
                    .iter()
                    .any(|op| op.kind == Kind::Delete && op.invoked <= end);
                if !deleted {
                    wrong.push(format!(
                        "{key}: a read at {} found nothing, though {acked} was acknowledged before it",
                        read.invoked
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(hlc: u64) -> Version {
        Version { hlc, node: 1 }
    }

    fn put(h: &mut History, key: &str, value: &'static str, at: u64, outcome: Outcome) {
        let i = h.invoke(key, Kind::Put(Bytes::from_static(value.as_bytes())), at);
        h.complete(i, outcome, at + 1);
    }

    fn finals(key: &str, copies: Vec<Copy>) -> BTreeMap<String, Vec<Copy>> {
        BTreeMap::from([(key.to_string(), copies)])
    }

    fn copy(hlc: u64, value: &'static str) -> Copy {
        Some((v(hlc), Some(Bytes::from_static(value.as_bytes()))))
    }

    #[test]
    fn a_clean_history_passes() {
        let mut h = History::default();
        put(&mut h, "k", "a", 0, Outcome::Written(v(10)));
        put(&mut h, "k", "b", 5, Outcome::Unknown);
        let i = h.invoke("k", Kind::Get, 3);
        h.complete(i, Outcome::Read(Some((v(10), "a".into()))), 4);
        assert!(h
            .check(&finals("k", vec![copy(10, "a"); 3]), &[])
            .is_empty());
        // The write of unknown outcome may have won.
        assert!(h
            .check(&finals("k", vec![copy(20, "b"); 3]), &[])
            .is_empty());
    }

    #[test]
    fn each_kind_of_wrong_end_is_named() {
        let mut h = History::default();
        put(&mut h, "k", "a", 0, Outcome::Written(v(10)));
        put(&mut h, "k", "b", 5, Outcome::Failed("quorum".into()));
        let lost = h.check(&finals("k", vec![None; 3]), &[]);
        assert!(lost[0].contains("acknowledged write"), "{lost:?}");
        let older = h.check(&finals("k", vec![copy(5, "b"); 3]), &[]);
        assert!(older[0].contains("lost"), "{older:?}");
        let split = h.check(&finals("k", vec![copy(10, "a"), copy(10, "a"), None]), &[]);
        assert!(split[0].contains("disagree"), "{split:?}");
        let invented = h.check(&finals("k", vec![copy(30, "z"); 3]), &[]);
        assert!(invented[0].contains("nobody wrote"), "{invented:?}");
        let tomb = h.check(&finals("k", vec![Some((v(30), None)); 3]), &[]);
        assert!(tomb[0].contains("tombstone"), "{tomb:?}");
    }

    #[test]
    fn a_read_older_than_an_earlier_acknowledged_write_is_stale() {
        let mut h = History::default();
        put(&mut h, "k", "a", 0, Outcome::Written(v(10)));
        put(&mut h, "k", "b", 10, Outcome::Written(v(20)));
        let i = h.invoke("k", Kind::Get, 20);
        h.complete(i, Outcome::Read(Some((v(10), "a".into()))), 21);
        let j = h.invoke("k", Kind::Get, 30);
        h.complete(j, Outcome::Read(None), 31);
        let wrong = h.check(&finals("k", vec![copy(20, "b"); 3]), &[]);
        assert_eq!(wrong.len(), 2, "{wrong:?}");
        assert!(wrong[0].contains("older than"), "{wrong:?}");
        assert!(wrong[1].contains("found nothing"), "{wrong:?}");
        // With an owner set changed meanwhile, SPEC does not promise it.
        assert!(h
            .check(&finals("k", vec![copy(20, "b"); 3]), &[15])
            .is_empty());
        // A delete begun before the read ended explains finding nothing.
        let d = h.invoke("k", Kind::Delete, 29);
        h.complete(d, Outcome::Unknown, 40);
        let wrong = h.check(&finals("k", vec![copy(20, "b"); 3]), &[]);
        assert_eq!(wrong.len(), 1, "{wrong:?}");
    }
}
