//! Answers to a co-owner comparing and pulling ranges of the hash circle:
//! digests, key lists and copies, each answer bounded in size so a page
//! never approaches the frame limit, resumed from a cursor (the last key
//! sent, in `(xxh3(key), key)` order).

use crate::store::Store;
use kv_wire::{Digest, Entry, HashRange, Response, Ring, Version};

/// Most `(key, version)` pairs in one [`Response::Listed`].
const LIST_PAGE: usize = 16 * 1024;
/// Bytes of keys and values in one [`Response::Entries`] (the frame limit
/// is 16 MiB; values are at most 1 MiB by default).
const ENTRIES_BYTES: usize = 4 * 1024 * 1024;
/// Most ranges compared by one request.
const MAX_COMPARE: usize = 64 * 1024;

/// The ranges whose digest here differs from the sender's, with ours.
pub fn compare(store: &dyn Store, ranges: &[(HashRange, Digest)]) -> Response {
    let differing = ranges
        .iter()
        .take(MAX_COMPARE)
        .enumerate()
        .filter_map(|(i, (range, theirs))| {
            let mine = store.digest(*range);
            (mine != *theirs).then_some((i as u32, mine))
        })
        .collect();
    Response::Compared(differing)
}

/// A page of the `(key, version)` pairs in `range`, in order from the
/// cursor on.
pub fn list(store: &dyn Store, range: HashRange, after: Option<&str>) -> Response {
    let cursor = after.map(|k| (Ring::key_hash(k.as_bytes()), k));
    let mut items: Vec<(String, Version)> = Vec::new();
    let mut next = None;
    store.versions_in_order(range, cursor, &mut |key, version| {
        if items.len() == LIST_PAGE {
            // A pair beyond the page: the page ends before it.
            next = items.last().map(|(k, _)| k.clone());
            return false;
        }
        items.push((key.to_string(), version));
        true
    });
    Response::Listed { items, next }
}

/// A page of the copies in `range`, read in order from the cursor on (a
/// durable store reads the page's part of its engine, not each copy).
pub fn fetch_range(store: &dyn Store, range: HashRange, after: Option<&str>) -> Response {
    let cursor = after.map(|k| (Ring::key_hash(k.as_bytes()), k));
    let mut entries: Vec<Entry> = Vec::new();
    let (mut bytes, mut next) = (0, None);
    store.copies_in_order(range, cursor, &mut |key, copy| {
        if bytes >= ENTRIES_BYTES {
            // A copy beyond the budget: the page ends before it.
            next = entries.last().map(|e| e.key.clone());
            return false;
        }
        bytes += copy.size(key) + 32;
        entries.push(Entry {
            key: key.to_string(),
            version: copy.version,
            value: copy.value,
        });
        true
    });
    Response::Entries { entries, next }
}

/// The copies of `keys` held here, as many as fit in one answer.
pub fn fetch(store: &dyn Store, keys: Vec<String>) -> Response {
    entries(store, keys.into_iter())
}

/// Copies of `keys` in order until the byte budget is spent; `next` names
/// the last key considered when some are left.
fn entries(store: &dyn Store, keys: impl Iterator<Item = String>) -> Response {
    let mut keys = keys.peekable();
    let (mut entries, mut bytes, mut last) = (Vec::new(), 0, None);
    for key in keys.by_ref() {
        if let Some(copy) = store.get(&key) {
            bytes += copy.size(&key) + 32;
            entries.push(Entry {
                key: key.clone(),
                version: copy.version,
                value: copy.value,
            });
        }
        last = Some(key);
        if bytes >= ENTRIES_BYTES {
            break;
        }
    }
    let next = if keys.peek().is_some() { last } else { None };
    Response::Entries { entries, next }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemStore, Stored};
    use bytes::Bytes;

    fn filled(n: usize, value_len: usize) -> MemStore {
        let store = MemStore::new();
        fill(&store, n, value_len);
        store
    }

    fn fill(store: &dyn Store, n: usize, value_len: usize) {
        for i in 0..n {
            store
                .apply(
                    &format!("key:{i}"),
                    Stored {
                        version: Version { hlc: 1, node: 1 },
                        value: Some(Bytes::from(vec![b'x'; value_len])),
                    },
                )
                .unwrap();
        }
    }

    #[test]
    fn paging_through_a_range_lists_every_key_once_in_order() {
        crate::store::each_store(|store| {
            fill(store, 40_000, 1);
            let (mut seen, mut after) = (Vec::new(), None::<String>);
            loop {
                let Response::Listed { items, next } =
                    list(store, HashRange::ALL, after.as_deref())
                else {
                    panic!("not a list")
                };
                assert!(items.len() <= LIST_PAGE);
                seen.extend(items.into_iter().map(|(k, _)| k));
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            assert_eq!(seen.len(), 40_000);
            let hashes: Vec<(u64, &String)> = seen
                .iter()
                .map(|k| (Ring::key_hash(k.as_bytes()), k))
                .collect();
            assert!(
                hashes.windows(2).all(|w| w[0] < w[1]),
                "in order, no repeats"
            );
        });
    }

    #[test]
    fn fetching_a_range_pages_by_bytes_and_resumes_from_the_cursor() {
        crate::store::each_store(|store| {
            fill(store, 100, 100 * 1024);
            let (mut got, mut after, mut pages) = (Vec::new(), None::<String>, 0);
            loop {
                let Response::Entries { entries, next } =
                    fetch_range(store, HashRange::ALL, after.as_deref())
                else {
                    panic!("not entries")
                };
                pages += 1;
                let bytes: usize = entries
                    .iter()
                    .map(|e| e.value.as_ref().map_or(0, Bytes::len))
                    .sum();
                assert!(bytes <= ENTRIES_BYTES + 100 * 1024, "{bytes}");
                got.extend(entries.into_iter().map(|e| e.key));
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            assert_eq!(got.len(), 100);
            let hashes: Vec<(u64, &String)> = (got.iter())
                .map(|k| (Ring::key_hash(k.as_bytes()), k))
                .collect();
            assert!(
                hashes.windows(2).all(|w| w[0] < w[1]),
                "in order, no repeats"
            );
            assert!(pages >= 3, "{pages} pages for 10 MB");
        });
    }

    #[test]
    fn compare_names_only_the_ranges_that_differ() {
        let store = filled(1000, 1);
        let ring = Ring::with_vnodes(["a", "b", "c"], 32);
        let mut ranges: Vec<(HashRange, Digest)> = ring
            .arcs()
            .into_iter()
            .map(|(r, _)| (r, store.digest(r)))
            .collect();
        ranges[3].1.count += 1;
        let Response::Compared(differ) = compare(&store, &ranges) else {
            panic!()
        };
        assert_eq!(differ, vec![(3, store.digest(ranges[3].0))]);
    }
}
