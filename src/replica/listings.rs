//! list-keys pages across instances.
//!
//! A listing is a sorted copy of a bucket's keys held by the instance that answered its first
//! page, and its cursor names that copy. The next page's call may land on another instance:
//! one that does not hold the listing asks the others (`{root}.listings`, core NATS); the one
//! that holds it answers the page, the others stay silent. A page asked this way is cut to
//! half of NATS's largest message.

use std::time::Duration;

use futures::StreamExt as _;
use keyvalue_store::{Cursor, EngineError, KeyPage};
use tracing::warn;

use super::Replica;

/// How long to wait for the instance holding a listing.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

fn subject(replica: &Replica) -> String {
    format!("{}_listings", replica.inner.root.replace('.', "_"))
}

/// Answers the pages of the listings this instance holds; runs for the life of the process.
pub(super) async fn serve(replica: Replica) {
    let mut requests = match replica.inner.nats.subscribe(subject(&replica)).await {
        Ok(requests) => requests,
        Err(err) => {
            warn!("replication: list-keys pages of this instance cannot be asked for: {err}");
            return;
        }
    };
    while let Some(request) = requests.next().await {
        let Some(reply) = request.reply else { continue };
        let Some((ns, bucket, cursor, max_bytes)) = decode_request(&request.payload) else {
            continue;
        };
        let max_bytes = max_bytes.min(page_bound(&replica));
        let page = replica.inner.engine.list_keys_within(
            ns,
            bucket,
            Some(Cursor::from(cursor)),
            max_bytes,
        );
        let answer = match page {
            // Not ours (or gone): the instance that holds it answers.
            Err(EngineError::UnknownCursor(_)) => continue,
            Err(err) => encode_answer(Err(&err.to_string())),
            Ok(page) => encode_answer(Ok(&page)),
        };
        let _ = replica.inner.nats.publish(reply, answer.into()).await;
    }
}

/// The page `cursor` names from whichever instance holds its listing: `None` when none does.
pub(super) async fn ask(
    replica: &Replica,
    ns: &str,
    bucket: &str,
    cursor: u64,
    max_bytes: usize,
) -> Option<Result<KeyPage, String>> {
    let request = encode_request(ns, bucket, cursor, max_bytes.min(page_bound(replica)));
    let asked = replica.inner.nats.request(subject(replica), request.into());
    let answer = tokio::time::timeout(ASK_TIMEOUT, asked).await.ok()?.ok()?;
    decode_answer(&answer.payload)
}

/// Half of NATS's largest message: room for the page and its framing.
fn page_bound(replica: &Replica) -> usize {
    (replica.inner.nats.server_info().max_payload / 2).max(4096)
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn take<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let bytes = rest.get(4..4 + len)?;
    *rest = &rest[4 + len..];
    Some(bytes)
}

fn take_u64(rest: &mut &[u8]) -> Option<u64> {
    let n = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    *rest = &rest[8..];
    Some(n)
}

fn encode_request(ns: &str, bucket: &str, cursor: u64, max_bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(ns.len() + bucket.len() + 24);
    put(&mut out, ns.as_bytes());
    put(&mut out, bucket.as_bytes());
    out.extend_from_slice(&cursor.to_be_bytes());
    out.extend_from_slice(&(max_bytes as u64).to_be_bytes());
    out
}

fn decode_request(mut rest: &[u8]) -> Option<(&str, &str, u64, usize)> {
    let ns = std::str::from_utf8(take(&mut rest)?).ok()?;
    let bucket = std::str::from_utf8(take(&mut rest)?).ok()?;
    let cursor = take_u64(&mut rest)?;
    let max_bytes = usize::try_from(take_u64(&mut rest)?).ok()?;
    rest.is_empty().then_some((ns, bucket, cursor, max_bytes))
}

/// `0` + message, or `1` + cursor (0: none) + the keys.
fn encode_answer(page: Result<&KeyPage, &str>) -> Vec<u8> {
    match page {
        Err(message) => {
            let mut out = vec![0];
            out.extend_from_slice(message.as_bytes());
            out
        }
        Ok(page) => {
            let mut out = vec![1];
            out.extend_from_slice(&page.cursor.map_or(0, u64::from).to_be_bytes());
            for key in &page.keys {
                put(&mut out, key.as_bytes());
            }
            out
        }
    }
}

fn decode_answer(bytes: &[u8]) -> Option<Result<KeyPage, String>> {
    let (&kind, mut rest) = bytes.split_first()?;
    if kind == 0 {
        return Some(Err(String::from_utf8_lossy(rest).into_owned()));
    }
    let cursor = take_u64(&mut rest)?;
    let mut keys = Vec::new();
    while !rest.is_empty() {
        keys.push(std::str::from_utf8(take(&mut rest)?).ok()?.to_owned());
    }
    Some(Ok(KeyPage {
        keys,
        cursor: (cursor != 0).then(|| Cursor::from(cursor)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_pages_round_trip_and_garbage_is_refused() {
        let request = encode_request("ns", "", 42, 1000);
        assert_eq!(decode_request(&request), Some(("ns", "", 42, 1000)));
        assert_eq!(decode_request(&request[..request.len() - 1]), None);
        assert_eq!(decode_request(&[0xff; 3]), None);
        let page = KeyPage {
            keys: vec!["a".into(), "".into(), "ключ".into()],
            cursor: Some(Cursor::from(7)),
        };
        let answer = decode_answer(&encode_answer(Ok(&page))).unwrap().unwrap();
        assert_eq!((answer.keys, answer.cursor), (page.keys, page.cursor));
        let last = KeyPage {
            keys: vec![],
            cursor: None,
        };
        let answer = decode_answer(&encode_answer(Ok(&last))).unwrap().unwrap();
        assert!(answer.keys.is_empty() && answer.cursor.is_none());
        assert_eq!(
            decode_answer(&encode_answer(Err("full"))),
            Some(Err("full".to_owned()))
        );
        assert_eq!(decode_answer(&[1, 0, 0]), None);
    }
}
