//! Our serving side of wRPC over NATS, against callers that lose messages the way the wasmCloud
//! 1.x host's client (`wrpc-transport-nats` 0.29) does, and against that client itself.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats as nats;
use bytes::Bytes;
use common::*;
use futures::StreamExt as _;
use keyvalue_inmemory::client::{atomics, component_headers, drops, store};
use keyvalue_inmemory::transport::{Figures, COPY_HEADER};

const C1: &str = "component-one";
const STORE: &str = "wrpc:keyvalue/store@0.2.0-draft";
const ATOMICS: &str = "wrpc:keyvalue/atomics@0.2.0-draft";

async fn linked(config: &[(&str, &str)]) -> (NatsServer, Provider) {
    let server = NatsServer::start();
    let provider = Provider::start(&server, config, &[(C1, "default", None)]).await;
    (server, provider)
}

/// The next message on `sub`, within 5 s.
async fn next(sub: &mut nats::Subscriber, what: &str) -> nats::Message {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 5 s"))
        .expect("subscription ended")
}

/// Every message `sub` receives within `quiet` of the previous one.
async fn rest(sub: &mut nats::Subscriber, quiet: Duration) -> Vec<nats::Message> {
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(quiet, sub.next()).await {
        out.push(msg);
    }
    out
}

/// The `transport: …` figures of a health message.
fn figures(health: &str) -> Figures {
    Figures::read(health).unwrap_or_else(|| panic!("no transport figures in {health:?}"))
}

/// A caller whose client dropped the handshake and the results (they arrived before it had
/// subscribed its inbox) is sent both again, and its call takes effect once.
#[tokio::test]
async fn a_caller_that_lost_the_handshake_and_results_gets_them_again() {
    let (_server, p) = linked(&[("handshake_retry_min_ms", "20")]).await;
    let mut params = encode_fields(&[b"b", b"n"]);
    params.push(5); // delta 5 (LEB128)
    let reply = p.nats.new_inbox();
    // Nobody listens on `reply` yet: the handshake and the results go nowhere, exactly as
    // when the host's client has not applied its subscriptions.
    p.nats
        .publish_with_reply_and_headers(
            p.function_subject(ATOMICS, "increment"),
            reply.clone(),
            component_headers(C1, "default"),
            params.into(),
        )
        .await
        .unwrap();
    p.nats.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let mut handshake = p.nats.subscribe(reply.clone()).await.unwrap();
    let mut results = p.nats.subscribe(format!("{reply}.results")).await.unwrap();
    let again = next(&mut handshake, "handshake sent again").await;
    let server = again
        .reply
        .expect("the handshake names the server's subject");
    // ok(5): result tag 0, then the u64 as LEB128; marked as a copy.
    let answer = next(&mut results, "results sent again").await;
    assert_eq!(answer.payload.as_ref(), &[0, 5]);
    assert!(answer.headers.is_some_and(|h| h.get(COPY_HEADER).is_some()));
    p.nats
        .publish(format!("{server}.params"), Bytes::new())
        .await
        .unwrap();
    // After the end of parameters: the closing message, and copies of the answer sent before
    // it (never read by a wRPC client, which reads one value), nothing else.
    let after = rest(&mut results, Duration::from_millis(300)).await;
    let close = after
        .iter()
        .position(|m| m.payload.is_empty())
        .expect("the results are closed");
    assert!(after[..close].iter().all(|m| m.payload == answer.payload));
    assert_eq!(close, after.len() - 1, "nothing after the closing message");
    // The increment ran once.
    let c = p.as_component(C1, "default");
    assert_eq!(c.increment("b", "n", 0).await, Ok(5));
    let health = p.wait_for_health(|_| true).await;
    assert!(figures(&health).resent >= 1, "{health}");
    assert_eq!(figures(&health).recovered, 1, "{health}");
    assert_eq!(figures(&health).spurious, 0, "{health}");
}

/// A caller that got the first handshake but answers late is sent copies it does not need;
/// its answer names the first, so the provider counts the copies as spurious, not as
/// recovered calls.
#[tokio::test]
async fn a_slow_caller_is_told_apart_from_one_that_lost_the_handshake() {
    let (_server, p) = linked(&[("handshake_retry_min_ms", "20")]).await;
    let params = encode_fields(&[b"b", b"k"]);
    let mut call = RawCall::send(&p, C1, STORE, "get", params).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The first handshake is first in line: answer it, as a wRPC client does.
    let first = next(&mut call.handshake, "handshake").await;
    let copies = rest(&mut call.handshake, Duration::from_millis(1)).await;
    assert!(!copies.is_empty(), "no copy was sent in 200 ms");
    let server = first.reply.expect("reply subject");
    p.nats
        .publish(format!("{server}.params"), Bytes::new())
        .await
        .unwrap();
    // ok(none), once; its copies are marked.
    let answers = rest(&mut call.results, Duration::from_millis(300)).await;
    let plain: Vec<_> = (answers.iter())
        .filter(|m| (m.headers.as_ref()).is_none_or(|h| h.get(COPY_HEADER).is_none()))
        .map(|m| m.payload.to_vec())
        .collect();
    assert_eq!(
        plain,
        vec![vec![0, 0], vec![]],
        "one answer, then the close"
    );
    let health = p.wait_for_health(|_| true).await;
    assert_eq!(figures(&health).recovered, 0, "{health}");
    assert_eq!(figures(&health).spurious, 1, "{health}");
}

