//! What the unit tests of several modules share.

use crate::{Engine, Limits};

/// Tight limits the unit tests work under.
pub fn limits() -> Limits {
    Limits {
        max_key_bytes: 64,
        max_value_bytes: 1024,
        max_keys: 100,
        max_total_bytes: 10_000,
        list_page_size: 10,
        max_listing_bytes: 1 << 20,
    }
}

pub fn strings(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// Every key of a bucket, page after page, checking each page's size.
pub fn list_all(e: &Engine, ns: &str, bucket: &str) -> Vec<String> {
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = e.list_keys(ns, bucket, cursor).unwrap();
        assert!(page.keys.len() <= e.limits().list_page_size);
        all.extend(page.keys);
        match page.cursor {
            Some(c) => cursor = Some(c),
            None => return all,
        }
    }
}

/// Keys and bytes of namespace `ns` recounted from its live entries, to check the counters
/// against.
pub fn recount(e: &Engine, ns: &str) -> (u64, u64) {
    let (mut keys, mut bytes) = (0, 0);
    for bucket in e.bucket_names(ns) {
        for key in e.bucket_keys(ns, &bucket) {
            if let Some(v) = e.get(ns, &bucket, &key) {
                keys += 1;
                bytes += (key.len() + v.len()) as u64;
            }
        }
    }
    (keys, bytes)
}
