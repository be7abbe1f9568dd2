//! Watch events, end to end: the real binary and a real nats-server; a stand-in component
//! (`client::watcher`) serves `wrpc:keyvalue/watcher` on its own wRPC prefix, as the host does
//! for a component exporting `wasi:keyvalue/watcher`, and the provider is linked to it.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use keyvalue_inmemory::client::watcher::{Heard, Watcher};
use keyvalue_inmemory::watch::Totals;

/// How long an expected event may take to arrive.
const EVENT_WAIT: Duration = Duration::from_secs(5);
/// How long to listen for events that must not come.
const QUIET: Duration = Duration::from_millis(500);

/// What a heard call says: `set k=v` or `del k`.
fn said(heard: &Heard) -> String {
    match &heard.value {
        Some(value) => format!("set {}={}", heard.key, String::from_utf8_lossy(value)),
        None => format!("del {}", heard.key),
    }
}

/// The next `n` calls, failing the test if they do not all come.
async fn hear(w: &mut Watcher, n: usize) -> Vec<Heard> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        match w.next(EVENT_WAIT).await {
            Some(heard) => all.push(heard),
            None => panic!(
                "heard {} of {n} events: {:?}",
                all.len(),
                all.iter().map(said).collect::<Vec<_>>()
            ),
        }
    }
    all
}

/// Asserts that nothing more is heard for a while.
async fn silence(w: &mut Watcher) {
    if let Some(extra) = w.next(QUIET).await {
        panic!("unexpected event: {}", said(&extra));
    }
}

/// Waits until the stand-in heard no new call for 500 ms (at most 10 s); answers how many it
/// heard in all.
async fn settled(w: &Watcher) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = w.count();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = w.count();
        if now == last || tokio::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Health's watch event figures: (delivered, dropped, failed, queued).
fn event_figures(health: &str) -> (u64, u64, u64, u64) {
    let t = Totals::read(health).expect(health);
    (t.delivered, t.dropped, t.failed, t.queued as u64)
}

/// The events of each key, in the order heard.
fn per_key(heard: &[Heard]) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in heard {
        keys.entry(h.key.clone()).or_default().push(said(h));
    }
    keys
}

