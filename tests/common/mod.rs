//! Black-box test harness: a real `nats-server` on a loopback port it picks, the real provider
//! binary started as the host starts it (base64 host data on stdin, environment cleared), the
//! control subjects the host publishes on, and a wRPC client generated from our `wit/`.
//!
//! Every wait here is bounded: a broken provider fails a test, it never hangs one.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats as nats;
use futures::StreamExt as _;
use serde_json::json;

pub use keyvalue_inmemory::client::{atomics, batch, store, Transport};
pub use test_support::nats::NatsServer;

/// How long any one call or wait may take before the test fails.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The lattice every test provider joins.
pub const LATTICE: &str = "test-lattice";
/// The host id in host data; shutdown requests must name it.
pub const HOST_ID: &str = "NTESTHOST";

/// A link from `source` to the provider, as the host sends it.
pub fn link(
    provider_key: &str,
    source: &str,
    name: &str,
    namespace: Option<&str>,
) -> serde_json::Value {
    let target_config: HashMap<&str, &str> =
        namespace.map(|ns| ("namespace", ns)).into_iter().collect();
    test_support::host::link(source, provider_key, name, json!(target_config))
}

/// A provider key no other provider of this test process has.
pub fn unique_key() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("VKV{}N{n}", std::process::id())
}

/// Waits until exactly `n` processes serve provider `key`'s calls: after one is killed,
/// nats-server keeps its subscriptions until it has noticed the connection closed, and a call
/// the queue group routes to it meanwhile is lost. Needs the multi-thread runtime.
pub fn wait_for_serving(server: &NatsServer, key: &str, n: usize) {
    let prefix = format!("{LATTICE}.{key}.");
    tokio::task::block_in_place(|| server.wait_for_subscribers(&prefix, n, CALL_TIMEOUT))
        .unwrap_or_else(|err| panic!("{err:#}"));
}

/// The provider binary, running; killed on drop if still alive.
pub struct Provider {
    child: Child,
    pub key: String,
    pub nats: nats::Client,
    pub wrpc: Transport,
    /// The instances of this provider that must all have taken a control message before its
    /// wait ends ([`Provider::wait_for_health`]; replicated tests, where each health request
    /// is answered by one of them). Empty: whichever instance answers.
    pub instances: Vec<String>,
}

impl Provider {
    /// Starts the provider with provider `config` and the links in host data, and waits until
    /// it answers health.
    pub async fn start(
        server: &NatsServer,
        config: &[(&str, &str)],
        links: &[(&str, &str, Option<&str>)],
    ) -> Self {
        Self::start_with(server, serde_json::json!({}), config, links).await
    }

    /// Like [`Provider::start`], with more host data fields (e.g. `otel_config`).
    pub async fn start_with(
        server: &NatsServer,
        extra_host_data: serde_json::Value,
        config: &[(&str, &str)],
        links: &[(&str, &str, Option<&str>)],
    ) -> Self {
        Self::start_logging(server, extra_host_data, config, links, None).await
    }

    /// Like [`Provider::start_with`]; with `log`, the provider's stderr (at `info`) goes to
    /// that file.
    pub async fn start_logging(
        server: &NatsServer,
        extra_host_data: serde_json::Value,
        config: &[(&str, &str)],
        links: &[(&str, &str, Option<&str>)],
        log: Option<&Path>,
    ) -> Self {
        let provider = Self::launch(
            server,
            (&unique_key(), "test-instance"),
            extra_host_data,
            config,
            links,
            log,
        )
        .await;
        provider.wait_for_health(|_| true).await;
        provider
    }

    /// One more instance of provider `key` (calls to it go to any of its instances, as the
    /// host's do), started as `instance`; waits until that instance itself answers health,
    /// which a replicated instance does once it caught up.
    pub async fn start_instance(
        server: &NatsServer,
        key: &str,
        instance: &str,
        config: &[(&str, &str)],
        links: &[(&str, &str, Option<&str>)],
    ) -> Self {
        Self::start_instance_logging(server, key, instance, config, links, None).await
    }

