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
