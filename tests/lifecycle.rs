//! Start, stop and bad input: the provider process as the host runs it.

mod common;

use std::time::Duration;

use common::*;

const C1: &str = "component-one";

async fn linked(config: &[(&str, &str)]) -> (NatsServer, Provider) {
    let server = NatsServer::start();
    let provider = Provider::start(&server, config, &[(C1, "default", None)]).await;
    (server, provider)
}

#[tokio::test]
async fn a_host_shutdown_request_is_answered_and_the_process_exits_zero() {
    let (_server, mut p) = linked(&[]).await;
    p.as_component(C1, "default")
        .set("b", "k", b"v")
        .await
        .unwrap();
    // A request naming another host is not for us.
    let other = serde_json::json!({ "host_id": "NOTTHISHOST" }).to_string();
    p.publish_control("default.shutdown", other.into_bytes())
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(p.is_running());
    p.wait_for_health(|_| true).await;

    let reply = p.request_shutdown().await;
    assert_eq!(reply, "shutting down");
    let status = p.wait_exit().await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn sigterm_and_sigint_stop_the_process_cleanly() {
    for signal in ["TERM", "INT"] {
        let (_server, mut p) = linked(&[]).await;
        p.as_component(C1, "default")
            .set("b", "k", b"v")
            .await
            .unwrap();
        p.signal(signal);
        let status = p.wait_exit().await;
        assert!(status.success(), "SIG{signal}: {status}");
    }
}

/// `(bucket, key, value)` parameters of `store.set`.
fn set_params(bucket: &str, key: &str, value: &[u8]) -> Vec<u8> {
    encode_fields(&[bucket.as_bytes(), key.as_bytes(), value])
}

#[tokio::test]
async fn a_stop_lets_in_flight_calls_finish() {
    let (_server, mut p) = linked(&[]).await;
    // A `set` whose value is still on its way when the stop comes.
    let params = set_params("b", "k", b"0123456789");
    let (first, rest) = params.split_at(params.len() - 4);
    let mut call = RawCall::send(
        &p,
        C1,
        "wrpc:keyvalue/store@0.2.0-draft",
        "set",
        first.to_vec(),
    )
    .await;
    let more = call.server_params_subject().await;
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        p.is_running(),
        "the provider must wait for the call in flight"
    );
    p.nats.publish(more, rest.to_vec().into()).await.unwrap();
    // result<_, error>::ok is one zero byte.
    assert_eq!(call.results().await, vec![0]);
    let status = p.wait_exit().await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn garbage_on_every_subject_is_dropped_and_every_function_keeps_serving() {
    // Stuck invocations stay stuck for the whole test: they must not block valid calls.
    let (_server, mut p) = linked(&[("request_timeout_ms", "60000")]).await;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut noise = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let mut stuck = Vec::new();
    for (instance, func) in FUNCTIONS {
        let subject = p.function_subject(instance, func);
        for round in 0..50 {
            let garbage = noise(1 + round * 7);
            // Without a reply subject: refused by the transport.
            p.nats
                .publish(subject.clone(), garbage.clone().into())
                .await
                .unwrap();
            // With one: accepted, then refused (or stuck waiting for more parameters).
            p.nats
                .publish_with_reply(subject.clone(), p.nats.new_inbox(), garbage.into())
                .await
                .unwrap();
        }
        // A valid start that never completes: a string announced as 100 bytes, 3 sent.
        stuck.push(RawCall::send(&p, C1, instance, func, vec![100, b'a', b'b', b'c']).await);
    }
    for suffix in [
        "linkdefs.put",
        "linkdefs.del",
        "config.update",
        "health",
        "default.shutdown",
    ] {
        for garbage in [
            noise(64),
            b"{}".to_vec(),
            b"[1,2,3]".to_vec(),
            b"{\"source_id\": 7}".to_vec(),
            vec![],
        ] {
            p.publish_control(suffix, garbage).await;
        }
    }
    // A garbage shutdown request with a reply subject is not a shutdown.
    let _ = p
        .nats
        .publish_with_reply(
            format!("wasmbus.rpc.{LATTICE}.{}.default.shutdown", p.key),
            p.nats.new_inbox(),
            noise(32).into(),
        )
        .await;
    // Config values of the wrong kind are reported and ignored.
    p.update_config(
        &[("max_keys", "lots"), ("list_page_size", "3")],
        "list_page_size=3 ",
    )
    .await;

    assert!(p.is_running());
    let message = p.wait_for_health(|_| true).await;
    assert!(message.starts_with("1 links,"), "{message}");
    assert!(message.contains("max_keys=1000000 "), "{message}");
    every_function_serves(&p.as_component(C1, "default")).await;
    drop(stuck);
    p.signal("TERM");
    let status = p.wait_exit().await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn unreadable_invocations_get_an_error_that_says_why() {
    let (_server, p) = linked(&[("max_request_bytes", "64"), ("request_timeout_ms", "300")]).await;
    let c = p.as_component(C1, "default");
    let message = other_message(c.set("b", "k", &[0; 100]).await);
    assert!(message.contains("max_request_bytes=64"), "{message}");
    // Parameters that never complete are answered once request_timeout_ms passes.
    let mut call = RawCall::send(
        &p,
        C1,
        "wrpc:keyvalue/store@0.2.0-draft",
        "get",
        vec![30, b'a'],
    )
    .await;
    let results = call.answer_within(CALL_TIMEOUT).await.expect("no answer");
    // result::err (1), error::other (2), then the message.
    assert_eq!(&results[..2], &[1, 2]);
    let text = String::from_utf8_lossy(&results[3..]);
    assert!(text.contains("request_timeout_ms=300"), "{text}");
    // Bytes that are not parameters at all.
    let mut call = RawCall::send(
        &p,
        C1,
        "wrpc:keyvalue/atomics@0.2.0-draft",
        "increment",
        vec![1, b'b', 1, b'k', 0xff, 0xff],
    )
    .await;
    let results = call.results().await;
    assert_eq!(&results[..2], &[1, 2], "{results:?}");
    c.set("b", "k", b"fine").await.unwrap(); // Parameters of exactly max_request_bytes are accepted; one byte more is not.
                                             // bucket "b" and key "k" are 2 bytes each, the value's length 1: 59 bytes of value.
    let value = vec![1; 59];
    c.set("b", "k", &value).await.unwrap();
    assert_eq!(c.get("b", "k").await, Ok(Some(value)));
    let message = other_message(c.set("b", "k", &[1; 60]).await);
    assert!(message.contains("max_request_bytes=64"), "{message}");
}

#[tokio::test]
async fn invocations_already_delivered_when_a_stop_begins_are_answered() {
    let (_server, mut p) = linked(&[]).await;
    let mut calls = Vec::new();
    for i in 0..300 {
        let params = set_params("b", &format!("k{i}"), b"v");
        calls.push(RawCall::send(&p, C1, "wrpc:keyvalue/store@0.2.0-draft", "set", params).await);
    }
    // Each taken by the provider (its handshake came) before the stop begins.
    for call in &mut calls {
        call.server_params_subject().await;
    }
    p.signal("TERM");
    let mut unanswered = 0;
    for call in &mut calls {
        match call.results_within(CALL_TIMEOUT).await {
            Some(results) => assert_eq!(results, vec![0]),
            None => unanswered += 1,
        }
    }
    assert_eq!(
        unanswered, 0,
        "calls sent before the stop were never answered"
    );
    assert!(p.wait_exit().await.success());
}

#[test]
fn host_data_it_cannot_use_stops_it_with_a_clear_error() {
    let cases = [
        ("not base64 at all!", "base64"),
        // The Go example's run.sh host data lacks env_values and link_definitions.
        (
            r#"{"lattice_rpc_url":"nats://127.0.0.1:1","lattice_rpc_prefix":"default","provider_key":"kv","host_id":"h"}"#,
            "host data",
        ),
        (
            r#"{"lattice_rpc_url":"nats://127.0.0.1:1","provider_key":"kv","env_values":{},"link_definitions":[],"lattice_rpc_user_jwt":"x","lattice_rpc_user_seed":"SNOTASEED"}"#,
            "lattice_rpc_user_seed",
        ),
    ];
    for (host_data, expect) in cases {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keyvalue-inmemory"));
        command
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        let line = if host_data.starts_with('{') {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(host_data)
        } else {
            host_data.to_owned()
        };
        use std::io::Write as _;
        writeln!(child.stdin.take().unwrap(), "{line}").unwrap();
        let deadline = std::time::Instant::now() + CALL_TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "provider kept running on bad host data"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(expect), "expected {expect:?} in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
