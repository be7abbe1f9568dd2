//! Hostile and careless callers: no input may stop the provider, make it hold more than its
//! bounds, or let one component hurt another. Each test sends what a real caller could send,
//! over a real nats-server, to the real binary.

mod common;

use std::time::{Duration, Instant};

use common::*;

const C1: &str = "component-one";
const C2: &str = "component-two";

async fn linked(config: &[(&str, &str)]) -> (NatsServer, Provider) {
    let server = NatsServer::start();
    let provider = Provider::start(
        &server,
        config,
        &[(C1, "default", None), (C2, "default", None)],
    )
    .await;
    (server, provider)
}

/// Every function still answers a valid call, and the data written before is still there.
async fn still_serving(p: &Provider) {
    let c = p.as_component(C1, "default");
    assert_eq!(c.get("b", "kept").await, Ok(Some(b"before".to_vec())));
    every_function_serves(&c).await;
}

#[tokio::test]
async fn declared_lengths_are_never_trusted_on_any_function() {
    let (_server, mut p) = linked(&[]).await;
    let c = p.as_component(C1, "default");
    c.set("b", "kept", b"before").await.unwrap();
    let frames: [&[u8]; 4] = [
        // An empty bucket name, then a list (or string) of 4,294,967,295.
        &[0x00, 0xff, 0xff, 0xff, 0xff, 0x0f],
        // A bucket name of 4,294,967,295 bytes.
        &[0xff, 0xff, 0xff, 0xff, 0x0f],
        // Bucket "b", then 2^31.
        &[0x01, b'b', 0x80, 0x80, 0x80, 0x80, 0x08],
        // Bucket "b", then 2^28: a list of that many keys needs more than 64 MiB.
        &[0x01, b'b', 0x80, 0x80, 0x80, 0x80, 0x01],
    ];
    for (instance, func) in FUNCTIONS {
        for frame in frames {
            let mut call = RawCall::send(&p, C1, instance, func, frame.to_vec()).await;
            let results = call.results().await;
            let message = raw_other_message(&results)
                .unwrap_or_else(|| panic!("{func} {frame:?}: not an error: {results:?}"));
            assert!(
                message.starts_with(&format!("invalid {instance}.{func} invocation")),
                "{func}: {message}"
            );
        }
    }
    assert!(p.is_running(), "the provider died");
    let health = p.wait_for_health(|_| true).await;
    assert!(health.contains(" 1 keys"), "{health}");
    still_serving(&p).await;
}

#[tokio::test]
async fn answers_are_bounded_and_refused_before_they_are_copied() {
    let (_server, p) = linked(&[("max_response_bytes", "1048576")]).await;
    let c = p.as_component(C1, "default");
    c.set("b", "big", &vec![7; 512 * 1024]).await.unwrap();
    // 100 copies of a 512 KiB value from a request of a few hundred bytes.
    let keys = vec!["big"; 100];
    let message = other_message(c.get_many("b", &keys).await);
    assert!(message.contains("max_response_bytes=1048576"), "{message}");
    let asked = 100 * (512 * 1024 + 3 + 32);
    assert!(
        message.contains(&format!("would answer {asked} bytes")),
        "{message}"
    );
    // One copy fits.
    assert_eq!(c.get_many("b", &["big"]).await.unwrap().len(), 1);
    // List pages of long keys are cut to the bound, and the listing goes on from there.
    let mut want = Vec::new();
    for i in 0..300 {
        let key = format!("{i:04}{}", "k".repeat(3996));
        c.set("long", &key, b"").await.unwrap();
        want.push(key);
    }
    let first = c.list_keys("long", None).await.unwrap();
    assert!(first.keys.len() < 300 && first.cursor.is_some());
    assert!(first.keys.iter().map(|k| k.len() + 32).sum::<usize>() <= 1 << 20);
    assert_eq!(c.list_all("long", 1000).await, want);
}

#[tokio::test]
async fn stalled_large_invocations_stay_within_the_inflight_budget() {
    const MIB: usize = 1 << 20;
    let (_server, p) = linked(&[
        ("max_request_bytes", &(16 * MIB).to_string()),
        ("max_value_bytes", &(16 * MIB).to_string()),
        ("max_inflight_bytes", &(64 * MIB).to_string()),
        ("request_timeout_ms", "60000"),
    ])
    .await;
    p.as_component(C1, "default")
        .set("b", "kept", b"before")
        .await
        .unwrap();
    let idle = rss_bytes(p.pid());
    // 60 `set`s from one component, each declaring a 15 MiB value and sending 6 MiB of it,
    // then nothing: without a budget they would hold 360 MiB for a minute.
    let mut params = Vec::new();
    encode_bytes(&mut params, b"b");
    encode_bytes(&mut params, b"stalled");
    encode_len(&mut params, 15 * MIB as u64);
    let chunk = vec![0u8; MIB - 1024];
    let (mut stalled, mut refused) = (Vec::new(), Vec::new());
    for _ in 0..60 {
        let mut call = RawCall::send(
            &p,
            C1,
            "wrpc:keyvalue/store@0.2.0-draft",
            "set",
            params.clone(),
        )
        .await;
        let more = call.server_params_subject().await;
        for _ in 0..6 {
            p.nats
                .publish(more.clone(), chunk.clone().into())
                .await
                .unwrap();
        }
        p.nats.flush().await.unwrap();
        match call.answer_within(Duration::from_millis(300)).await {
            Some(results) => refused.push(raw_other_message(&results).expect("an error")),
            None => stalled.push(call),
        }
    }
    let peak = rss_bytes(p.pid());
    let grew = peak.saturating_sub(idle);
    eprintln!(
        "stalled {} invocations, refused {}; RSS {} MiB idle, {} MiB with them ({} MiB more)",
        stalled.len(),
        refused.len(),
        idle / MIB as u64,
        peak / MIB as u64,
        grew / MIB as u64
    );
    assert!(!refused.is_empty(), "nothing was refused");
    for message in &refused {
        assert!(message.contains("max_inflight_bytes="), "{message}");
    }
    // One component holds at most half of the 64 MiB budget; the rest is allocator and NATS
    // buffers. 360 MiB were sent.
    assert!(
        grew < 120 * MIB as u64,
        "RSS grew by {} MiB",
        grew / MIB as u64
    );
    // Another component is served meanwhile: the stalled one cannot spend its share.
    let other = p.as_component(C2, "default");
    // (One NATS message: the test client does not split parameters.)
    other.set("b", "k", &vec![1; 900 * 1024]).await.unwrap();
    assert_eq!(
        other.get("b", "k").await.unwrap().map(|v| v.len()),
        Some(900 * 1024)
    );
    // The stalled component itself is told why (its share has a few KiB left at most).
    let own = other_message(
        p.as_component(C1, "default")
            .set("b", "k2", &vec![1; 256 * 1024])
            .await,
    );
    assert!(own.contains("from this component"), "{own}");
    drop(stalled);
}

