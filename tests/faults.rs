//! Faults the provider must ride out.

mod common;

use std::time::{Duration, Instant};

use common::*;

const C1: &str = "component-one";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_reconnects_after_a_nats_restart_with_its_data_intact() {
    let server = NatsServer::start();
    let port = server.port;
    let mut p = Provider::start(&server, &[], &[(C1, "default", None)]).await;
    let c = p.as_component(C1, "default");
    c.set_many("b", &[("a", b"1"), ("b", b"2")]).await.unwrap();
    assert_eq!(c.increment("b", "n", 5).await, Ok(5));
    drop(c);

    drop(server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _restarted = NatsServer::start_on(port);
    let restarted_at = Instant::now();
    // Our test client reconnects too; wait until the provider answers health again.
    p.wait_for_health(|_| true).await;
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        // The first calls after a reconnect may race the provider's resubscriptions.
        match tokio::time::timeout(
            Duration::from_millis(500),
            keyvalue_inmemory::client::store::get(
                &p.wrpc,
                Some(keyvalue_inmemory::client::component_headers(C1, "default")),
                "b",
                "a",
            ),
        )
        .await
        {
            Ok(Ok(Ok(Some(v)))) if v.as_ref() == b"1" => break,
            _ => assert!(Instant::now() < deadline, "the provider never served again"),
        }
    }
    let serving_again = restarted_at.elapsed();
    assert!(
        p.is_running(),
        "the provider must not exit on a NATS restart"
    );
    let c = p.as_component(C1, "default");
    assert_eq!(c.get("b", "b").await, Ok(Some(b"2".to_vec())));
    assert_eq!(c.increment("b", "n", 1).await, Ok(6));
    eprintln!("serving again {serving_again:?} after nats-server restarted");
    assert!(
        serving_again < Duration::from_secs(5),
        "took {serving_again:?}"
    );
}

/// nats-server dies and comes back on the same port while 32 callers keep writing: the
/// provider reconnects and serves again within 5 s, keeps everything written before, and every
/// key holds its last acknowledged value or a later attempted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_serves_again_within_5s_when_nats_restarts_under_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let server = NatsServer::start();
    let port = server.port;
    let mut p = Provider::start(&server, &[], &[(C1, "default", None)]).await;
    let c = p.as_component(C1, "default");
    for i in 0..100 {
        c.set("before", &format!("k{i}"), format!("v{i}").as_bytes())
            .await
            .unwrap();
    }
    drop(c);

    let stop = Arc::new(AtomicBool::new(false));
    // Successful calls' completion times, to find the first one after the restart.
    let successes: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (wrpc, stop, successes) = (p.wrpc.clone(), stop.clone(), successes.clone());
            tokio::spawn(async move {
                let headers = Some(keyvalue_inmemory::client::component_headers(C1, "default"));
                let key = format!("w{w}");
                let (mut acked, mut attempted) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    attempted += 1;
                    let value = bytes::Bytes::from(attempted.to_string());
                    let call = keyvalue_inmemory::client::store::set(
                        &wrpc,
                        headers.clone(),
                        "under-load",
                        &key,
                        &value,
                    );
                    match tokio::time::timeout(Duration::from_secs(1), call).await {
                        Ok(Ok(Ok(()))) => {
                            acked = attempted;
                            successes.lock().unwrap().push(Instant::now());
                        }
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                (key, acked, attempted)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _restarted = NatsServer::start_on(port);
    let restarted_at = Instant::now();
    let deadline = restarted_at + Duration::from_secs(10);
    let serving_again = loop {
        let first = successes
            .lock()
            .unwrap()
            .iter()
            .find(|t| **t > restarted_at)
            .copied();
        if let Some(t) = first {
            break t - restarted_at;
        }
        assert!(
            Instant::now() < deadline,
            "no call succeeded within 10 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Keep the load on a little longer after it recovered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.push(w.await.unwrap());
    }
    assert!(
        p.is_running(),
        "the provider must not exit on a NATS restart"
    );
    eprintln!("under load: serving again {serving_again:?} after nats-server restarted");
    assert!(
        serving_again < Duration::from_secs(5),
        "took {serving_again:?}"
    );

    let c = p.as_component(C1, "default");
    for i in (0..100).step_by(7) {
        assert_eq!(
            c.get("before", &format!("k{i}")).await,
            Ok(Some(format!("v{i}").into_bytes()))
        );
    }
    for (key, acked, attempted) in outcomes {
        let got = c.get("under-load", &key).await.unwrap();
        let value: u64 = got
            .map(|v| String::from_utf8(v).unwrap().parse().unwrap())
            .unwrap_or(0);
        assert!(
            acked <= value && value <= attempted,
            "{key}: holds {value}, last acknowledged {acked}, last attempted {attempted}"
        );
    }
}
