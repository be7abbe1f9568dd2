//! Cache semantics through the real binary: expiry and eviction set in link config, as an
//! operator sets them, and seen by components through wRPC.

mod common;

use std::time::Duration;

use common::*;

/// Waits until health reports `at_least` keys reclaimed by expiry (the sweep runs on its own).
async fn expired_at_least(p: &Provider, at_least: u64) -> String {
    p.wait_for_health(|m| {
        m.split(", ")
            .find_map(|part| part.strip_suffix(" expired"))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= at_least)
    })
    .await
}

#[tokio::test]
async fn keys_expire_their_links_ttl_after_their_last_write_per_bucket() {
    let server = NatsServer::start();
    let p = Provider::start(&server, &[], &[]).await;
    let config = [
        ("ttl_secs", "1"),
        ("ttl_secs.forever", "0"),
        ("ttl_secs.longer", "30"),
    ];
    p.put_link_config("sessions", "default", &config, 1).await;
    let c = p.as_component("sessions", "default");
    c.set("b", "k", b"v").await.unwrap();
    c.set_many("b", &[("m1", b"1"), ("m2", b"2")])
        .await
        .unwrap();
    assert_eq!(c.increment("b", "n", 3).await, Ok(3));
    c.set("forever", "k", b"v").await.unwrap();
    c.set("longer", "k", b"v").await.unwrap();
    assert_eq!(c.get("b", "k").await, Ok(Some(b"v".to_vec())));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(c.get("b", "k").await, Ok(None));
    assert_eq!(c.exists("b", "m1").await, Ok(false));
    assert_eq!(c.get_many("b", &["m1", "m2"]).await, Ok(vec![None, None]));
    assert_eq!(c.list_all("b", 1000).await, Vec::<String>::new());
    assert_eq!(
        c.increment("b", "n", 1).await,
        Ok(1),
        "an expired counter starts over"
    );
    assert_eq!(c.get("forever", "k").await, Ok(Some(b"v".to_vec())));
    assert_eq!(c.get("longer", "k").await, Ok(Some(b"v".to_vec())));
    // Nothing reads these: the sweep reclaims them, and health and the counters say so.
    c.set("b", "unread", b"v").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // k, m1, m2 and n went on access, then unread and the new n by the sweep.
    let health = expired_at_least(&p, 6).await;
    assert!(
        health.contains(" 2 keys"),
        "forever/k and longer/k stay: {health}"
    );
}

#[tokio::test]
async fn a_full_cache_with_lru_evicts_instead_of_refusing_and_others_keep_refusing() {
    let server = NatsServer::start();
    let p = Provider::start(&server, &[("max_keys", "100")], &[]).await;
    p.put_link_config("cache", "default", &[("eviction", "lru")], 1)
        .await;
    p.put_link_config("plain", "default", &[], 2).await;
    let cache = p.as_component("cache", "default");
    for i in 0..100 {
        cache.set("b", &format!("k{i:03}"), b"v").await.unwrap();
    }
    // Recently read keys are kept while older ones remain to evict; 40 more writes succeed.
    // (Approximate LRU: with half the keys older than the read ones, a sample of 16 misses
    // them all with odds of 2^-16.)
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..10 {
        assert!(cache.get("b", &format!("k{i:03}")).await.unwrap().is_some());
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 100..120 {
        cache.set("b", &format!("k{i:03}"), b"v").await.unwrap();
    }
    let pairs: Vec<(String, &[u8])> = (0..20).map(|i| (format!("batch{i}"), &b"w"[..])).collect();
    let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    cache.set_many("b", &pairs).await.unwrap();
    for i in 0..10 {
        let key = format!("k{i:03}");
        assert_eq!(cache.exists("b", &key).await, Ok(true), "{key} evicted");
    }
    for (key, _) in &pairs {
        assert_eq!(cache.exists("b", key).await, Ok(true), "{key} of the batch");
    }
    assert_eq!(cache.list_all("b", 1000).await.len(), 100);
    let health = p.wait_for_health(|m| m.contains(" 40 evicted")).await;
    assert!(health.contains(" 0 expired"), "{health}");
    // The namespace that did not opt in is refused at its limit, and loses nothing.
    let plain = p.as_component("plain", "default");
    for i in 0..100 {
        plain.set("b", &format!("k{i}"), b"v").await.unwrap();
    }
    let message = other_message(plain.set("b", "one-more", b"v").await);
    assert!(message.contains("max_keys=100"), "{message}");
    assert_eq!(plain.list_all("b", 1000).await.len(), 100);
    // A batch larger than the limit cannot fit even after eviction: refused, nothing evicted.
    let many: Vec<String> = (0..101).map(|i| format!("big{i}")).collect();
    let many: Vec<(&str, &[u8])> = many.iter().map(|k| (k.as_str(), &b""[..])).collect();
    let message = other_message(cache.set_many("b", &many).await);
    assert!(message.contains("even after evicting"), "{message}");
    assert_eq!(cache.exists("b", "k000").await, Ok(true));
}

#[tokio::test]
async fn links_sharing_a_namespace_evict_only_when_all_of_them_opt_in() {
    let server = NatsServer::start();
    let p = Provider::start(&server, &[("max_keys", "10")], &[]).await;
    let lru = [
        ("namespace", "shared"),
        ("eviction", "lru"),
        ("ttl_secs", "1"),
    ];
    p.put_link_config("writer", "default", &lru, 1).await;
    p.put_link_config("reader", "default", &[("namespace", "shared")], 2)
        .await;
    let writer = p.as_component("writer", "default");
    let reader = p.as_component("reader", "default");
    for i in 0..10 {
        reader.set("b", &format!("k{i}"), b"v").await.unwrap();
    }
    let message = other_message(writer.set("b", "new", b"v").await);
    assert!(
        message.contains("max_keys=10"),
        "the reader did not opt in: {message}"
    );
    p.delete_link("reader", "default", 1).await;
    writer.set("b", "new", b"v").await.unwrap();
    // Each write expires as its own link says: the reader's keys have no TTL, the writer's do.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(writer.get("b", "new").await, Ok(None));
    assert_eq!(writer.list_all("b", 1000).await.len(), 9);
}

#[tokio::test]
async fn unusable_link_values_are_ignored_and_the_link_still_works() {
    let server = NatsServer::start();
    let p = Provider::start(&server, &[("max_keys", "1")], &[]).await;
    let config = [("ttl_secs", "soon"), ("eviction", "lfu")];
    p.put_link_config("c", "default", &config, 1).await;
    let c = p.as_component("c", "default");
    c.set("b", "k", b"v").await.unwrap();
    let message = other_message(c.set("b", "other", b"v").await);
    assert!(message.contains("max_keys=1"), "no eviction: {message}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(c.get("b", "k").await, Ok(Some(b"v".to_vec())), "no expiry");
}