#[tokio::test]
async fn one_namespace_opening_listings_never_drops_anothers_cursor() {
    let (_server, p) = linked(&[("list_page_size", "2")]).await;
    let (a, b) = (p.as_component(C1, "default"), p.as_component(C2, "default"));
    for i in 0..10 {
        a.set("b", &format!("{i}"), b"").await.unwrap();
        b.set("b", &format!("{i}"), b"").await.unwrap();
    }
    let theirs = b.list_keys("b", None).await.unwrap().cursor;
    for _ in 0..80 {
        a.list_keys("b", None).await.unwrap();
    }
    let page = b.list_keys("b", theirs).await.unwrap();
    assert_eq!(page.keys, vec!["2".to_string(), "3".to_string()]);
}

#[tokio::test]
async fn a_named_namespace_never_reaches_a_components_own() {
    let server = NatsServer::start();
    let p = Provider::start(
        &server,
        &[("allow_unlinked", "true")],
        // C2 names C1's id as its namespace; "team" is a named namespace.
        &[
            (C1, "default", None),
            (C2, "default", Some(C1)),
            ("component-three", "default", Some("team")),
        ],
    )
    .await;
    let (one, two) = (p.as_component(C1, "default"), p.as_component(C2, "default"));
    one.set("b", "private", b"mine").await.unwrap();
    assert_eq!(two.get("b", "private").await, Ok(None));
    two.set("b", "private", b"theirs").await.unwrap();
    assert_eq!(one.get("b", "private").await, Ok(Some(b"mine".to_vec())));
    // An unlinked caller calling itself "team" gets a namespace of its own, not the named one.
    let three = p.as_component("component-three", "default");
    three.set("b", "k", b"team data").await.unwrap();
    let impostor = p.as_component("team", "default");
    assert_eq!(impostor.get("b", "k").await, Ok(None));
}

#[tokio::test]
async fn garbage_is_answered_and_logged_at_most_once_a_second() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("provider.log");
    let p = Provider::start_logging(
        &server,
        serde_json::json!({}),
        &[],
        &[(C1, "default", None)],
        Some(&log),
    )
    .await;
    let started = Instant::now();
    for i in 0..200u8 {
        let mut call = RawCall::send(
            &p,
            C1,
            "wrpc:keyvalue/store@0.2.0-draft",
            "list-keys",
            vec![0, 9, i],
        )
        .await;
        assert!(raw_other_message(&call.results().await).is_some());
    }
    let seconds = started.elapsed().as_secs() + 1;
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("invalid"))
        .count();
    assert!(warnings >= 1, "{text}");
    assert!(
        warnings as u64 <= seconds + 1,
        "{warnings} warnings in {seconds} s:\n{text}"
    );
}

#[tokio::test]
async fn many_small_elements_are_charged_for_what_decoding_them_costs() {
    // 100,000 empty pairs are 200 KB on the wire, but 100,000 structs once decoded.
    let (_server, p) = linked(&[("max_inflight_bytes", "4194304")]).await;
    let mut params = vec![0x01, b'b'];
    encode_len(&mut params, 100_000);
    params.extend(std::iter::repeat_n([0u8, 0u8], 100_000).flatten());
    let mut call = RawCall::send(
        &p,
        C1,
        "wrpc:keyvalue/batch@0.2.0-draft",
        "set-many",
        params,
    )
    .await;
    let message = raw_other_message(&call.results().await).expect("an error");
    assert!(message.contains("max_inflight_bytes=4194304"), "{message}");
    assert!(message.contains("this call alone"), "{message}");
    // A batch of a sensible size goes through.
    let pairs: Vec<(String, Vec<u8>)> = (0..1000).map(|i| (format!("k{i}"), vec![])).collect();
    let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    p.as_component(C1, "default")
        .set_many("b", &pairs)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unlinked_caller_is_refused_before_anything_it_sends_is_read() {
    let (_server, p) = linked(&[]).await;
    // A stranger naming a new source on each call gets access-denied at once, whatever it
    // declares: it takes no share of the budget.
    for i in 0..20 {
        let frame = vec![0x00, 0xff, 0xff, 0xff, 0x0f];
        let source = format!("stranger-{i}");
        let mut call =
            RawCall::send(&p, &source, "wrpc:keyvalue/store@0.2.0-draft", "set", frame).await;
        // result::err (1), error::access-denied (1).
        assert_eq!(call.results().await, vec![1, 1]);
    }
    p.as_component(C1, "default")
        .set("b", "k", b"v")
        .await
        .unwrap();
}
