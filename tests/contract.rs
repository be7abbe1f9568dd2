//! The semantics users rely on, checked against the real binary over a real nats-server.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;

const C1: &str = "component-one";
const C2: &str = "component-two";

/// Whether this is the suite's run against two replicated instances: `tests/contract.rs` runs
/// it against one instance, `tests/replicated_contract.rs` includes it against two instances
/// of one provider serving as one store through JetStream, each call landing on either.
fn replicated() -> bool {
    module_path!().starts_with("replicated_contract")
}

/// The provider under test: one instance, or two replicated ones (calls and control messages
/// go to both, as the host's do).
struct Under {
    first: Provider,
    _second: Option<Provider>,
}

impl std::ops::Deref for Under {
    type Target = Provider;

    fn deref(&self) -> &Provider {
        &self.first
    }
}

/// Starts the provider under test with `config` and `links`.
async fn start(
    server: &NatsServer,
    config: &[(&str, &str)],
    links: &[(&str, &str, Option<&str>)],
) -> Under {
    if !replicated() {
        let first = Provider::start(server, config, links).await;
        return Under {
            first,
            _second: None,
        };
    }
    let key = unique_key();
    let mut config = config.to_vec();
    config.extend([
        ("replication", "jetstream"),
        ("jetstream_storage", "memory"),
    ]);
    let mut first = Provider::start_instance(server, &key, "one", &config, links).await;
    let second = Provider::start_instance(server, &key, "two", &config, links).await;
    // Links and config go to both: a wait for them ends once both have taken them.
    first.instances = vec!["one".into(), "two".into()];
    Under {
        first,
        _second: Some(second),
    }
}

/// A provider with one plain link from C1.
async fn linked() -> (NatsServer, Under) {
    let server = NatsServer::start();
    let provider = start(&server, &[], &[(C1, "default", None)]).await;
    (server, provider)
}

#[tokio::test]
async fn set_get_exists_delete_round_trip() {
    let (_server, p) = linked().await;
    let c = p.as_component(C1, "default");
    assert_eq!(c.get("b", "k").await, Ok(None));
    assert_eq!(c.exists("b", "k").await, Ok(false));
    c.set("b", "k", b"value").await.unwrap();
    assert_eq!(c.get("b", "k").await, Ok(Some(b"value".to_vec())));
    assert_eq!(c.exists("b", "k").await, Ok(true));
    c.set("b", "k", b"other").await.unwrap();
    assert_eq!(c.get("b", "k").await, Ok(Some(b"other".to_vec())));
    c.delete("b", "k").await.unwrap();
    assert_eq!(c.get("b", "k").await, Ok(None));
    assert_eq!(c.exists("b", "k").await, Ok(false));
    // Deleting a missing key is a no-op, not an error.
    c.delete("b", "k").await.unwrap();
}

#[tokio::test]
async fn values_are_bytes_and_the_empty_value_is_some() {
    let (_server, p) = linked().await;
    let c = p.as_component(C1, "default");
    c.set("b", "empty", b"").await.unwrap();
    assert_eq!(c.get("b", "empty").await, Ok(Some(vec![])));
    assert_eq!(c.exists("b", "empty").await, Ok(true));
    let all: Vec<u8> = (0..=255).collect();
    c.set("b", "binary", &all).await.unwrap();
    assert_eq!(c.get("b", "binary").await, Ok(Some(all)));
    // A value larger than one NATS message (1 MiB max_payload) goes in several.
    let big = vec![7u8; 900 * 1024];
    c.set("b", "big", &big).await.unwrap();
    assert_eq!(c.get("b", "big").await, Ok(Some(big)));
}

#[tokio::test]
async fn a_never_written_bucket_is_an_empty_bucket() {
    let (_server, p) = linked().await;
    let c = p.as_component(C1, "default");
    for bucket in ["never-written", ""] {
        assert_eq!(c.get(bucket, "k").await, Ok(None));
        assert_eq!(c.exists(bucket, "k").await, Ok(false));
        assert_eq!(c.delete(bucket, "k").await, Ok(()));
        let page = c.list_keys(bucket, None).await.unwrap();
        assert!(page.keys.is_empty() && page.cursor.is_none());
        assert_eq!(c.get_many(bucket, &["a", "b"]).await, Ok(vec![None, None]));
        assert_eq!(c.delete_many(bucket, &["a"]).await, Ok(()));
    }
    // "" is a bucket like any other.
    c.set("", "k", b"v").await.unwrap();
    assert_eq!(c.get("", "k").await, Ok(Some(b"v".to_vec())));
    assert_eq!(c.get("other", "k").await, Ok(None));
}

