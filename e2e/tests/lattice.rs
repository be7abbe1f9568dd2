//! The provider in a real lattice: a wasmCloud 1.x host (library 0.27.1, as in host 1.9.2)
//! starts it from the provider archive `cargo xtask test` built, runs three instances of a
//! real component importing `wasi:keyvalue`, links them to it, and the test calls the
//! components' exports over wRPC through the host, as `wash call` does.
//!
//! kv-a and kv-b share the namespace `shared`; kv-c is alone in `alone`.

use std::future::Future;
use std::panic::{resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use futures::FutureExt as _;

use e2e::driver::kv;
use e2e::{wait_for, Lattice};

const PROVIDER: &str = "kv-inmemory";
const LATTICE: &str = "e2e";
/// The provider's max_key_bytes in this lattice (named config `kv-limits`).
const MAX_KEY: usize = 64;
/// The provider's list_page_size in this lattice: 10 keys take 4 list-keys calls.
const PAGE: usize = 3;

/// One wRPC call through the host, bounded; a transport failure is an `Err`.
async fn call<T>(what: &str, call: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .with_context(|| format!("{what}: no answer in 15 s"))?
        .with_context(|| format!("{what}: the call failed"))
}

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[test]
fn the_provider_serves_real_components_through_a_wasmcloud_host() {
    let par = std::env::var_os("KEYVALUE_PAR").map(PathBuf::from).expect(
        "KEYVALUE_PAR is not set: run the suite with `cargo xtask test`, which builds the \
         provider archive this test starts",
    );
    assert!(
        par.exists(),
        "KEYVALUE_PAR={} does not exist",
        par.display()
    );
    // The host copies every provider it starts into $TMPDIR/wasmcloudcache and never removes
    // it; keep those copies in this test's own directory. Set before any thread starts.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    std::env::set_var("TMPDIR", tmp.path());

    // Count what the host's wRPC stack drops (its debug events), to print beside what the
    // provider sent again.
    keyvalue_inmemory::client::drops::install();
    let nats = test_support::nats::NatsServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        let lattice = Lattice::start(&nats.url(), LATTICE).await?;
        let outcome = AssertUnwindSafe(scenario(&lattice, &par, tmp.path()))
            .catch_unwind()
            .await;
        let stopped = lattice.stop(PROVIDER).await;
        match outcome {
            Err(panic) => resume_unwind(panic),
            Ok(outcome) => outcome.and(stopped),
        }
    });
    // Dropping the runtime drops the host's tasks, which kill any process it still runs.
    drop(runtime);
    result.unwrap();
    stopped_by_the_host_loses_nothing(&tmp.path().join("kv.snapshot"));
}

async fn scenario(lattice: &Lattice, par: &Path, dir: &Path) -> anyhow::Result<()> {
    // KV_E2E_RETRY_MIN_MS=600000 keeps the provider from resending handshakes within a call's
    // 10 s: the bursts then show what the host's client loses without our recovery.
    let retry = std::env::var("KV_E2E_RETRY_MIN_MS").unwrap_or_else(|_| "100".into());
    lattice
        .put_config(
            "kv-limits",
            &[
                ("max_key_bytes", &MAX_KEY.to_string()),
                ("list_page_size", &PAGE.to_string()),
                // Only the final snapshot, written when the host stops the provider.
                ("snapshot_path", dir.join("kv.snapshot").to_str().unwrap()),
                ("snapshot_interval_secs", "3600"),
                ("handshake_retry_min_ms", &retry),
            ],
        )
        .await?;
    let health = lattice
        .start_provider(par, PROVIDER, &["kv-limits"])
        .await?;
    ensure!(
        health.contains("max_key_bytes=64"),
        "the provider did not get its named config from the host: {health}"
    );

    let wasm = dir.join("driver.wasm");
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
    std::fs::write(&wasm, e2e::component::build(&wit)?)?;
    lattice
        .put_config("ns-shared", &[("namespace", "shared")])
        .await?;
    lattice
        .put_config("ns-alone", &[("namespace", "alone")])
        .await?;
    for (id, config) in [
        ("kv-a", "ns-shared"),
        ("kv-b", "ns-shared"),
        ("kv-c", "ns-alone"),
    ] {
        lattice.scale_component(&wasm, id).await?;
        lattice.link_keyvalue(id, PROVIDER, &[config]).await?;
    }
    wait_for("the provider to hold the 3 links", || async {
        lattice
            .provider_health(PROVIDER)
            .await
            .filter(|h| h.starts_with("3 links"))
    })
    .await?;
    let a = lattice.component("kv-a");
    let b = lattice.component("kv-b");
    let c = lattice.component("kv-c");
    first_set_goes_through("kv-a", &a).await?;

    round_trips(&a).await?;
    counting(&a).await?;
    batches_and_paging(&a).await?;
    sharing_and_isolation(&a, &b, &c).await?;
    limits(lattice, &a, &b).await?;
    bursts(lattice, &wasm).await?;
    watching(lattice, dir, &a).await?;
    Ok(())
}

