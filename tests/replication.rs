//! Several instances of one provider serving as one store through NATS JetStream
//! (`replication = "jetstream"`): real provider processes on one JetStream nats-server, every
//! call sent to the provider's queue group as the host sends it, so it lands on any instance.
//! (`replicated_contract.rs` runs the whole contract suite against two instances.)

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const C1: &str = "component-one";
const LINKS: &[(&str, &str, Option<&str>)] = &[(C1, "default", None)];

/// `n` instances of one new provider, replicated with `config` added.
async fn instances(server: &NatsServer, n: usize, config: &[(&str, &str)]) -> Vec<Provider> {
    let key = unique_key();
    let mut all = Vec::new();
    for i in 0..n {
        all.push(start(server, &key, &format!("i{i}"), config).await);
    }
    all
}

/// One more instance of provider `key`, named `instance`.
async fn start(
    server: &NatsServer,
    key: &str,
    instance: &str,
    config: &[(&str, &str)],
) -> Provider {
    let mut config = config.to_vec();
    config.push(("replication", "jetstream"));
    Provider::start_instance(server, key, instance, &config, LINKS).await
}

/// Waits until every instance named reports `keys` keys in health.
async fn wait_for_keys(p: &Provider, instances: &[&str], keys: u64) {
    let figures = format!(" {keys} keys,");
    p.wait_for_health_of(instances, |health| health.contains(&figures))
        .await;
}