/// A caller that confirms the handshake gets one handshake and one answer; the closing
/// message waits for its end of parameters.
#[tokio::test]
async fn a_prompt_caller_gets_one_handshake_one_answer_and_the_close_after_confirming() {
    // Resends after 5 s at the earliest: none can happen during this test.
    let (_server, p) = linked(&[("handshake_retry_min_ms", "5000")]).await;
    for i in 0..5 {
        let params = encode_fields(&[b"b", format!("k{i}").as_bytes(), b"v"]);
        let mut call = RawCall::send(&p, C1, STORE, "set", params).await;
        let server = call.server_params_subject().await;
        let answer = next(&mut call.results, "results").await;
        assert_eq!(answer.payload.as_ref(), &[0]);
        assert!(
            rest(&mut call.results, Duration::from_millis(100))
                .await
                .is_empty(),
            "the results are closed before the caller confirmed"
        );
        p.nats.publish(server, Bytes::new()).await.unwrap();
        let close = next(&mut call.results, "closing message").await;
        assert!(close.payload.is_empty());
        assert!(rest(&mut call.results, Duration::from_millis(50))
            .await
            .is_empty());
        assert!(rest(&mut call.handshake, Duration::from_millis(50))
            .await
            .is_empty());
    }
    let health = p.wait_for_health(|_| true).await;
    assert_eq!(figures(&health).resent, 0, "{health}");
}

/// Parameters that continue after the handshake are read from the server's subject, which is
/// live before the handshake is published: a caller sending them at once loses nothing.
#[tokio::test]
async fn parameters_sent_the_instant_the_handshake_arrives_are_read() {
    let (_server, p) = linked(&[]).await;
    let value = vec![7u8; 3000];
    let params = encode_fields(&[b"b", b"k", &value]);
    let (first, more) = params.split_at(10);
    for round in 0..50 {
        let mut call = RawCall::send(&p, C1, STORE, "set", first.to_vec()).await;
        let server = call.server_params_subject().await;
        for chunk in more.chunks(700) {
            p.nats
                .publish(server.clone(), Bytes::copy_from_slice(chunk))
                .await
                .unwrap();
        }
        assert_eq!(call.results().await, vec![0], "round {round}");
    }
    let got = p.as_component(C1, "default").get("b", "k").await.unwrap();
    assert_eq!(got, Some(value));
}

/// The keyvalue functions have no asynchronous parameters: a chunk on an indexed parameter
/// subject fails the call with an error that says so.
#[tokio::test]
async fn asynchronous_parameters_are_refused_with_a_clear_error() {
    let (_server, p) = linked(&[]).await;
    let mut params = encode_fields(&[b"b", b"k"]);
    encode_len(&mut params, 10);
    params.extend_from_slice(b"ab");
    let mut call = RawCall::send(&p, C1, STORE, "set", params).await;
    let server = call.server_params_subject().await;
    p.nats
        .publish(format!("{server}.0"), Bytes::from_static(b"xyz"))
        .await
        .unwrap();
    let message = raw_other_message(&call.results().await).expect("an error");
    assert!(message.contains("asynchronous parameters"), "{message}");
    p.as_component(C1, "default")
        .set("b", "k", b"fine")
        .await
        .unwrap();
}

/// The host's own client (`wrpc-transport-nats` 0.29, whose inbox task drops a handshake that
/// arrives before it subscribed): a burst at 64 in flight, every call answered and right.
#[tokio::test]
async fn the_hosts_client_gets_every_answer_under_load() {
    // What the client drops, as it reports it (debug events).
    drops::install();
    let (_server, p) = linked(&[]).await;
    let prefix: Arc<str> = Arc::from(format!("{LATTICE}.{}", p.key));
    let client = Arc::new(
        wrpc_transport_nats::Client::new(p.nats.clone(), prefix, None)
            .await
            .unwrap(),
    );
    const CALLS: u64 = 20_000;
    const IN_FLIGHT: u64 = 64;
    let (unanswered, wrong) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for worker in 0..IN_FLIGHT {
        let (client, unanswered, wrong) = (client.clone(), unanswered.clone(), wrong.clone());
        workers.push(tokio::spawn(async move {
            let cx = || Some(component_headers(C1, "default"));
            let key = format!("w{worker}");
            let mut count = 0u64;
            for i in 0..CALLS / IN_FLIGHT {
                let timeout = Duration::from_secs(5);
                let ok = match i % 3 {
                    0 => {
                        let call = atomics::increment(&*client, cx(), "b", &key, 1);
                        match tokio::time::timeout(timeout, call).await {
                            Ok(Ok(Ok(n))) => {
                                count += 1;
                                n == count
                            }
                            Ok(_) => false,
                            Err(_) => {
                                unanswered.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    1 => {
                        let value = Bytes::from(format!("{i}"));
                        let name = format!("{key}-{i}");
                        let call = store::set(&*client, cx(), "b", &name, &value);
                        match tokio::time::timeout(timeout, call).await {
                            Ok(result) => matches!(result, Ok(Ok(()))),
                            Err(_) => {
                                unanswered.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    _ => {
                        let name = format!("{key}-{}", i - 1);
                        let call = store::get(&*client, cx(), "b", &name);
                        match tokio::time::timeout(timeout, call).await {
                            Ok(Ok(Ok(Some(v)))) => v == format!("{}", i - 1).as_bytes(),
                            Ok(_) => false,
                            Err(_) => {
                                unanswered.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                };
                if !ok {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let health = p.wait_for_health(|_| true).await;
    let (handshakes, results) = drops::dropped();
    eprintln!(
        "{CALLS} calls at {IN_FLIGHT} in flight: {} unanswered, {} wrong; the client dropped \
         {handshakes} handshakes and {results} result messages; {health}",
        unanswered.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed),
    );
    assert_eq!(unanswered.load(Ordering::Relaxed), 0, "{health}");
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "{health}");
    // Each call the provider counts as recovered answered a resent handshake: the client
    // dropped the first (it also counts copies it no longer needed).
    assert!(figures(&health).recovered <= handshakes, "{health}");
}
