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
