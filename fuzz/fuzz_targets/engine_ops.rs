//! Arbitrary operation sequences on the engine under tight limits, against a BTreeMap model:
//! every read, every refusal, the usage figures and full listings must agree.
#![no_main]

use keyvalue_store as engine;

use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Set(u8, u8, Vec<u8>),
    Get(u8, u8),
    Delete(u8, u8),
    Increment(u8, u8, u64),
    SetMany(u8, Vec<(u8, Vec<u8>)>),
    DeleteMany(u8, Vec<u8>),
    List(u8),
}

const MAX_KEYS: usize = 16;
const MAX_VALUE: usize = 32;
const MAX_TOTAL: u64 = 256;

type Model = BTreeMap<(String, String), Vec<u8>>;

fn names(b: u8, k: u8) -> (String, String) {
    ((b % 3).to_string(), format!("k{}", k % 24))
}

fn size(m: &Model) -> u64 {
    m.iter().map(|((_, k), v)| (k.len() + v.len()) as u64).sum()
}

fn fits(m: &Model) -> bool {
    m.len() <= MAX_KEYS && size(m) <= MAX_TOTAL
}

fn counter(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fuzz_target!(|ops: Vec<Op>| {
    let e = engine::Engine::new(engine::Limits {
        max_key_bytes: 8,
        max_value_bytes: MAX_VALUE,
        max_keys: MAX_KEYS as u64,
        max_total_bytes: MAX_TOTAL,
        list_page_size: 5,
        max_listing_bytes: 1 << 20,
    });
    let mut model = Model::new();
    for op in ops.into_iter().take(300) {
        match op {
            Op::Set(b, k, v) => {
                let key = names(b, k);
                let mut next = model.clone();
                next.insert(key.clone(), v.clone());
                let ok = v.len() <= MAX_VALUE && fits(&next);
                assert_eq!(e.set("n", &key.0, &key.1, &v).is_ok(), ok, "set {key:?}");
                if ok {
                    model = next;
                }
            }
            Op::Get(b, k) => {
                let key = names(b, k);
                let got = e.get("n", &key.0, &key.1).map(|v| v.to_vec());
                assert_eq!(got.as_ref(), model.get(&key), "get {key:?}");
            }
            Op::Delete(b, k) => {
                let key = names(b, k);
                e.delete("n", &key.0, &key.1);
                model.remove(&key);
            }
            Op::Increment(b, k, d) => {
                let key = names(b, k);
                let current = model.get(&key).map_or(Some(0), |v| counter(v));
                let expect = current.and_then(|c| c.checked_add(d)).and_then(|n| {
                    let mut next = model.clone();
                    next.insert(key.clone(), n.to_string().into_bytes());
                    fits(&next).then_some((n, next))
                });
                let got = e.increment("n", &key.0, &key.1, d).ok();
                assert_eq!(got, expect.as_ref().map(|(n, _)| *n), "increment {key:?}");
                if let Some((_, next)) = expect {
                    model = next;
                }
            }
            Op::SetMany(b, pairs) => {
                let bucket = names(b, 0).0;
                let pairs: Vec<(String, Vec<u8>)> = pairs
                    .into_iter()
                    .take(8)
                    .map(|(k, v)| (names(b, k).1, v))
                    .collect();
                let mut next = model.clone();
                for (k, v) in &pairs {
                    next.insert((bucket.clone(), k.clone()), v.clone());
                }
                let ok = pairs.iter().all(|(_, v)| v.len() <= MAX_VALUE) && fits(&next);
                let got = e.set_many(
                    "n",
                    &bucket,
                    pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                );
                assert_eq!(got.is_ok(), ok, "set-many");
                if ok {
                    model = next;
                }
            }
            Op::DeleteMany(b, keys) => {
                let bucket = names(b, 0).0;
                let keys: Vec<String> = keys.into_iter().take(8).map(|k| names(b, k).1).collect();
                e.delete_many("n", &bucket, keys.iter().map(String::as_str));
                for k in keys {
                    model.remove(&(bucket.clone(), k));
                }
            }
            Op::List(b) => {
                let bucket = names(b, 0).0;
                let mut listed = Vec::new();
                let mut cursor = None;
                loop {
                    let page = e.list_keys("n", &bucket, cursor).expect("list");
                    listed.extend(page.keys);
                    cursor = page.cursor;
                    if cursor.is_none() {
                        break;
                    }
                }
                let want: Vec<String> = model
                    .keys()
                    .filter(|(mb, _)| *mb == bucket)
                    .map(|(_, k)| k.clone())
                    .collect();
                assert_eq!(listed, want, "list {bucket}");
            }
        }
        let usage = e.usage();
        assert_eq!(usage.keys, model.len() as u64);
        assert_eq!(usage.bytes, size(&model));
    }
});