/// A provider where `writer` and the watching component `w1` share namespace `shared`, and
/// `loner` has a namespace of its own; `w1`'s stand-in serves on its prefix.
async fn watched(config: &[(&str, &str)], server: &NatsServer) -> (Provider, Watcher) {
    let links = [
        ("writer", "default", Some("shared")),
        ("w1", "default", Some("shared")),
        ("loner", "default", None),
    ];
    let p = Provider::start(server, config, &links).await;
    let w = Watcher::serve(p.nats.clone(), LATTICE, "w1").await.unwrap();
    (p, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_prefix_rules_tell_of_the_changes_they_name_in_the_watchers_namespace() {
    let server = NatsServer::start();
    let (p, mut w) = watched(&[], &server).await;
    let rules = "SET@user:*,DEL@user:*,SET@exact,DEL:other@*";
    p.put_watch_link("w1", "default", &[("watch", rules)], 1)
        .await;
    let c = p.as_component("writer", "default");
    c.set("b", "user:1", b"a").await.unwrap();
    c.set("b", "unwatched", b"x").await.unwrap();
    c.set("b", "exact", b"e").await.unwrap();
    c.set("b", "exact2", b"no").await.unwrap();
    c.increment("b", "user:n", 1).await.unwrap();
    c.increment("b", "user:n", 2).await.unwrap();
    c.set_many("b", &[("user:2", &b"m"[..]), ("nope", &b"n"[..])])
        .await
        .unwrap();
    c.delete("b", "user:1").await.unwrap();
    c.delete("b", "user:1").await.unwrap(); // already gone: no event
    c.delete("b", "exact").await.unwrap(); // only SET@exact: no event
    c.delete_many("b", &["user:2", "user:missing"])
        .await
        .unwrap();
    c.set("other", "k", b"o").await.unwrap(); // DEL:other@* only
    c.delete("other", "k").await.unwrap();
    c.delete("b2", "user:1").await.unwrap(); // never written: no event
                                             // Another namespace's writes of watched keys are not the watcher's business.
    let loner = p.as_component("loner", "default");
    loner.set("b", "user:1", b"secret").await.unwrap();
    loner.delete("b", "user:1").await.unwrap();

    let heard = hear(&mut w, 8).await;
    silence(&mut w).await;
    let expect: BTreeMap<String, Vec<String>> = [
        ("user:1", vec!["set user:1=a", "del user:1"]),
        ("exact", vec!["set exact=e"]),
        ("user:n", vec!["set user:n=1", "set user:n=3"]),
        ("user:2", vec!["set user:2=m", "del user:2"]),
        ("k", vec!["del k"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(per_key(&heard), expect);
    for h in &heard {
        // What the 1.x host parses as the bucket: a resource handle number.
        assert_eq!(h.bucket, "0");
        assert_eq!(h.header("source-id"), Some(p.key.as_str()));
        assert_eq!(h.header("link-name"), Some("default"));
    }
    let health = p.wait_for_health(|m| m.contains(": 8 delivered")).await;
    assert!(health.contains(" 1 watchers, "), "{health}");
    assert_eq!(event_figures(&health), (8, 0, 0, 0), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_of_one_key_arrive_in_the_order_they_happened() {
    let server = NatsServer::start();
    let (p, mut w) = watched(&[], &server).await;
    p.put_watch_link("w1", "default", &[("watch", "SET@*,DEL@*")], 1)
        .await;
    // 8 callers × 50 increments of one counter, with sets of other keys in between.
    let callers = (0..8).map(|i| {
        let c = p.as_component("writer", "default");
        async move {
            for j in 0..50 {
                c.increment("b", "counter", 1).await.unwrap();
                c.set("b", &format!("k{i}"), format!("{j}").as_bytes())
                    .await
                    .unwrap();
            }
        }
    });
    futures::future::join_all(callers).await;
    let heard = hear(&mut w, 800).await;
    silence(&mut w).await;
    let counter: Vec<u64> = (heard.iter())
        .filter(|h| h.key == "counter")
        .map(|h| {
            String::from_utf8_lossy(h.value.as_ref().unwrap())
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(counter, (1..=400).collect::<Vec<u64>>());
    for i in 0..8 {
        let values: Vec<String> = (heard.iter())
            .filter(|h| h.key == format!("k{i}"))
            .map(said)
            .collect();
        let expect: Vec<String> = (0..50).map(|j| format!("set k{i}={j}")).collect();
        assert_eq!(values, expect);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_watch_link_stops_delivery_at_once_and_a_new_one_starts_it() {
    let server = NatsServer::start();
    let (p, mut w) = watched(&[], &server).await;
    let c = p.as_component("writer", "default");
    // A watch link without its component's store link observes nothing.
    p.put_watch_link("w2", "default", &[("watch", "SET@*")], 1)
        .await;
    p.put_watch_link("w1", "default", &[("watch", "SET@*")], 2)
        .await;
    let mut w2 = Watcher::serve(p.nats.clone(), LATTICE, "w2").await.unwrap();
    c.set("b", "before", b"1").await.unwrap();
    assert_eq!(said(&hear(&mut w, 1).await[0]), "set before=1");
    silence(&mut w2).await;

    p.delete_watch_link("w1", "default", 1).await;
    for i in 0..100 {
        c.set("b", &format!("after{i}"), b"2").await.unwrap();
    }
    silence(&mut w).await;

    // Deleted with a full queue whose calls time out every 200 ms (each timeout lets its
    // lane send the next event), it is told nothing more once the delete is done.
    let settings = [("watch", "SET@*"), ("watch_timeout_ms", "200")];
    p.put_watch_link("w1", "default", &settings, 2).await;
    w.stall(true);
    for i in 0..200 {
        c.set("b", &format!("queued{i}"), b"3").await.unwrap();
    }
    let (delivered, ..) = event_figures(&p.wait_for_health(|_| true).await);
    while w.count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.delete_watch_link("w1", "default", 1).await;
    // A call a lane began just before the delete may still arrive: counted once all is quiet.
    let heard = settled(&w).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.count(), heard, "calls started after the link delete");
    let health = p.wait_for_health(|_| true).await;
    let (after, dropped, failed, queued) = event_figures(&health);
    assert_eq!((after, queued), (delivered, 0), "{health}");
    assert_eq!(
        dropped + failed,
        200,
        "every queued event accounted for: {health}"
    );
    w.stall(false);
    w.drain();
    silence(&mut w).await;

    // The watcher's store link decides what it observes: moved to `loner`'s namespace, it
    // hears `loner`'s writes, not `writer`'s.
    // (A link put twice is ignored by the SDK: a changed link is deleted, then put.)
    p.delete_link("w1", "default", 2).await;
    p.put_link("w1", "default", None, 3).await;
    p.put_watch_link("w1", "default", &[("watch", "SET@*")], 2)
        .await;
    c.set("b", "shared", b"3").await.unwrap();
    p.as_component("w1", "default")
        .set("b", "own", b"4")
        .await
        .unwrap();
    assert_eq!(said(&hear(&mut w, 1).await[0]), "set own=4");
    silence(&mut w).await;
    // Its store link of the watch link's name gone, it observes nothing, even of its own
    // namespace written through another link.
    p.delete_link("w1", "default", 2).await;
    p.put_link("w1", "other", None, 3).await;
    p.as_component("w1", "other")
        .set("b", "own", b"5")
        .await
        .unwrap();
    silence(&mut w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_a_component_nobody_serves_fail_at_once_not_at_the_timeout() {
    let server = NatsServer::start();
    let (p, _w) = watched(&[], &server).await;
    p.put_link("ghost", "default", Some("shared"), 4).await;
    let settings = [("watch", "SET@*"), ("watch_timeout_ms", "600000")];
    p.put_watch_link("ghost", "default", &settings, 1).await;
    let c = p.as_component("writer", "default");
    for i in 0..3 {
        c.set("b", &format!("k{i}"), b"v").await.unwrap();
    }
    // NATS answers "no responders": well within the harness's wait, the 10-minute timeout far off.
    p.wait_for_health(|m| m.contains(": 0 delivered, 0 dropped, 3 failed, 0 queued;"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_loses_events_beyond_its_queue_and_the_writes_go_on() {
    let server = NatsServer::start();
    let (p, mut w) = watched(&[], &server).await;
    let settings = [
        ("watch", "SET@*"),
        ("watch_queue", "100"),
        ("watch_timeout_ms", "10000"),
    ];
    p.put_watch_link("w1", "default", &settings, 1).await;
    w.stall(true);
    // 2000 sets from 32 callers: every one answered while the watcher answers nothing.
    let callers = (0..32).map(|i| {
        let c = p.as_component("writer", "default");
        async move {
            for j in 0..2000 / 32 + 1 {
                let n = i * (2000 / 32 + 1) + j;
                if n < 2000 {
                    c.set("b", &format!("k{n}"), b"v").await.unwrap();
                }
            }
        }
    });
    futures::future::join_all(callers).await;
    // The queue holds 100 events, calls in flight included; the rest were dropped.
    let health = p.wait_for_health(|_| true).await;
    assert!(
        health.contains("watch events: 0 delivered, 1900 dropped, 0 failed, 100 queued"),
        "{health}"
    );
    // At most one call in flight per lane.
    settled(&w).await;
    let in_flight = w.drain().len() as u64;
    assert!((1..=16).contains(&in_flight), "{in_flight} calls in flight");

    // Answering again: the calls left waiting time out (failed), the rest is delivered.
    w.stall(false);
    let health = p.wait_for_health(|m| m.contains(" 0 queued;")).await;
    assert_eq!(
        event_figures(&health),
        (100 - in_flight, 1900, in_flight, 0),
        "{health}"
    );
    hear(&mut w, 100 - in_flight as usize).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_evicted_keys_are_told_as_deletions() {
    let server = NatsServer::start();
    let p = Provider::start(&server, &[("max_keys", "2")], &[]).await;
    let mut w = Watcher::serve(p.nats.clone(), LATTICE, "w1").await.unwrap();
    let cache = [
        ("namespace", "cache"),
        ("ttl_secs", "1"),
        ("eviction", "lru"),
    ];
    p.put_link_config("writer", "default", &cache, 1).await;
    p.put_link_config("w1", "default", &cache, 2).await;
    p.put_watch_link("w1", "default", &[("watch", "DEL@*")], 1)
        .await;
    let c = p.as_component("writer", "default");
    c.set("b", "old", b"1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.set("b", "new", b"2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.set("b", "newest", b"3").await.unwrap(); // evicts one of the others
    let evicted = said(&hear(&mut w, 1).await[0]);
    assert!(
        ["del old", "del new"].contains(&evicted.as_str()),
        "{evicted}"
    );
    // Nothing reads the rest: the sweep reclaims them after their TTL, and tells of it.
    let mut gone: Vec<String> = hear(&mut w, 2).await.iter().map(said).collect();
    gone.push(evicted);
    gone.sort();
    assert_eq!(gone, ["del new", "del newest", "del old"]);
    let health = p.wait_for_health(|_| true).await;
    assert!(health.contains("2 expired, 1 evicted"), "{health}");
}

/// Events queued for a watcher whose store link moves to another namespace are not delivered:
/// they came from data it can no longer read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_moved_to_another_namespace_is_not_told_what_was_queued_before() {
    let server = NatsServer::start();
    let (p, mut w) = watched(&[], &server).await;
    let settings = [("watch", "SET@*"), ("watch_timeout_ms", "3000")];
    p.put_watch_link("w1", "default", &settings, 1).await;
    w.stall(true);
    let c = p.as_component("writer", "default");
    for i in 0..50 {
        c.set("b", &format!("secret{i}"), b"s").await.unwrap();
    }
    p.wait_for_health(|m| m.contains(" 50 queued;")).await;
    p.delete_link("w1", "default", 2).await;
    p.put_link("w1", "default", None, 3).await;
    // Still stalled: the calls in flight time out; the rest is dropped, never sent.
    let health = p.wait_for_health(|m| m.contains(" 0 queued;")).await;
    let (delivered, dropped, failed, _) = event_figures(&health);
    assert_eq!((delivered, dropped + failed), (0, 50), "{health}");
    let heard = w.drain().len();
    assert!(
        heard <= 16,
        "only calls in flight before the move were sent: {heard}"
    );
}
