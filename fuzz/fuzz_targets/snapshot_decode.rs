//! Arbitrary bytes as a snapshot file: the decoder never panics, loads nothing unless it
//! accepts the whole file, and what it accepts survives a write and a second read unchanged.
#![no_main]

use keyvalue_store as engine;
use keyvalue_store::snapshot;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let engine = engine::Engine::new(engine::Limits::UNLIMITED);
    let mut delivered = 0u64;
    let decoded = snapshot::decode(data, |record| {
        let snapshot::Record::Entry {
            namespace,
            bucket,
            key,
            value,
            deadline,
        } = record;
        delivered += 1;
        // A deadline already passed stores nothing.
        engine
            .set_with_deadline(namespace, bucket, key, value, deadline)
            .expect("unlimited");
    });
    let Ok(stats) = decoded else {
        return;
    };
    assert_eq!(stats.entries, delivered);
    let usage = engine.usage();
    assert!(usage.keys <= stats.entries);

    let path = std::env::temp_dir().join(format!("kv-fuzz-{}.snapshot", std::process::id()));
    snapshot::write(&engine, &path).expect("write");
    let again = engine::Engine::new(engine::Limits::UNLIMITED);
    let bytes = std::fs::read(&path).expect("read back");
    let restats = snapshot::decode(
        &bytes[..],
        |snapshot::Record::Entry {
             namespace,
             bucket,
             key,
             value,
             deadline,
         }| {
            again
                .set_with_deadline(namespace, bucket, key, value, deadline)
                .expect("unlimited");
        },
    )
    .expect("a snapshot we wrote must decode");
    assert_eq!(restats.entries, usage.keys);
    assert_eq!(again.usage(), usage);
});