/// A real component exporting `wasi:keyvalue/watcher`, linked from the provider, is told of
/// kv-a's writes in the namespace they share (`shared`) and records them in its bucket `seen`,
/// which kv-a then reads: the host accepted the events we sent, `bucket` argument included.
async fn watching(
    lattice: &Lattice,
    dir: &Path,
    a: &keyvalue_inmemory::client::Transport,
) -> anyhow::Result<()> {
    let wasm = dir.join("watcher.wasm");
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
    std::fs::write(&wasm, e2e::component::build_watcher(&wit)?)?;
    lattice.scale_component(&wasm, "kv-w").await?;
    lattice
        .link_keyvalue("kv-w", PROVIDER, &["ns-shared"])
        .await?;
    // Only bucket `b`: what kv-w writes to `seen` is no event of its own.
    lattice
        .put_config("watch-b", &[("watch", "SET:b@user:*,DEL:b@user:*")])
        .await?;
    lattice.link_watcher(PROVIDER, "kv-w", &["watch-b"]).await?;
    wait_for("the provider to hold the watch link", || async {
        lattice
            .provider_health(PROVIDER)
            .await
            .filter(|h| h.contains(" 1 watchers,"))
    })
    .await?;
    assert_eq!(
        call("set", kv::set(a, None, "b", "user:1", &bytes("hello"))).await?,
        Ok(())
    );
    assert_eq!(
        call("set", kv::set(a, None, "b", "other", &bytes("x"))).await?,
        Ok(())
    );
    let seen = |key: &'static str, want: &'static str| async move {
        wait_for(&format!("kv-w to record {key}={want}"), || async {
            match call("get", kv::get(a, None, "seen", key)).await {
                Ok(Ok(Some(v))) if v == bytes(want) => Some(()),
                _ => None,
            }
        })
        .await
    };
    seen("user:1", "hello").await?;
    assert_eq!(
        call("delete", kv::delete(a, None, "b", "user:1")).await?,
        Ok(())
    );
    seen("user:1", "deleted").await?;
    assert_eq!(
        call("get", kv::get(a, None, "seen", "other")).await?,
        Ok(None),
        "a key no rule names is not told"
    );
    // A delivery counts when the host answers the call, after the component's write.
    wait_for("the provider to count both events delivered", || async {
        lattice
            .provider_health(PROVIDER)
            .await
            .filter(|h| h.contains("watch events: 2 delivered, 0 dropped, 0 failed"))
    })
    .await?;
    Ok(())
}

/// The bursts: how many instances the component may run at once (our own wadm.yaml gives
/// the demo 1; 4 is what manifests that nobody tuned run), in order.
const BURSTS: [u32; 3] = [4, 4, 1];
/// Calls per burst and calls in flight.
const BURST_CALLS: u64 = 10_000;
const BURST_IN_FLIGHT: u64 = 64;