fn value(i: usize) -> Vec<u8> {
    format!("value-{i}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_answer_as_one_store() {
    let server = NatsServer::start();
    let all = instances(&server, 2, &[("list_page_size", "7")]).await;
    let c = all[0].as_component(C1, "default");
    let keys: Vec<String> = (0..200).map(|i| format!("key-{i:03}")).collect();
    for (i, key) in keys.iter().enumerate() {
        c.set("b", key, &value(i)).await.unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(c.get("b", key).await, Ok(Some(value(i))), "{key}");
    }
    wait_for_keys(&all[0], &["i0", "i1"], 200).await;
    // Listing pages land on either instance; the listing lives on one.
    assert_eq!(c.list_all("b", 7).await, keys);
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    c.delete_many("b", &refs[..100]).await.unwrap();
    c.delete("b", &keys[100]).await.unwrap();
    for key in &keys[..101] {
        assert_eq!(c.exists("b", key).await, Ok(false), "{key}");
    }
    wait_for_keys(&all[0], &["i0", "i1"], 99).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_are_exact_across_three_instances() {
    let server = NatsServer::start();
    let all = Arc::new(instances(&server, 3, &[]).await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let all = Arc::clone(&all);
            tokio::spawn(async move {
                let c = all[0].as_component(C1, "default");
                let mut seen = Vec::new();
                for _ in 0..50 {
                    seen.push(c.increment("b", "hits", 1).await.unwrap());
                }
                seen
            })
        })
        .collect();
    let mut every = BTreeSet::new();
    for task in tasks {
        let seen = task.await.unwrap();
        // One caller's increments are in its order.
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        every.extend(seen);
    }
    // Each of the 400 increments got its own value: none lost, none counted twice.
    assert_eq!(every, (1..=400).collect::<BTreeSet<u64>>());
    let c = all[0].as_component(C1, "default");
    assert_eq!(c.get("b", "hits").await, Ok(Some(b"400".to_vec())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_acknowledged_anywhere_is_read_by_the_next_call() {
    let server = NatsServer::start();
    let all = instances(&server, 2, &[]).await;
    let c = all[0].as_component(C1, "default");
    // Each round's read lands on either instance: about half of them on the one that did not
    // take the write.
    for i in 0..300 {
        c.set("b", "k", &value(i)).await.unwrap();
        assert_eq!(c.get("b", "k").await, Ok(Some(value(i))), "round {i}");
        let pairs = [("x", &value(i)[..]), ("y", &value(i)[..])];
        c.set_many("b", &pairs).await.unwrap();
        let both = c.get_many("b", &["x", "y"]).await.unwrap();
        assert_eq!(
            both,
            vec![Some(("x".into(), value(i))), Some(("y".into(), value(i)))]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_many_is_all_or_nothing_on_every_instance() {
    let server = NatsServer::start();
    let all = instances(&server, 2, &[("max_keys", "10")]).await;
    let c = all[0].as_component(C1, "default");
    let pairs: Vec<(String, Vec<u8>)> = (0..8).map(|i| (format!("k{i}"), value(i))).collect();
    let refs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    c.set_many("b", &refs).await.unwrap();
    // Limits are checked against what the instance taking a write has applied.
    wait_for_keys(&all[0], &["i0", "i1"], 8).await;
    // Five more keys would pass max_keys=10: none of them is written, anywhere.
    let more: Vec<(String, Vec<u8>)> = (8..13).map(|i| (format!("k{i}"), value(i))).collect();
    let refs: Vec<(&str, &[u8])> = more.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let message = other_message(c.set_many("b", &refs).await);
    assert!(message.contains("max_keys=10"), "{message}");
    wait_for_keys(&all[0], &["i0", "i1"], 8).await;
}

#[tokio::test]
async fn a_batch_over_jetstreams_atomic_limit_is_refused_whole() {
    let server = NatsServer::start();
    let all = instances(&server, 1, &[]).await;
    let c = all[0].as_component(C1, "default");
    let many: Vec<String> = (0..1001).map(|i| format!("m{i}")).collect();
    let refs: Vec<(&str, &[u8])> = many.iter().map(|k| (k.as_str(), &b"v"[..])).collect();
    let message = other_message(c.set_many("b", &refs).await);
    assert!(message.contains("1001 keys"), "{message}");
    assert_eq!(c.exists("b", "m0").await, Ok(false));
    c.set_many("b", &refs[..1000]).await.unwrap();
    assert_eq!(c.list_all("b", 1000).await.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_and_a_new_one_catch_up_before_they_answer() {
    let server = NatsServer::start();
    let mut all = instances(&server, 2, &[]).await;
    let (mut second, mut first) = (all.pop().unwrap(), all.pop().unwrap());
    let key = first.key.clone();
    let c = first.as_component(C1, "default");
    for i in 0..500 {
        c.set("b", &format!("k{i}"), &value(i)).await.unwrap();
    }
    // Both serve (which also shows that what is waited for below can be seen).
    wait_for_serving(&server, &key, 2);
    second.signal("KILL");
    second.wait_exit().await;
    // Calls still sent to the queue group now reach the survivor only.
    wait_for_serving(&server, &key, 1);
    for i in 500..800 {
        c.set("b", &format!("k{i}"), &value(i)).await.unwrap();
    }
    let gone: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    let refs: Vec<&str> = gone.iter().map(String::as_str).collect();
    c.delete_many("b", &refs).await.unwrap();
    assert_eq!(c.increment("b", "n", 7).await, Ok(7));
    // Restarted under a new instance id, as a host restarts it.
    let restarted = start(&server, &key, "i1-again", &[]).await;
    let health = restarted
        .wait_for_health(|h| h.contains("instance i1-again,"))
        .await;
    assert!(
        health.contains(" 701 keys,"),
        "caught up before health: {health}"
    );
    // With the first instance gone, every call is the restarted one's.
    first.signal("KILL");
    first.wait_exit().await;
    wait_for_serving(&server, &key, 1);
    let c = restarted.as_component(C1, "default");
    for i in 0..800 {
        let expected = (i >= 100).then(|| value(i));
        assert_eq!(c.get("b", &format!("k{i}")).await, Ok(expected), "k{i}");
    }
    assert_eq!(c.increment("b", "n", 1).await, Ok(8));
}

/// A call that may fail while nats-server is away: `None` when it did not go through.
async fn try_set(p: &Provider, key: &str, value: &[u8]) -> Option<Result<(), store::Error>> {
    let headers = keyvalue_inmemory::client::component_headers(C1, "default");
    let value = bytes::Bytes::copy_from_slice(value);
    let call = store::set(&p.wrpc, Some(headers), "b", key, &value);
    tokio::time::timeout(Duration::from_secs(3), call)
        .await
        .ok()?
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_nats_server_restarts() {
    let mut server = NatsServer::start();
    let all = instances(&server, 2, &[("jetstream_storage", "file")]).await;
    let key = all[0].key.clone();
    let c = all[0].as_component(C1, "default");
    for i in 0..300 {
        c.set("b", &format!("k{i}"), &value(i)).await.unwrap();
    }
    assert_eq!(c.increment("b", "n", 5).await, Ok(5));
    // A writer keeps writing through the restart; what it was told is stored must be there.
    let writer = {
        let p = Provider::start_instance(
            &server,
            &key,
            "writer",
            &[("replication", "jetstream"), ("jetstream_storage", "file")],
            LINKS,
        )
        .await;
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let began = Instant::now();
            let mut i = 0;
            while began.elapsed() < Duration::from_secs(4) {
                let key = format!("during{i}");
                if let Some(Ok(())) = try_set(&p, &key, b"d").await {
                    acknowledged.push(key);
                }
                i += 1;
            }
            acknowledged
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    // The instances reconnect and recover by themselves: writes go through again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(Ok(())) = try_set(&all[0], "after", b"restart").await {
            break;
        }
        assert!(Instant::now() < deadline, "writes never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let acknowledged = writer.await.unwrap();
    assert!(!acknowledged.is_empty());
    // Everything acknowledged is in the stream: an instance that never saw any of it, alone,
    // has it all.
    drop(all);
    wait_for_serving(&server, &key, 0);
    let fresh = start(&server, &key, "fresh", &[("jetstream_storage", "file")]).await;
    let c = fresh.as_component(C1, "default");
    for i in 0..300 {
        assert_eq!(
            c.get("b", &format!("k{i}")).await,
            Ok(Some(value(i))),
            "k{i}"
        );
    }
    assert_eq!(c.get("b", "after").await, Ok(Some(b"restart".to_vec())));
    assert_eq!(c.increment("b", "n", 1).await, Ok(6));
    for key in &acknowledged {
        assert_eq!(c.get("b", key).await, Ok(Some(b"d".to_vec())), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_holds_live_entries_only_and_refuses_writes_when_full() {
    let server = NatsServer::start();
    let all = instances(&server, 1, &[("jetstream_max_bytes", "65536")]).await;
    let c = all[0].as_component(C1, "default");
    for i in 0..500 {
        c.set("b", "same", &value(i)).await.unwrap();
    }
    for i in 0..20 {
        c.set("b", &format!("gone{i}"), b"x").await.unwrap();
        c.delete("b", &format!("gone{i}")).await.unwrap();
    }
    // Deleting keys that are not there costs no marker.
    for i in 0..50 {
        c.delete("b", &format!("never{i}")).await.unwrap();
    }
    let never: Vec<String> = (0..50).map(|i| format!("never-many{i}")).collect();
    let refs: Vec<&str> = never.iter().map(String::as_str).collect();
    c.delete_many("b", &refs).await.unwrap();
    let js = async_nats::jetstream::new(all[0].nats.clone());
    let name = format!("KVINMEM_{LATTICE}_{}", all[0].key);
    let info = js
        .get_stream(&name)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    // One message for the live key, one delete marker for each deleted key (until its TTL).
    assert_eq!(info.state.messages, 21, "{:?}", info.state);
    // Full: a write is refused with the reason, and nothing is dropped to make room.
    let big = vec![b'v'; 16 * 1024];
    let mut refused = None;
    for i in 0..8 {
        if let Err(err) = c.set("b", &format!("big{i}"), &big).await {
            refused = Some(format!("{err:?}"));
            break;
        }
    }
    let refused = refused.expect("a full stream refuses writes");
    assert!(refused.contains("replication"), "{refused}");
    assert_eq!(c.get("b", "same").await, Ok(Some(value(499))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keeps_its_settings_and_a_start_asking_for_another_storage_is_refused() {
    let server = NatsServer::start();
    let all = instances(&server, 1, &[("jetstream_max_bytes", "65536")]).await;
    let key = all[0].key.clone();
    all[0]
        .as_component(C1, "default")
        .set("b", "k", b"v")
        .await
        .unwrap();
    // Another size limit: the instance starts and says so; the stream keeps the one it was
    // made with (instances of an older and a newer config would otherwise undo each other's).
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let config = [
        ("replication", "jetstream"),
        ("jetstream_max_bytes", "1048576"),
    ];
    let other =
        Provider::start_instance_logging(&server, &key, "other", &config, LINKS, Some(&log)).await;
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("keeps the size limit and replicas it was made with"),
        "{stderr}"
    );
    let js = async_nats::jetstream::new(all[0].nats.clone());
    let name = format!("KVINMEM_{LATTICE}_{key}");
    let max_bytes = || async {
        let mut stream = js.get_stream(&name).await.unwrap();
        stream.info().await.unwrap().config.max_bytes
    };
    assert_eq!(max_bytes().await, 65536);
    // A stream's storage cannot change: a start asking for another is refused, with the
    // reason, and the stream and its entries stay.
    let memory = [
        ("replication", "jetstream"),
        ("jetstream_storage", "memory"),
    ];
    let stderr = Provider::start_refused(&server, &key, "memory", &memory).await;
    assert!(
        stderr.contains("keeps its entries in file storage, but jetstream_storage = memory"),
        "{stderr}"
    );
    assert_eq!(max_bytes().await, 65536);
    let c = other.as_component(C1, "default");
    assert_eq!(c.get("b", "k").await, Ok(Some(b"v".to_vec())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_instances_within_what_is_in_flight() {
    let server = NatsServer::start();
    let all = Arc::new(instances(&server, 2, &[("max_keys", "40")]).await);
    let writers = 4;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let all = Arc::clone(&all);
            tokio::spawn(async move {
                let c = all[0].as_component(C1, "default");
                let mut refused = 0;
                for i in 0..30 {
                    if let Err(err) = c.set("b", &format!("w{w}-{i}"), b"v").await {
                        assert!(format!("{err:?}").contains("max_keys=40"), "{err:?}");
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = 0;
    for task in tasks {
        refused += task.await.unwrap();
    }
    let c = all[0].as_component(C1, "default");
    let stored = c.list_all("b", 1000).await.len();
    // Near a limit a write first catches up with the stream: instances racing there pass it
    // by at most the writes in flight (one a writer here); every write was either stored or
    // refused.
    assert!((40..=40 + writers).contains(&stored), "{stored} stored");
    assert_eq!(stored + refused, 120);
    wait_for_keys(&all[0], &["i0", "i1"], stored as u64).await;
    let message = other_message(c.set("b", "one-more", b"v").await);
    assert!(message.contains("max_keys=40"), "{message}");
}

#[tokio::test]
async fn eviction_cannot_be_asked_for_with_replication() {
    let server = NatsServer::start();
    let all = instances(&server, 1, &[]).await;
    let p = &all[0];
    let link = test_support::host::link(
        "evicting",
        &p.key,
        "default",
        serde_json::json!({"eviction": "lru"}),
    );
    p.publish_control("linkdefs.put", serde_json::to_vec(&link).unwrap())
        .await;
    // Links are taken in order: once a later plain link is active, the evicting one was
    // refused, not merely late.
    p.put_link("plain", "default", None, 2).await;
    assert!(is_denied(
        &p.as_component("evicting", "default").get("b", "k").await
    ));
    p.as_component("plain", "default")
        .set("b", "k", b"v")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_value_over_the_servers_max_payload_is_refused_and_nothing_breaks() {
    let server = NatsServer::start();
    let all = instances(&server, 1, &[]).await;
    let c = all[0].as_component(C1, "default");
    // max_value_bytes (1 MiB by default) admits it, and the call's parameters fit one NATS
    // message (max_payload 1 MiB); the value with its record and headers do not.
    let message = other_message(c.set("b", "big", &vec![7u8; (1 << 20) - 200]).await);
    assert!(message.contains("max_payload"), "{message}");
    // The connection was not closed by the server: the next writes go through at once.
    c.set("b", "small", b"v").await.unwrap();
    assert_eq!(c.increment("b", "n", 1).await, Ok(1));
    assert_eq!(c.get("b", "small").await, Ok(Some(b"v".to_vec())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_recover_by_themselves_from_a_long_outage() {
    let mut server = NatsServer::start();
    let all = instances(&server, 2, &[]).await;
    let key = all[0].key.clone();
    let c = all[0].as_component(C1, "default");
    for i in 0..50 {
        c.set("b", &format!("k{i}"), &value(i)).await.unwrap();
    }
    // Longer than async-nats's ordered consumer keeps trying to make itself again.
    server.restart_after(Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(try_set(&all[0], "after", b"outage").await, Some(Ok(()))) {
        assert!(Instant::now() < deadline, "writes never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each instance's connections come back on their own schedules: a write taken by one
    // whose replication connection is not back yet is refused (and tried again here).
    for i in 50..100 {
        while !matches!(
            try_set(&all[0], &format!("k{i}"), &value(i)).await,
            Some(Ok(()))
        ) {
            assert!(Instant::now() < deadline, "writes never recovered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Both instances apply the stream again: both hold the writes made after the outage.
    wait_for_keys(&all[0], &["i0", "i1"], 101).await;
    let c = all[1].as_component(C1, "default");
    for i in 0..100 {
        assert_eq!(
            c.get("b", &format!("k{i}")).await,
            Ok(Some(value(i))),
            "k{i}"
        );
    }
    drop(all);
    wait_for_serving(&server, &key, 0);
    let fresh = start(&server, &key, "fresh", &[]).await;
    let health = fresh
        .wait_for_health(|h| h.contains("instance fresh,"))
        .await;
    assert!(health.contains(" 101 keys,"), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_over_a_stream_full_of_replaced_writes_ends_with_the_last_ones() {
    let server = NatsServer::start();
    let all = instances(&server, 1, &[]).await;
    let key = all[0].key.clone();
    let c = all[0].as_component(C1, "default");
    // 20 keys written 100 times each: the stream keeps 20 of 2,000 messages, and every
    // delivery to a new instance jumps over the replaced ones.
    for round in 0..100 {
        let pairs: Vec<(String, Vec<u8>)> = (0..20)
            .map(|k| (format!("k{k}"), value(round * 100 + k)))
            .collect();
        for (k, v) in &pairs {
            c.set("b", k, v).await.unwrap();
        }
    }
    let late = start(&server, &key, "late", &[]).await;
    let health = late.wait_for_health(|h| h.contains("instance late,")).await;
    assert!(health.contains(" 20 keys,"), "{health}");
    drop(all);
    wait_for_serving(&server, &key, 1);
    let c = late.as_component(C1, "default");
    for k in 0..20 {
        assert_eq!(
            c.get("b", &format!("k{k}")).await,
            Ok(Some(value(9900 + k)))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_read_anywhere_never_goes_back() {
    let server = NatsServer::start();
    let all = Arc::new(instances(&server, 2, &[]).await);
    let writer = {
        let all = Arc::clone(&all);
        tokio::spawn(async move {
            let c = all[0].as_component(C1, "default");
            let mut last = 0;
            for _ in 0..400 {
                last = c.increment("b", "n", 1).await.unwrap();
            }
            last
        })
    };
    // Each read begins after the increments acknowledged before it: the values it sees never
    // decrease, whichever instance answers.
    let c = all[1].as_component(C1, "default");
    let mut seen = 0u64;
    while !writer.is_finished() {
        let read = c.get("b", "n").await.unwrap();
        let n = read.map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap());
        assert!(n >= seen, "read {n} after {seen}");
        seen = n;
    }
    assert_eq!(writer.await.unwrap(), 400);
    assert_eq!(c.get("b", "n").await, Ok(Some(b"400".to_vec())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_stream_lost_with_its_server_is_made_again_and_every_instance_follows_it() {
    let mut server = NatsServer::start();
    let all = instances(&server, 2, &[("jetstream_storage", "memory")]).await;
    let c = all[0].as_component(C1, "default");
    for i in 0..10 {
        c.set("b", &format!("k{i}"), &value(i)).await.unwrap();
    }
    wait_for_keys(&all[0], &["i0", "i1"], 10).await;
    // The stream lived in the server's memory: it is gone, and what the instances held with
    // it (`jetstream_storage = memory` does not survive a restart, as README says).
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(try_set(&all[0], "after", b"restart").await, Some(Ok(()))) {
        assert!(Instant::now() < deadline, "writes never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Both instances reloaded the new stream: they agree with it, not with what they had.
    wait_for_keys(&all[0], &["i0", "i1"], 1).await;
    let health = all[0].wait_for_health(|h| h.contains(" 1 reloads,")).await;
    assert!(health.contains(" 1 keys,"), "{health}");
    let c = all[1].as_component(C1, "default");
    assert_eq!(c.get("b", "after").await, Ok(Some(b"restart".to_vec())));
    assert_eq!(c.get("b", "k0").await, Ok(None));
}