    /// Like [`Provider::start_instance`]; with `log`, the provider's stderr (at `info`) goes
    /// to that file.
    pub async fn start_instance_logging(
        server: &NatsServer,
        key: &str,
        instance: &str,
        config: &[(&str, &str)],
        links: &[(&str, &str, Option<&str>)],
        log: Option<&Path>,
    ) -> Self {
        let provider = Self::launch(server, (key, instance), json!({}), config, links, log).await;
        let mine = format!("instance {instance},");
        provider
            .wait_for_health(|health| health.contains(&mine))
            .await;
        provider
    }

    /// Starts instance `instance` of provider `key` with `config`, which must refuse to start;
    /// answers what it wrote to stderr.
    pub async fn start_refused(
        server: &NatsServer,
        key: &str,
        instance: &str,
        config: &[(&str, &str)],
    ) -> String {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr");
        let mut provider =
            Self::launch(server, (key, instance), json!({}), config, &[], Some(&log)).await;
        let status = provider.wait_exit().await;
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!status.success(), "{instance} started: {stderr}");
        stderr
    }

    /// Starts the binary; does not wait for it.
    async fn launch(
        server: &NatsServer,
        (key, instance): (&str, &str),
        extra_host_data: serde_json::Value,
        config: &[(&str, &str)],
        links: &[(&str, &str, Option<&str>)],
        log: Option<&Path>,
    ) -> Self {
        let key = key.to_owned();
        let host_data = test_support::host::HostData {
            host_id: HOST_ID,
            lattice: LATTICE,
            nats_url: &server.url(),
            provider_key: &key,
            instance_id: instance,
            config: (config.iter())
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
            links: (links.iter())
                .map(|(source, name, ns)| link(&key, source, name, *ns))
                .collect(),
            extra: extra_host_data,
        };
        let child = spawn_with_host_data(&host_data.to_json().to_string(), log);
        let nats = nats::connect(server.url()).await.expect("test NATS client");
        let wrpc = Transport::new(nats.clone(), LATTICE, &key);
        Self {
            child,
            key,
            nats,
            wrpc,
            instances: Vec::new(),
        }
    }

    fn subject(&self, suffix: &str) -> String {
        format!("wasmbus.rpc.{LATTICE}.{}.{suffix}", self.key)
    }

    /// The health message, or `None` when no answer came in time.
    pub async fn try_health(&self) -> Option<String> {
        let reply = tokio::time::timeout(
            Duration::from_secs(1),
            self.nats.request(self.subject("health"), "{}".into()),
        )
        .await
        .ok()?
        .ok()?;
        let body: serde_json::Value =
            serde_json::from_slice(&reply.payload).expect("health reply is JSON");
        assert_eq!(body["healthy"], true, "{body}");
        Some(body["message"].as_str().unwrap_or_default().to_owned())
    }

    /// Waits until a health message satisfies `ok` (from each of [`Provider::instances`],
    /// when it names them); answers the last.
    pub async fn wait_for_health(&self, ok: impl Fn(&str) -> bool) -> String {
        let instances: Vec<&str> = self.instances.iter().map(String::as_str).collect();
        self.wait_for_health_of(&instances, ok).await
    }

    /// Waits until a health message satisfies `ok` from each instance named (replicated
    /// instances report `instance <name>,`; each health request is answered by one of them,
    /// so it asks until each was heard), or from whichever answers when none is named;
    /// answers the last.
    pub async fn wait_for_health_of(
        &self,
        instances: &[&str],
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut heard = std::collections::BTreeSet::<&str>::new();
        let mut last = None;
        loop {
            if let Some(message) = self.try_health().await {
                if ok(&message) {
                    let from = (instances.iter())
                        .find(|instance| message.contains(&format!("instance {instance},")));
                    heard.extend(from.copied());
                    if heard.len() == instances.len() {
                        return message;
                    }
                }
                last = Some(message);
            }
            assert!(
                Instant::now() < deadline,
                "health never became as expected from each of {instances:?} (heard {heard:?}); \
                 last: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Puts a link and waits until the provider counts `expect_links` links.
    pub async fn put_link(
        &self,
        source: &str,
        name: &str,
        namespace: Option<&str>,
        expect_links: usize,
    ) {
        let config: Vec<(&str, &str)> = namespace.map(|ns| ("namespace", ns)).into_iter().collect();
        self.put_link_config(source, name, &config, expect_links)
            .await;
    }

    /// Puts a link with this link config (`target_config`) and waits until the provider
    /// counts `expect_links` links.
    pub async fn put_link_config(
        &self,
        source: &str,
        name: &str,
        config: &[(&str, &str)],
        expect_links: usize,
    ) {
        let config: HashMap<&str, &str> = config.iter().copied().collect();
        let body = test_support::host::link(source, &self.key, name, json!(config)).to_string();
        self.nats
            .publish(self.subject("linkdefs.put"), body.into())
            .await
            .unwrap();
        self.wait_for_health(|m| m.starts_with(&format!("{expect_links} links")))
            .await;
    }

    /// Deletes a link and waits until the provider counts `expect_links` links.
    pub async fn delete_link(&self, source: &str, name: &str, expect_links: usize) {
        let body = link(&self.key, source, name, None).to_string();
        self.nats
            .publish(self.subject("linkdefs.del"), body.into())
            .await
            .unwrap();
        self.wait_for_health(|m| m.starts_with(&format!("{expect_links} links")))
            .await;
    }

    /// Links the provider to component `target` as a watcher (link `name`, `source_config`
    /// `config`) and waits until the provider counts `expect_watchers` watchers.
    pub async fn put_watch_link(
        &self,
        target: &str,
        name: &str,
        config: &[(&str, &str)],
        expect_watchers: usize,
    ) {
        let config: HashMap<&str, &str> = config.iter().copied().collect();
        let body = test_support::host::watch_link(&self.key, target, name, json!(config));
        self.nats
            .publish(self.subject("linkdefs.put"), body.to_string().into())
            .await
            .unwrap();
        self.wait_for_health(|m| m.contains(&format!(" {expect_watchers} watchers,")))
            .await;
    }

    /// Deletes the watch link to `target` named `name` and waits until the provider counts
    /// `expect_watchers` watchers.
    pub async fn delete_watch_link(&self, target: &str, name: &str, expect_watchers: usize) {
        let body = test_support::host::watch_link(&self.key, target, name, json!({}));
        self.nats
            .publish(self.subject("linkdefs.del"), body.to_string().into())
            .await
            .unwrap();
        self.wait_for_health(|m| m.contains(&format!(" {expect_watchers} watchers,")))
            .await;
    }

    /// Sends the full provider config and waits until health shows `expect` in force.
    pub async fn update_config(&self, config: &[(&str, &str)], expect: &str) {
        let map: HashMap<&str, &str> = config.iter().copied().collect();
        let body = serde_json::to_vec(&map).unwrap();
        self.nats
            .publish(self.subject("config.update"), body.into())
            .await
            .unwrap();
        self.wait_for_health(|m| m.contains(expect)).await;
    }

    /// Publishes raw bytes on a control subject (`health`, `linkdefs.put`, …).
    pub async fn publish_control(&self, suffix: &str, payload: Vec<u8>) {
        self.nats
            .publish(self.subject(suffix), payload.into())
            .await
            .unwrap();
    }

    /// The data-plane subject of one function.
    pub fn function_subject(&self, instance: &str, func: &str) -> String {
        format!("{LATTICE}.{}.wrpc.0.0.1.{instance}.{func}", self.key)
    }

    /// The host's shutdown request; answers the reply.
    pub async fn request_shutdown(&self) -> String {
        let body = json!({ "host_id": HOST_ID }).to_string();
        let reply = tokio::time::timeout(
            CALL_TIMEOUT,
            self.nats
                .request(self.subject("default.shutdown"), body.into()),
        )
        .await
        .expect("shutdown reply timed out")
        .expect("shutdown request failed");
        String::from_utf8_lossy(&reply.payload).into_owned()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit; answers its status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + CALL_TIMEOUT + CALL_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "provider did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process still runs.
    /// The provider's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// A caller: the headers a host sends for component `source` over link `link_name`.
    pub fn as_component(&self, source: &str, link_name: &str) -> Caller<'_> {
        Caller {
            wrpc: &self.wrpc,
            headers: Some(keyvalue_inmemory::client::component_headers(
                source, link_name,
            )),
        }
    }

    /// A caller that sends no headers at all.
    pub fn anonymous(&self) -> Caller<'_> {
        Caller {
            wrpc: &self.wrpc,
            headers: None,
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns the provider binary as the host does: environment cleared but for `RUST_LOG`, one
/// line of base64 host data on stdin, then stdin closed.
pub fn spawn_with_host_data(json: &str, log: Option<&Path>) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyvalue-inmemory"));
    command.env_clear().stdout(Stdio::null());
    if let Some(level) = std::env::var_os("RUST_LOG") {
        command.env("RUST_LOG", level);
    }
    if let Some(log) = log {
        command.stderr(std::fs::File::create(log).expect("log file"));
    } else if std::env::var_os("RUST_LOG").is_none() {
        command.stderr(Stdio::null());
    }
    test_support::host::spawn_provider(command, json).expect("failed to start the provider binary")
}

/// Calls made as one component; every call carries [`CALL_TIMEOUT`].
pub struct Caller<'a> {
    wrpc: &'a Transport,
    headers: Option<nats::HeaderMap>,
}

/// Runs one call with the timeout; a transport failure or a timeout fails the test.
macro_rules! call {
    ($fut:expr) => {
        tokio::time::timeout(CALL_TIMEOUT, $fut)
            .await
            .expect("call timed out")
            .expect("call failed")
    };
}

impl Caller<'_> {
    /// The same caller, sending one more header (e.g. `traceparent`).
    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers
            .get_or_insert_with(nats::HeaderMap::new)
            .insert(name, value);
        self
    }

    fn cx(&self) -> Option<nats::HeaderMap> {
        self.headers.clone()
    }

    pub async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, store::Error> {
        call!(store::get(self.wrpc, self.cx(), bucket, key)).map(|v| v.map(|b| b.to_vec()))
    }

    pub async fn set(&self, bucket: &str, key: &str, value: &[u8]) -> Result<(), store::Error> {
        call!(store::set(
            self.wrpc,
            self.cx(),
            bucket,
            key,
            &bytes::Bytes::copy_from_slice(value)
        ))
    }

    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), store::Error> {
        call!(store::delete(self.wrpc, self.cx(), bucket, key))
    }

    pub async fn exists(&self, bucket: &str, key: &str) -> Result<bool, store::Error> {
        call!(store::exists(self.wrpc, self.cx(), bucket, key))
    }

    pub async fn list_keys(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, store::Error> {
        call!(store::list_keys(self.wrpc, self.cx(), bucket, cursor))
    }

    pub async fn increment(
        &self,
        bucket: &str,
        key: &str,
        delta: u64,
    ) -> Result<u64, store::Error> {
        call!(atomics::increment(self.wrpc, self.cx(), bucket, key, delta))
    }

    pub async fn get_many(
        &self,
        bucket: &str,
        keys: &[&str],
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, store::Error> {
        call!(batch::get_many(self.wrpc, self.cx(), bucket, keys)).map(|vs| {
            vs.into_iter()
                .map(|v| v.map(|(k, v)| (k, v.to_vec())))
                .collect()
        })
    }

    pub async fn set_many(
        &self,
        bucket: &str,
        pairs: &[(&str, &[u8])],
    ) -> Result<(), store::Error> {
        let values: Vec<bytes::Bytes> = pairs
            .iter()
            .map(|(_, v)| bytes::Bytes::copy_from_slice(v))
            .collect();
        let pairs: Vec<(&str, &bytes::Bytes)> = pairs
            .iter()
            .zip(&values)
            .map(|((k, _), v)| (*k, v))
            .collect();
        call!(batch::set_many(self.wrpc, self.cx(), bucket, &pairs))
    }

    pub async fn delete_many(&self, bucket: &str, keys: &[&str]) -> Result<(), store::Error> {
        call!(batch::delete_many(self.wrpc, self.cx(), bucket, keys))
    }

    /// All keys of a bucket, page by page; panics on a page over `page_size` keys.
    pub async fn list_all(&self, bucket: &str, page_size: usize) -> Vec<String> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.list_keys(bucket, cursor).await.expect("list-keys");
            assert!(
                page.keys.len() <= page_size,
                "page of {} keys",
                page.keys.len()
            );
            keys.extend(page.keys);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return keys,
            }
        }
    }
}