#[tokio::test]
async fn increment_creates_counts_and_refuses_non_counters() {
    let (_server, p) = linked().await;
    let c = p.as_component(C1, "default");
    assert_eq!(c.increment("b", "n", 5).await, Ok(5));
    assert_eq!(c.increment("b", "n", 10).await, Ok(15));
    // Stored as decimal text, as Redis and the NATS provider store counters.
    assert_eq!(c.get("b", "n").await, Ok(Some(b"15".to_vec())));
    c.set("b", "text", b"not a number").await.unwrap();
    let message = other_message(c.increment("b", "text", 1).await);
    assert!(message.contains("not a decimal u64"), "{message}");
    assert_eq!(c.get("b", "text").await, Ok(Some(b"not a number".to_vec())));
    c.set("b", "max", u64::MAX.to_string().as_bytes())
        .await
        .unwrap();
    let message = other_message(c.increment("b", "max", 1).await);
    assert!(message.contains("overflow"), "{message}");
    assert_eq!(
        c.get("b", "max").await,
        Ok(Some(u64::MAX.to_string().into_bytes()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_on_one_key_are_atomic() {
    let (_server, p) = linked().await;
    let p = Arc::new(p);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let p = Arc::clone(&p);
            tokio::spawn(async move {
                let c = p.as_component(C1, "default");
                for _ in 0..200 {
                    c.increment("counters", "hits", 1).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let c = p.as_component(C1, "default");
    assert_eq!(c.get("counters", "hits").await, Ok(Some(b"6400".to_vec())));
    assert_eq!(c.increment("counters", "hits", 0).await, Ok(6400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_lists_each_stable_key_once_under_churn() {
    let server = NatsServer::start();
    let p = Arc::new(
        start(
            &server,
            &[("list_page_size", "100")],
            &[(C1, "default", None)],
        )
        .await,
    );
    let c = p.as_component(C1, "default");
    let stable: Vec<String> = (0..5000).map(|i| format!("stable-{i:05}")).collect();
    for chunk in stable.chunks(500) {
        let pairs: Vec<(&str, &[u8])> = chunk.iter().map(|k| (k.as_str(), &b"v"[..])).collect();
        c.set_many("b", &pairs).await.unwrap();
    }
    // Another task inserts and deletes other keys while we page.
    let churn = tokio::spawn({
        let p = Arc::clone(&p);
        async move {
            let c = p.as_component(C1, "default");
            for i in 0..400 {
                let key = format!("churn-{i}");
                c.set("b", &key, b"x").await.unwrap();
                if i % 2 == 0 {
                    c.delete("b", &key).await.unwrap();
                }
            }
        }
    });
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = c.list_keys("b", cursor).await.unwrap();
        assert!(page.keys.len() <= 100, "page of {} keys", page.keys.len());
        pages += 1;
        seen.extend(page.keys);
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    churn.await.unwrap();
    assert!(pages >= 50, "{pages} pages");
    let stable_seen: Vec<&String> = seen.iter().filter(|k| k.starts_with("stable-")).collect();
    assert_eq!(stable_seen.len(), 5000, "every stable key exactly once");
    let distinct: BTreeSet<&String> = stable_seen.iter().copied().collect();
    assert_eq!(distinct.len(), 5000);
}

#[tokio::test]
async fn an_unknown_cursor_is_an_error_that_says_so() {
    let (_server, p) = linked().await;
    let c = p.as_component(C1, "default");
    let message = other_message(c.list_keys("b", Some(42)).await);
    assert!(
        message.contains("unknown or expired list-keys cursor 42"),
        "{message}"
    );
}

#[tokio::test]
async fn batch_calls_keep_order_and_set_many_is_all_or_nothing() {
    let server = NatsServer::start();
    let p = start(
        &server,
        &[("max_value_bytes", "8")],
        &[(C1, "default", None)],
    )
    .await;
    let c = p.as_component(C1, "default");
    c.set_many("b", &[("a", b"1"), ("b", b"2"), ("c", b"")])
        .await
        .unwrap();
    let got = c.get_many("b", &["c", "missing", "a", "b"]).await.unwrap();
    assert_eq!(
        got,
        vec![
            Some(("c".into(), vec![])),
            None,
            Some(("a".into(), b"1".to_vec())),
            Some(("b".into(), b"2".to_vec())),
        ]
    );
    // One value over the limit: nothing of the batch is written.
    let message = other_message(
        c.set_many("b", &[("d", b"4"), ("e", b"far too long")])
            .await,
    );
    assert!(message.contains("max_value_bytes"), "{message}");
    assert_eq!(c.get_many("b", &["d", "e"]).await, Ok(vec![None, None]));
    c.delete_many("b", &["a", "missing", "c"]).await.unwrap();
    assert_eq!(c.list_all("b", 1000).await, vec!["b".to_string()]);
}

#[tokio::test]
async fn limits_apply_live_from_config_updates_and_name_the_key() {
    let (_server, p) = linked().await;
    let c = p.as_component(C1, "default");
    c.set_many("b", &[("a", b"1"), ("b", b"2")]).await.unwrap();
    p.update_config(&[("max_keys", "2"), ("max_key_bytes", "16")], "max_keys=2 ")
        .await;
    let message = other_message(c.set("b", "c", b"3").await);
    assert!(message.contains("max_keys=2"), "{message}");
    assert_eq!(c.exists("b", "c").await, Ok(false));
    let message = other_message(c.increment("b", "c", 1).await);
    assert!(message.contains("max_keys"), "{message}");
    // An overwrite does not grow the count.
    c.set("b", "a", b"one").await.unwrap();
    let message = other_message(c.set("b", &"k".repeat(17), b"").await);
    assert!(message.contains("max_key_bytes=16"), "{message}");
    // `get` says so too (an error the host passes on), rather than "none".
    let message = other_message(c.get("b", &"k".repeat(17)).await);
    assert!(message.contains("max_key_bytes=16"), "{message}");
    // Deleting makes room again.
    c.delete("b", "b").await.unwrap();
    c.set("b", "c", b"3").await.unwrap();

    p.update_config(&[("max_total_bytes", "10")], "max_total_bytes=10 ")
        .await;
    let message = other_message(c.set("b", "d", b"0123456789").await);
    assert!(message.contains("max_total_bytes=10"), "{message}");
    // The limit error on `get`-side calls surfaces as a value the host passes on.
    let message = other_message(c.increment("b", "counter", 1_000_000).await);
    assert!(message.contains("max_total_bytes"), "{message}");
    // Removing the keys from the config restores the defaults (waited for on the one the
    // last update changed: the others already are).
    p.update_config(&[], "max_total_bytes=268435456 ").await;
    c.set("b", "d", b"0123456789").await.unwrap();
}

#[tokio::test]
async fn components_are_isolated_unless_links_name_one_namespace() {
    let server = NatsServer::start();
    let p = start(
        &server,
        &[],
        &[
            (C1, "default", None),
            (C2, "default", None),
            ("shares-a", "default", Some("team")),
            ("shares-b", "default", Some("team")),
        ],
    )
    .await;
    let one = p.as_component(C1, "default");
    let two = p.as_component(C2, "default");
    one.set("b", "k", b"one").await.unwrap();
    assert_eq!(two.get("b", "k").await, Ok(None));
    two.set("b", "k", b"two").await.unwrap();
    assert_eq!(one.get("b", "k").await, Ok(Some(b"one".to_vec())));

    let a = p.as_component("shares-a", "default");
    let b = p.as_component("shares-b", "default");
    a.set("b", "k", b"shared").await.unwrap();
    assert_eq!(b.get("b", "k").await, Ok(Some(b"shared".to_vec())));
    assert_eq!(b.increment("b", "n", 2).await, Ok(2));
    assert_eq!(a.increment("b", "n", 3).await, Ok(5));
    assert_eq!(one.get("b", "n").await, Ok(None));
}

#[tokio::test]
async fn calls_without_an_active_link_are_denied() {
    let server = NatsServer::start();
    let p = start(&server, &[], &[]).await;
    let c = p.as_component(C1, "default");
    assert!(is_denied(&c.get("b", "k").await));
    assert!(is_denied(&c.set("b", "k", b"v").await));
    assert!(is_denied(&c.increment("b", "k", 1).await));
    assert!(is_denied(&c.get_many("b", &["k"]).await));
    assert!(is_denied(&p.anonymous().get("b", "k").await));

    p.put_link(C1, "default", Some("ns"), 1).await;
    c.set("b", "k", b"v").await.unwrap();
    // The link is for the link name "default" only.
    assert!(is_denied(&p.as_component(C1, "other").get("b", "k").await));

    p.delete_link(C1, "default", 0).await;
    assert!(is_denied(&c.get("b", "k").await));
    assert!(is_denied(&c.list_keys("b", None).await));
    // Data outlives the link: a new link to the same namespace sees it.
    p.put_link(C1, "default", Some("ns"), 1).await;
    assert_eq!(c.get("b", "k").await, Ok(Some(b"v".to_vec())));
}

#[tokio::test]
async fn allow_unlinked_serves_calls_in_the_callers_own_namespace() {
    let server = NatsServer::start();
    let p = start(&server, &[("allow_unlinked", "true")], &[]).await;
    p.as_component(C1, "default")
        .set("b", "k", b"one")
        .await
        .unwrap();
    assert_eq!(p.as_component(C2, "default").get("b", "k").await, Ok(None));
    assert_eq!(
        p.as_component(C1, "x").get("b", "k").await,
        Ok(Some(b"one".to_vec()))
    );
    p.anonymous().set("b", "k", b"anon").await.unwrap();
    assert_eq!(
        p.anonymous().get("b", "k").await,
        Ok(Some(b"anon".to_vec()))
    );
    p.update_config(&[("allow_unlinked", "false")], "allow_unlinked=false")
        .await;
    assert!(is_denied(&p.anonymous().get("b", "k").await));
}

#[tokio::test]
async fn health_reports_live_figures() {
    let (_server, p) = linked().await;
    let c = p.as_component(C1, "default");
    c.set_many("b1", &[("a", b"12"), ("b", b"")]).await.unwrap();
    c.set("b2", "c", b"3").await.unwrap();
    // Replicated, the instance that answers may apply the last write a moment later.
    p.wait_for_health(|message| {
        message.starts_with(
            "1 links, 0 watchers, 1 namespaces, 2 buckets, 3 keys, 6 bytes, 0 expired, 0 evicted;",
        )
    })
    .await;
}