/// The host's client drops handshakes that arrive before it subscribed; each such call used
/// to hang for the host's 10 s invocation timeout while holding a component instance. Bursts
/// of mixed calls through the host, checked against a model: every call is answered and
/// right. Prints what the host dropped beside what the provider sent again.
async fn bursts(lattice: &Lattice, wasm: &Path) -> anyhow::Result<()> {
    use keyvalue_inmemory::client::drops;
    lattice
        .put_config("ns-burst", &[("namespace", "burst")])
        .await?;
    lattice
        .scale_component_to(wasm, "kv-burst", BURSTS[0])
        .await?;
    lattice
        .link_keyvalue("kv-burst", PROVIDER, &["ns-burst"])
        .await?;
    let kv = lattice.component("kv-burst");
    first_set_goes_through("kv-burst", &kv).await?;
    // The provider's transport figures, from its health message.
    let figures = || async {
        let health = wait_for("the provider's health", || {
            lattice.provider_health(PROVIDER)
        })
        .await?;
        keyvalue_inmemory::transport::Figures::read(&health)
            .with_context(|| format!("no transport figures in the health message {health:?}"))
    };
    let mut failed = Vec::new();
    for (round, instances) in BURSTS.into_iter().enumerate() {
        if round > 0 && instances != BURSTS[round - 1] {
            lattice
                .scale_component_to(wasm, "kv-burst", instances)
                .await?;
        }
        let before = figures().await?;
        let (handshakes, results) = drops::dropped();
        let params = drops::dropped_params();
        let warnings = drops::warnings();
        let started = std::time::Instant::now();
        let mut seen = burst(&kv, round).await;
        let elapsed = started.elapsed();
        let after = figures().await?;
        let (handshakes_after, results_after) = drops::dropped();
        let covered = after.since(before);
        let Burst {
            unanswered, wrong, ..
        } = seen;
        eprintln!(
            "burst {round}: {BURST_CALLS} calls at {BURST_IN_FLIGHT} in flight through the host \
             ({instances} instances) in {:.1} s ({}): {unanswered} unanswered, {wrong} wrong; \
             the host's client dropped {} handshake messages and {} result messages, its server \
             {} parameter messages; the provider resent {} handshakes: {} calls recovered, {} \
             spurious",
            elapsed.as_secs_f64(),
            seen.latencies(),
            handshakes_after.saturating_sub(handshakes),
            results_after.saturating_sub(results),
            drops::dropped_params().saturating_sub(params),
            covered.resent,
            covered.recovered,
            covered.spurious,
        );
        for (why, n) in &seen.failures {
            eprintln!("  {n} × {why}");
        }
        for (warning, n) in drops::warnings() {
            let new = n.saturating_sub(warnings.get(&warning).copied().unwrap_or(0));
            if new > 0 {
                eprintln!("  host log: {new} × {warning}");
            }
        }
        if unanswered > 0 || wrong > 0 {
            failed.push(format!(
                "burst {round}: {unanswered} calls unanswered, {wrong} wrong"
            ));
        }
    }
    // Every burst runs (and prints) before the verdict.
    ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(())
}

/// What one burst saw.
#[derive(Default)]
struct Burst {
    unanswered: u64,
    wrong: u64,
    /// Each answered call's time, in µs.
    micros: Vec<u64>,
    /// Why calls went unanswered, with how many.
    failures: std::collections::BTreeMap<String, u64>,
}

impl Burst {
    fn add(mut self, other: Burst) -> Burst {
        self.unanswered += other.unanswered;
        self.wrong += other.wrong;
        self.micros.extend(other.micros);
        for (why, n) in other.failures {
            *self.failures.entry(why).or_default() += n;
        }
        self
    }

    /// "p50 … ms, p99 … ms, max … ms".
    fn latencies(&mut self) -> String {
        self.micros.sort_unstable();
        let at = |q: f64| {
            let i =
                ((self.micros.len() as f64 * q) as usize).min(self.micros.len().saturating_sub(1));
            self.micros.get(i).copied().unwrap_or(0) as f64 / 1000.0
        };
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            at(0.5),
            at(0.99),
            at(1.0)
        )
    }
}

/// One burst: each worker increments its counter, sets keys and reads back the previous one.
async fn burst(kv: &keyvalue_inmemory::client::Transport, round: usize) -> Burst {
    let workers = (0..BURST_IN_FLIGHT).map(|worker| async move {
        let bucket = format!("burst-{round}");
        let counter = format!("count-{worker}");
        let mut seen = Burst::default();
        let mut count = 0u64;
        for i in 0..BURST_CALLS / BURST_IN_FLIGHT {
            let key = |i: u64| format!("w{worker}-{i}");
            let started = std::time::Instant::now();
            let answer = match i % 3 {
                0 => call("increment", kv::increment(kv, None, &bucket, &counter, 1))
                    .await
                    .map(|r| {
                        count += 1;
                        r == Ok(count)
                    }),
                1 => call(
                    "set",
                    kv::set(kv, None, &bucket, &key(i), &bytes(&i.to_string())),
                )
                .await
                .map(|r| r == Ok(())),
                _ => call("get", kv::get(kv, None, &bucket, &key(i - 1)))
                    .await
                    .map(|r| r == Ok(Some(bytes(&(i - 1).to_string())))),
            };
            match answer {
                Ok(right) => {
                    seen.micros.push(started.elapsed().as_micros() as u64);
                    seen.wrong += u64::from(!right);
                }
                Err(e) => {
                    seen.unanswered += 1;
                    *seen.failures.entry(format!("{e:#}")).or_default() += 1;
                }
            }
        }
        seen
    });
    futures::future::join_all(workers)
        .await
        .into_iter()
        .fold(Burst::default(), Burst::add)
}

