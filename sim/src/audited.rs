//! A store that checks, at every write, the promise every store makes: a
//! copy is only ever replaced by a newer one. The final checks see only
//! where the cluster ends up, and anti-entropy repairs an owner that went
//! back to an older version before the end; this sees the step itself.

use kv_wire::{Digest, HashRange, Version};
use kv_worker::store::{Applied, Persisted, Store, StoreError, Stored};
use std::sync::{Arc, Mutex};

/// What became of a copy in a worker's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A newer copy was stored.
    Stored,
    /// The copy was removed (handed off).
    Removed,
}

/// Told of every copy a worker stores or removes: its key and version.
pub type OnChange = Arc<dyn Fn(Change, &str, Version) + Send + Sync>;

/// Wraps a worker's store; reports into `regressions`.
pub struct Audited {
    inner: Arc<dyn Store>,
    worker: String,
    regressions: Arc<Mutex<Vec<String>>>,
    on_change: Option<OnChange>,
}

impl Audited {
    /// `inner`, checked, on behalf of `worker`.
    pub fn new(inner: Arc<dyn Store>, worker: &str, regressions: Arc<Mutex<Vec<String>>>) -> Self {
        Audited {
            inner,
            worker: worker.to_string(),
            regressions,
            on_change: None,
        }
    }

    /// Also tells `on_change` of every copy stored or removed.
    pub fn on_change(mut self, on_change: OnChange) -> Self {
        self.on_change = Some(on_change);
        self
    }

    fn tell(&self, change: Change, key: &str, version: Version) {
        if let Some(on_change) = &self.on_change {
            on_change(change, key, version);
        }
    }

    /// Records a regression if `key` went from `before` to an older copy.
    /// (The simulator runs on one thread and a store write never awaits,
    /// so nothing else touches the key between the two looks.)
    fn check(&self, key: &str, before: Option<Version>) {
        let after = self.inner.held_version(key);
        if let Some(after) = after.filter(|after| before < Some(*after)) {
            self.tell(Change::Stored, key, after);
        }
        if let (Some(before), Some(after)) = (before, after) {
            if after < before {
                self.regressions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!(
                        "{} replaced {key}'s copy {before} with the older {after}",
                        self.worker
                    ));
            }
        }
    }
}

impl Store for Audited {
    fn get(&self, key: &str) -> Option<Stored> {
        self.inner.get(key)
    }

    fn apply(&self, key: &str, copy: Stored) -> Result<Applied, StoreError> {
        let before = self.inner.held_version(key);
        let applied = self.inner.apply(key, copy);
        self.check(key, before);
        applied
    }

    fn apply_many(&self, copies: &[(String, Stored)]) -> Vec<Result<Applied, StoreError>> {
        let before: Vec<_> = copies
            .iter()
            .map(|(key, _)| self.inner.held_version(key))
            .collect();
        let applied = self.inner.apply_many(copies);
        // A key that comes twice is checked against its first look: the
        // batch as a whole must not go back either.
        for ((key, _), before) in copies.iter().zip(before) {
            self.check(key, before);
        }
        applied
    }

    fn held_version(&self, key: &str) -> Option<Version> {
        self.inner.held_version(key)
    }

    fn persisted(&self) -> Persisted {
        self.inner.persisted()
    }

    fn remove_if(&self, key: &str, version: Version) -> bool {
        let removed = self.inner.remove_if(key, version);
        if removed {
            self.tell(Change::Removed, key, version);
        }
        removed
    }

    fn scan(&self, range: HashRange, visit: &mut dyn FnMut(&str, Version)) {
        self.inner.scan(range, visit)
    }

    fn digest(&self, range: HashRange) -> Digest {
        self.inner.digest(range)
    }

    fn purge_tombstones(&self, before: Version) -> usize {
        self.inner.purge_tombstones(before)
    }

    fn stats(&self) -> (usize, usize) {
        self.inner.stats()
    }

    fn failing(&self) -> Option<String> {
        self.inner.failing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kv_worker::store::MemStore;

    fn v(millis: u64) -> Version {
        Version {
            hlc: millis << 16,
            node: 1,
        }
    }

    fn copy(millis: u64) -> Stored {
        Stored {
            version: v(millis),
            value: Some(Bytes::from_static(b"v")),
        }
    }

    #[test]
    fn an_honest_store_passes_and_a_step_back_is_caught() {
        let regressions = Arc::new(Mutex::new(Vec::new()));
        let store = Audited::new(Arc::new(MemStore::new()), "w1", regressions.clone());
        store.apply("k", copy(5)).expect("stored");
        store.apply("k", copy(3)).expect("ignored");
        let _ = store.apply_many(&[("k".into(), copy(2)), ("k".into(), copy(7))]);
        assert!(store.remove_if("k", v(7)), "a removal is no step back");
        store.apply("k", copy(1)).expect("stored");
        assert!(regressions.lock().expect("lock").is_empty());
        // What a careless store's write would leave: 1 where 9 was held.
        store.check("k", Some(v(9)));
        assert_eq!(
            *regressions.lock().expect("lock"),
            vec![format!(
                "w1 replaced k's copy {} with the older {}",
                v(9),
                v(1)
            )]
        );
    }
}
