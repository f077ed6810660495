//! A quorum read made by the client itself: it asks the key's first
//! [`kv_wire::READ_QUORUM`] owners for their own copies
//! ([`Consistency::Owner`]) and takes
//! the newest, where a coordinated read costs a hop more (client to
//! coordinator to owner and back). With W=2 on the same two owners (the
//! primary and the first replica), that is the last acknowledged write.
//! An owner that cannot vouch for its copy coordinates the whole read
//! instead and answers it; this decides what the owners' answers add up to.

use crate::{ClientError, ConnectionError};
use kv_wire::message::{Consistency, FailureKind};
use kv_wire::{Entry, Member, Request, Response, View, READ_QUORUM};

/// The asks of a read of `key` by `view`: each of its first
/// [`READ_QUORUM`] owners, for its own copy at `view`'s epoch; `None`
/// when `view` has fewer owners (an owner must coordinate the read).
pub fn asks<'v>(view: &'v View, key: &str) -> Option<Vec<(&'v Member, Request)>> {
    let owners = view.owners(key);
    let consistency = Consistency::Owner {
        epoch: view.epoch(),
    };
    let asked = owners.get(..READ_QUORUM)?.iter().map(|&owner| {
        let request = Request::Get {
            key: key.to_string(),
            consistency,
        };
        (owner, request)
    });
    Some(asked.collect())
}

/// What the answers of the owners asked decide: the newest live copy
/// (`None`: absent or deleted) or why the read fails for good; `None` when
/// they decide nothing (an owner failed or answered something else): then
/// an owner must coordinate the read.
pub fn decide(
    answers: impl IntoIterator<Item = Result<Response, ConnectionError>>,
) -> Option<Result<Option<Entry>, ClientError>> {
    let mut newest: Option<Entry> = None;
    for answer in answers {
        match answer {
            Ok(Response::OwnCopy(copy)) => {
                if copy.as_ref().map(|c| c.version) > newest.as_ref().map(|c| c.version) {
                    newest = copy;
                }
            }
            // That owner coordinated the whole read: its answer is the read's.
            Ok(Response::Value(entry)) => return Some(Ok(entry)),
            Ok(Response::Failed(f)) if f.kind == FailureKind::BadRequest => {
                return Some(Err(ClientError::Refused(f)))
            }
            Err(e) if e.is_final() => return Some(Err(e.into())),
            _ => return None,
        }
    }
    // A tombstone newer than every value is a delete: nothing to read.
    Some(Ok(newest.filter(|e| e.value.is_some())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kv_wire::message::Failure;
    use kv_wire::Version;

    fn copy(hlc: u64, value: Option<&'static str>) -> Option<Entry> {
        Some(Entry {
            key: "k".into(),
            version: Version { hlc, node: 1 },
            value: value.map(|v| Bytes::from_static(v.as_bytes())),
        })
    }

    fn own(hlc: u64, value: Option<&'static str>) -> Result<Response, ConnectionError> {
        Ok(Response::OwnCopy(copy(hlc, value)))
    }

    fn value(entry: &Option<Result<Option<Entry>, ClientError>>) -> Option<&[u8]> {
        match entry {
            Some(Ok(Some(e))) => e.value.as_deref(),
            other => panic!("not a value: {other:?}"),
        }
    }

    #[test]
    fn the_newest_copy_of_the_owners_wins_in_either_order() {
        let answers = [own(5, Some("old")), own(9, Some("new"))];
        assert_eq!(value(&decide(answers.clone())), Some(&b"new"[..]));
        let [a, b] = answers;
        assert_eq!(value(&decide([b, a])), Some(&b"new"[..]));
        assert_eq!(
            value(&decide([own(5, Some("only")), Ok(Response::OwnCopy(None))])),
            Some(&b"only"[..])
        );
    }

    #[test]
    fn a_newer_tombstone_reads_as_absent_and_an_older_one_loses() {
        assert!(matches!(
            decide([own(5, Some("v")), own(9, None)]),
            Some(Ok(None))
        ));
        assert_eq!(
            value(&decide([own(9, Some("v")), own(5, None)])),
            Some(&b"v"[..])
        );
        assert!(matches!(
            decide([Ok(Response::OwnCopy(None)), Ok(Response::OwnCopy(None))]),
            Some(Ok(None))
        ));
    }

    #[test]
    fn an_owner_that_coordinated_the_read_decides_it() {
        let whole = Ok(Response::Value(copy(3, Some("whole"))));
        assert_eq!(
            value(&decide([own(9, Some("mine")), whole])),
            Some(&b"whole"[..])
        );
    }

    #[test]
    fn a_failed_or_odd_answer_decides_nothing_but_a_refusal_ends_the_read() {
        let lost = Err(ConnectionError::Lost {
            addr: "a".into(),
            reason: "reset".into(),
        });
        assert!(decide([own(9, Some("v")), lost]).is_none());
        let unavailable = Ok(Response::Failed(Failure::new(
            FailureKind::Unavailable,
            "no",
        )));
        assert!(decide([unavailable, own(9, Some("v"))]).is_none());
        assert!(decide([own(9, Some("v")), Ok(Response::Wanted(vec![]))]).is_none());
        let bad = Ok(Response::Failed(Failure::new(
            FailureKind::BadRequest,
            "bad key",
        )));
        assert!(matches!(
            decide([bad, own(9, Some("v"))]),
            Some(Err(ClientError::Refused(_)))
        ));
        let refused = Err(ConnectionError::Unauthenticated {
            addr: "a".into(),
            reason: "wrong secret".into(),
        });
        assert!(matches!(
            decide([own(9, Some("v")), refused]),
            Some(Err(ClientError::Connection(_)))
        ));
    }
}