/// Waits until a `set` through `component` succeeds: the host applies a link to the component
/// a moment after the provider sees it.
async fn first_set_goes_through(
    name: &str,
    component: &keyvalue_inmemory::client::Transport,
) -> anyhow::Result<()> {
    let value = bytes("v");
    wait_for(&format!("{name}'s first set to go through"), || async {
        let set = kv::set(component, None, "warm-up", "k", &value);
        matches!(call("set", set).await, Ok(Ok(()))).then_some(())
    })
    .await
}

async fn round_trips(a: &keyvalue_inmemory::client::Transport) -> anyhow::Result<()> {
    let set = call(
        "set",
        kv::set(a, None, "round", "greeting", &bytes("hello")),
    )
    .await?;
    assert_eq!(set, Ok(()));
    let got = call("get", kv::get(a, None, "round", "greeting")).await?;
    assert_eq!(got, Ok(Some(bytes("hello"))));
    assert_eq!(
        call("exists", kv::exists(a, None, "round", "greeting")).await?,
        Ok(true)
    );
    assert_eq!(
        call("delete", kv::delete(a, None, "round", "greeting")).await?,
        Ok(())
    );
    assert_eq!(
        call("exists", kv::exists(a, None, "round", "greeting")).await?,
        Ok(false)
    );
    assert_eq!(
        call("get", kv::get(a, None, "round", "greeting")).await?,
        Ok(None)
    );
    // Deleting a missing key is a no-op, and a bucket never written reads as empty.
    assert_eq!(
        call("delete", kv::delete(a, None, "round", "greeting")).await?,
        Ok(())
    );
    assert_eq!(
        call("get", kv::get(a, None, "never-written", "x")).await?,
        Ok(None)
    );
    // An empty value is a value.
    assert_eq!(
        call("set", kv::set(a, None, "round", "empty", &Bytes::new())).await?,
        Ok(())
    );
    assert_eq!(
        call("get", kv::get(a, None, "round", "empty")).await?,
        Ok(Some(Bytes::new()))
    );
    Ok(())
}

async fn counting(a: &keyvalue_inmemory::client::Transport) -> anyhow::Result<()> {
    // A missing key starts at delta; then 20 concurrent increments of 1 through the host.
    let first = call("increment", kv::increment(a, None, "count", "hits", 5)).await?;
    assert_eq!(first, Ok(5));
    let all = futures::future::join_all(
        (0..20).map(|_| call("increment", kv::increment(a, None, "count", "hits", 1))),
    )
    .await;
    let mut seen = Vec::new();
    for result in all {
        seen.push(result?.map_err(|e| anyhow::anyhow!("increment: {e:?}"))?);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (6..=25).collect::<Vec<u64>>(),
        "each increment saw its own value"
    );
    assert_eq!(
        call("get", kv::get(a, None, "count", "hits")).await?,
        Ok(Some(bytes("25"))),
        "a counter is stored as decimal text"
    );
    Ok(())
}

async fn batches_and_paging(a: &keyvalue_inmemory::client::Transport) -> anyhow::Result<()> {
    let pairs: Vec<(String, Bytes)> = (0..10)
        .map(|i| (format!("key-{i:02}"), bytes(&format!("value-{i}"))))
        .collect();
    let borrowed: Vec<(&str, &Bytes)> = pairs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(
        call("set-many", kv::set_many(a, None, "batch", &borrowed)).await?,
        Ok(())
    );
    let keys = ["key-07", "missing", "key-02"];
    let got = call("get-many", kv::get_many(a, None, "batch", &keys)).await?;
    assert_eq!(
        got,
        Ok(vec![
            Some(("key-07".to_string(), bytes("value-7"))),
            None,
            Some(("key-02".to_string(), bytes("value-2"))),
        ]),
        "get-many answers in the order asked, none for a missing key"
    );

    let mut listed = Vec::new();
    let mut cursor = None;
    let mut calls = 0;
    loop {
        calls += 1;
        ensure!(calls <= 10, "list-keys never ended: {listed:?}");
        let page = call("list-keys", kv::list_keys(a, None, "batch", cursor))
            .await?
            .map_err(|e| anyhow::anyhow!("list-keys: {e:?}"))?;
        assert!(page.keys.len() <= PAGE, "page larger than list_page_size");
        listed.extend(page.keys);
        cursor = page.cursor;
        if cursor.is_none() {
            break;
        }
    }
    let expected: Vec<String> = pairs.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(listed, expected, "every key exactly once, in order");
    assert_eq!(calls, 4, "10 keys in pages of {PAGE}");
    Ok(())
}