/// The message of an `other` error; panics on any other answer.
pub fn other_message<T: std::fmt::Debug>(result: Result<T, store::Error>) -> String {
    match result {
        Err(store::Error::Other(message)) => message,
        other => panic!("expected an `other` error, got {other:?}"),
    }
}

/// Whether the answer is `access-denied`.
pub fn is_denied<T>(result: &Result<T, store::Error>) -> bool {
    matches!(result, Err(store::Error::AccessDenied))
}

/// Parameters that are all strings or byte lists, encoded in order.
pub fn encode_fields(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        encode_bytes(&mut out, field);
    }
    out
}

/// wRPC value encoding of a string or byte list: LEB128 length, then the bytes.
pub fn encode_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    encode_len(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// wRPC value encoding of a length or count: LEB128.
pub fn encode_len(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
}

/// The nine functions we serve: (instance, function).
pub const FUNCTIONS: [(&str, &str); 9] = [
    ("wrpc:keyvalue/store@0.2.0-draft", "get"),
    ("wrpc:keyvalue/store@0.2.0-draft", "set"),
    ("wrpc:keyvalue/store@0.2.0-draft", "delete"),
    ("wrpc:keyvalue/store@0.2.0-draft", "exists"),
    ("wrpc:keyvalue/store@0.2.0-draft", "list-keys"),
    ("wrpc:keyvalue/atomics@0.2.0-draft", "increment"),
    ("wrpc:keyvalue/batch@0.2.0-draft", "get-many"),
    ("wrpc:keyvalue/batch@0.2.0-draft", "set-many"),
    ("wrpc:keyvalue/batch@0.2.0-draft", "delete-many"),
];

/// Every function answers a valid call from `c` (keys `k`, `n`, `x` of bucket `b`).
pub async fn every_function_serves(c: &Caller<'_>) {
    c.set("b", "k", b"v").await.unwrap();
    assert_eq!(c.get("b", "k").await, Ok(Some(b"v".to_vec())));
    assert_eq!(c.exists("b", "k").await, Ok(true));
    assert!(c.list_all("b", 1000).await.contains(&"k".to_string()));
    let before = c
        .get("b", "n")
        .await
        .unwrap()
        .map_or(0, |v| String::from_utf8(v).unwrap().parse::<u64>().unwrap());
    assert_eq!(c.increment("b", "n", 2).await, Ok(before + 2));
    c.set_many("b", &[("x", b"1")]).await.unwrap();
    assert_eq!(
        c.get_many("b", &["x"]).await,
        Ok(vec![Some(("x".into(), b"1".to_vec()))])
    );
    c.delete_many("b", &["x"]).await.unwrap();
    c.delete("b", "k").await.unwrap();
    assert_eq!(c.get("b", "k").await, Ok(None));
}

/// An invocation sent by hand: what a wRPC client does, one message at a time.
pub struct RawCall {
    nats: nats::Client,
    pub handshake: nats::Subscriber,
    pub results: nats::Subscriber,
    /// The server's parameter subject, once its handshake came.
    params: Option<String>,
    /// The end of parameters was sent.
    ended: bool,
}

impl RawCall {
    /// Publishes an invocation from component `source` whose first parameter bytes are
    /// `params`.
    pub async fn send(
        p: &Provider,
        source: &str,
        instance: &str,
        func: &str,
        params: Vec<u8>,
    ) -> Self {
        let reply = p.nats.new_inbox();
        let handshake = p.nats.subscribe(reply.clone()).await.unwrap();
        let results = p.nats.subscribe(format!("{reply}.results")).await.unwrap();
        let headers = keyvalue_inmemory::client::component_headers(source, "default");
        p.nats
            .publish_with_reply_and_headers(
                p.function_subject(instance, func),
                reply,
                headers,
                params.into(),
            )
            .await
            .unwrap();
        Self {
            nats: p.nats.clone(),
            handshake,
            results,
            params: None,
            ended: false,
        }
    }

    /// The subject the server reads further parameters from, from its handshake.
    pub async fn server_params_subject(&mut self) -> String {
        self.handshake_within(CALL_TIMEOUT)
            .await
            .expect("no handshake")
    }

    async fn handshake_within(&mut self, limit: Duration) -> Option<String> {
        if self.params.is_none() {
            let handshake = tokio::time::timeout(limit, self.handshake.next())
                .await
                .ok()?
                .expect("handshake subscription ended");
            self.params = Some(format!(
                "{}.params",
                handshake.reply.expect("handshake without reply subject")
            ));
        }
        self.params.clone()
    }

    /// Sends the end of parameters (once), as a client does once it has sent them all.
    pub async fn end_params_within(&mut self, limit: Duration) -> Option<()> {
        if !self.ended {
            let subject = self.handshake_within(limit).await?;
            self.nats
                .publish(subject, bytes::Bytes::new())
                .await
                .unwrap();
            self.ended = true;
        }
        Some(())
    }

    /// Ends the parameters and reads the result bytes, up to the closing empty message.
    pub async fn results(&mut self) -> Vec<u8> {
        self.results_within(CALL_TIMEOUT).await.expect("no results")
    }

    /// Ends the parameters and reads the result bytes, or `None` if they did not all come
    /// within `limit`. A one-message answer may be followed by copies of itself, marked as
    /// such (sent with a repeated handshake when our end of parameters was late); a wRPC
    /// client reads one value and never sees them, and neither does this.
    pub async fn results_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + limit;
        self.end_params_within(limit).await?;
        let mut out = Vec::new();
        loop {
            let msg = tokio::time::timeout_at(deadline, self.results.next())
                .await
                .ok()?
                .expect("result subscription ended");
            if msg.payload.is_empty() {
                return Some(out);
            }
            let copy = (msg.headers.as_ref())
                .is_some_and(|h| h.get(keyvalue_inmemory::transport::COPY_HEADER).is_some());
            if !copy {
                out.extend_from_slice(&msg.payload);
            }
        }
    }

    /// The first results message, without ending the parameters (an answer given while the
    /// parameters are still on their way), or `None` if none came within `limit`.
    pub async fn answer_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let msg = tokio::time::timeout(limit, self.results.next())
            .await
            .ok()?
            .expect("result subscription ended");
        Some(msg.payload.to_vec())
    }
}

/// The message of a raw `result<_, error>` answer that is `err(other(message))`: tag 1
/// (err), case 2 (other), then the string.
pub fn raw_other_message(results: &[u8]) -> Option<String> {
    if results.len() < 3 || results[..2] != [1, 2] {
        return None;
    }
    let mut at = 2;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let byte = *results.get(at)?;
        len |= usize::from(byte & 0x7f) << shift;
        at += 1;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let text = results.get(at..at + len)?;
    Some(String::from_utf8_lossy(text).into_owned())
}

/// The resident memory of a process, in bytes (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}
