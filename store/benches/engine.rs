//! The storage engine alone, no NATS: `cargo bench -p keyvalue-store --bench engine`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keyvalue_store::{Engine, Limits};

const KEYS: usize = 100_000;

fn engine() -> (Engine, Vec<String>) {
    let engine = Engine::new(Limits {
        max_key_bytes: 4096,
        max_value_bytes: 1 << 20,
        max_keys: u64::MAX,
        max_total_bytes: u64::MAX,
        list_page_size: 1000,
        max_listing_bytes: u64::MAX,
    });
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key-{i:011}")).collect();
    for key in &keys {
        engine
            .set("ns", "bucket", key, &[b'v'; 100])
            .expect("preload");
    }
    (engine, keys)
}

fn single_key(c: &mut Criterion) {
    let (engine, keys) = engine();
    let mut group = c.benchmark_group("single key");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("get (hit, 100 B)", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            engine.get("ns", "bucket", &keys[i % KEYS])
        })
    });
    group.bench_function("exists", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            engine.exists("ns", "bucket", &keys[i % KEYS])
        })
    });
    group.bench_function("set (overwrite, 100 B)", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            engine.set("ns", "bucket", &keys[i % KEYS], &[b'w'; 100])
        })
    });
    group.bench_function("increment (hot key)", |b| {
        b.iter(|| engine.increment("ns", "counters", "hits", 1))
    });
    group.finish();
}

fn batches(c: &mut Criterion) {
    let (engine, keys) = engine();
    let mut group = c.benchmark_group("batch of 100");
    group.throughput(Throughput::Elements(100));
    let mut i = 0usize;
    group.bench_function("get-many", |b| {
        b.iter(|| {
            i = (i + 100) % (KEYS - 100);
            // The engine takes the keys a decoded call owns; copying them is part of the cost.
            engine.get_many("ns", "bucket", keys[i..i + 100].to_vec())
        })
    });
    group.bench_function("set-many (overwrite)", |b| {
        b.iter(|| {
            i = (i + 100) % (KEYS - 100);
            engine.set_many(
                "ns",
                "bucket",
                keys[i..i + 100]
                    .iter()
                    .map(|k| (k.as_str(), &b"0123456789abcdef"[..])),
            )
        })
    });
    group.finish();
}

fn listing(c: &mut Criterion) {
    let (engine, _) = engine();
    let mut group = c.benchmark_group("list-keys");
    group.sample_size(10);
    group.throughput(Throughput::Elements(KEYS as u64));
    group.bench_function("full pass over 100k keys, page 1000", |b| {
        b.iter(|| {
            let mut cursor = None;
            let mut n = 0;
            loop {
                let page = engine.list_keys("ns", "bucket", cursor).expect("page");
                n += page.keys.len();
                match page.cursor {
                    Some(c) => cursor = Some(c),
                    None => break n,
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, single_key, batches, listing);
criterion_main!(benches);