async fn sharing_and_isolation(
    a: &keyvalue_inmemory::client::Transport,
    b: &keyvalue_inmemory::client::Transport,
    c: &keyvalue_inmemory::client::Transport,
) -> anyhow::Result<()> {
    assert_eq!(
        call("set", kv::set(a, None, "team", "owner", &bytes("a"))).await?,
        Ok(())
    );
    assert_eq!(
        call("get", kv::get(b, None, "team", "owner")).await?,
        Ok(Some(bytes("a"))),
        "kv-b shares kv-a's namespace"
    );
    assert_eq!(
        call("get", kv::get(c, None, "team", "owner")).await?,
        Ok(None),
        "kv-c is in a namespace of its own"
    );
    assert_eq!(
        call("set", kv::set(c, None, "team", "owner", &bytes("c"))).await?,
        Ok(())
    );
    assert_eq!(
        call("get", kv::get(a, None, "team", "owner")).await?,
        Ok(Some(bytes("a")))
    );
    assert_eq!(
        call("get", kv::get(c, None, "team", "owner")).await?,
        Ok(Some(bytes("c")))
    );
    Ok(())
}

async fn limits(
    lattice: &Lattice,
    a: &keyvalue_inmemory::client::Transport,
    b: &keyvalue_inmemory::client::Transport,
) -> anyhow::Result<()> {
    let long = "k".repeat(MAX_KEY + 1);
    // The host hands get/increment errors to the component as values.
    match call("get", kv::get(a, None, "limits", &long)).await? {
        Err(kv::Error::Other(message)) => assert!(
            message.contains("max_key_bytes"),
            "the error names the limit: {message}"
        ),
        other => panic!("a key over max_key_bytes must be an error value, got {other:?}"),
    }
    assert!(matches!(
        call("increment", kv::increment(a, None, "limits", &long, 1)).await?,
        Err(kv::Error::Other(_))
    ));
    // For set, the 1.x host traps the component on a provider error (its wasi:keyvalue `set` has no error path): the host
    // ends the call without results (the client reads "incomplete results"), nothing is
    // written, and the provider goes on serving every component.
    let refused = tokio::time::timeout(
        Duration::from_secs(15),
        kv::set(a, None, "limits", &long, &bytes("v")),
    )
    .await
    .context("the trapped call got no answer at all")?;
    assert!(
        refused.is_err(),
        "a set over max_key_bytes must trap the component, got {refused:?}"
    );
    let health = lattice
        .provider_health(PROVIDER)
        .await
        .context("the provider stopped answering health after the trap")?;
    assert!(health.starts_with("3 links"), "{health}");
    for (component, name) in [(a, "kv-a"), (b, "kv-b")] {
        assert_eq!(
            call(
                "set",
                kv::set(component, None, "limits", "short", &bytes(name))
            )
            .await?,
            Ok(()),
            "{name} is served after kv-a trapped"
        );
        assert_eq!(
            call("get", kv::get(component, None, "limits", "short")).await?,
            Ok(Some(bytes(name)))
        );
    }
    Ok(())
}

/// The host stops a provider with a shutdown request and kills the process as soon as it is
/// answered: the final snapshot must be on disk by then, with every answered write.
fn stopped_by_the_host_loses_nothing(path: &Path) {
    let file = std::fs::File::open(path).expect("no snapshot after the host stopped the provider");
    let engine = keyvalue_store::Engine::new(keyvalue_store::Limits::UNLIMITED);
    keyvalue_store::snapshot::load(file, &engine).expect("the final snapshot does not load");
    // The links name `shared` and `alone`: named namespaces.
    let get = |ns: &str, bucket: &str, key: &str| {
        let ns = keyvalue_inmemory::links::named_namespace(ns);
        engine.get(&ns, bucket, key).map(|v| v.to_vec())
    };
    assert_eq!(get("shared", "team", "owner"), Some(b"a".to_vec()));
    assert_eq!(get("alone", "team", "owner"), Some(b"c".to_vec()));
    assert_eq!(get("shared", "count", "hits"), Some(b"25".to_vec()));
    assert_eq!(get("shared", "limits", "short"), Some(b"kv-b".to_vec()));
}
