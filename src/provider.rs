//! The provider: the SDK's control-plane callbacks and the generated wRPC handler traits, on
//! one struct that owns the engine, the link table and the config.
//!
//! Handlers answer `anyhow::Result<Result<T, store::Error>>`: the outer error means the call
//! itself failed (the caller sees a transport error), the inner one is the answer the
//! component receives. Engine errors become `store::Error::Other` in one place,
//! [`From<EngineError>`](#impl-From<EngineError>-for-Error).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Span};
use wasmcloud_provider_sdk::{
    Context, HealthCheckRequest, HealthCheckResponse, LinkConfig, LinkDeleteInfo, Provider,
    ProviderConfigUpdate, ProviderInitConfig,
};

use crate::bindings::exports::wrpc::keyvalue::{atomics, batch, store};
use crate::config::{Config, LINK_NAMESPACE};
use crate::engine::{Engine, EngineError, Usage};
use crate::links::LinkTable;
use crate::telemetry;

/// Namespace of unlinked calls that name no source (with `allow_unlinked=true`).
pub const DEFAULT_NAMESPACE: &str = "default";

/// How long a host's shutdown request waits for in-flight calls before the SDK replies.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// The in-memory key-value provider. Cheap to clone: clones share one store.
#[derive(Clone)]
pub struct KvProvider {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    links: LinkTable,
    // Read on every call for `allow_unlinked` and the request bounds; written on config updates.
    config: RwLock<Config>,
    /// Cancelled to stop taking calls.
    stop: CancellationToken,
    /// Cancelled by the serving loop once in-flight calls have finished.
    drained: CancellationToken,
    /// Where snapshots go, when they are on.
    snapshots: Option<crate::snapshot::Settings>,
    /// Whether the final snapshot was written (it is written once, by whichever stop path
    /// gets there first).
    final_written: tokio::sync::Mutex<bool>,
}

impl Default for KvProvider {
    fn default() -> Self {
        Self::new(Config::default(), None)
    }
}

impl KvProvider {
    /// A provider with an empty store and `config`, snapshotting as `snapshots` says.
    pub fn new(config: Config, snapshots: Option<crate::snapshot::Settings>) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine: Engine::new(config.limits),
                links: LinkTable::default(),
                config: RwLock::new(config),
                stop: CancellationToken::new(),
                drained: CancellationToken::new(),
                snapshots,
                final_written: tokio::sync::Mutex::new(false),
            }),
        }
    }

    /// The snapshot settings, when snapshots are on.
    pub fn snapshots(&self) -> Option<&crate::snapshot::Settings> {
        self.inner.snapshots.as_ref()
    }

    /// Writes a snapshot now (on a blocking thread), logging the outcome.
    pub async fn write_snapshot(&self, which: &str) {
        let Some(settings) = self.snapshots() else {
            return;
        };
        let (provider, path) = (self.clone(), settings.path.clone());
        let started = std::time::Instant::now();
        let written =
            tokio::task::spawn_blocking(move || crate::snapshot::write(provider.engine(), &path))
                .await;
        let path = settings.path.display();
        match written {
            Ok(Ok(stats)) => info!(
                entries = stats.entries,
                bytes = stats.bytes,
                millis = started.elapsed().as_millis() as u64,
                "{which} snapshot written to {path}"
            ),
            Ok(Err(err)) => tracing::error!("{which} snapshot to {path} failed: {err}"),
            Err(err) => tracing::error!("{which} snapshot task failed: {err}"),
        }
    }

    /// The snapshot of a stop, once in-flight calls are done: written once, whichever stop
    /// path (the host's shutdown request, a signal) comes first.
    pub async fn write_final_snapshot(&self) {
        let mut written = self.inner.final_written.lock().await;
        if !*written {
            self.write_snapshot("final").await;
            *written = true;
        }
    }

    /// The store.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The active links.
    pub fn links(&self) -> &LinkTable {
        &self.inner.links
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        self.inner
            .config
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Applies a config map (the full merged map, as the host sends it).
    pub fn apply_config(&self, map: &std::collections::HashMap<String, String>) {
        let mut config = self.inner.config.write().unwrap_or_else(|p| p.into_inner());
        let (next, problems) = Config::from_map(map, &config);
        for problem in problems {
            warn!("{problem}");
        }
        self.inner.engine.set_limits(next.limits);
        if *config != next {
            info!(config = ?next, "config applied");
        }
        *config = next;
    }

    /// Asks the serving loop to stop taking calls and finish the ones in flight.
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }

    /// Resolves once a stop was asked for.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.inner.stop.cancelled()
    }

    /// Called by the serving loop when nothing is in flight any more after a stop.
    pub fn mark_drained(&self) {
        self.inner.drained.cancel();
    }

    /// The health message: live figures a person can read in `wash get inventory`.
    pub fn health_message(&self) -> String {
        let Usage {
            namespaces,
            buckets,
            keys,
            bytes,
        } = self.inner.engine.usage();
        let config = self.config();
        let l = config.limits;
        format!(
            "{} links, {namespaces} namespaces, {buckets} buckets, {keys} keys, {bytes} bytes; \
             limits: max_key_bytes={} max_value_bytes={} max_keys={} max_total_bytes={} \
             list_page_size={} allow_unlinked={}",
            self.inner.links.len(),
            l.max_key_bytes,
            l.max_value_bytes,
            l.max_keys,
            l.max_total_bytes,
            l.list_page_size,
            config.allow_unlinked,
        )
    }

    /// The namespace a call works in, from its `source-id` and `link-name` headers.
    fn namespace(&self, cx: &Option<Context>) -> Result<Arc<str>, store::Error> {
        let headers = cx.as_ref().map(|cx| &cx.tracing);
        let source = headers.and_then(|h| h.get("source-id"));
        let link_name = headers
            .and_then(|h| h.get("link-name"))
            .map_or("default", String::as_str);
        if let Some(ns) = source.and_then(|s| self.inner.links.resolve(s, link_name)) {
            return Ok(ns);
        }
        if self.config().allow_unlinked {
            return Ok(Arc::from(source.map_or(DEFAULT_NAMESPACE, String::as_str)));
        }
        debug!(?source, link_name, "call without an active link refused");
        Err(store::Error::AccessDenied)
    }
}

impl From<EngineError> for store::Error {
    fn from(err: EngineError) -> Self {
        store::Error::Other(err.to_string())
    }
}

/// Runs `op` on `keys` keys of `bucket` in the caller's namespace, or answers
/// `access-denied`. Puts what the call touched on its span (never values), and counts limit
/// refusals.
fn in_namespace<T>(
    provider: &KvProvider,
    cx: &Option<Context>,
    bucket: &str,
    keys: usize,
    op: impl FnOnce(&Engine, &str) -> Result<T, EngineError>,
) -> anyhow::Result<Result<T, store::Error>> {
    let span = Span::current();
    span.record("keyvalue.bucket", bucket);
    span.record("keyvalue.keys", keys);
    let ns = match provider.namespace(cx) {
        Ok(ns) => ns,
        Err(denied) => return Ok(Err(denied)),
    };
    span.record("keyvalue.namespace", &*ns);
    Ok(op(&provider.inner.engine, &ns).map_err(|err| {
        if let Some(limit) = err.limit() {
            telemetry::metrics().rejection(limit);
        }
        store::Error::from(err)
    }))
}

/// Puts a byte count on the call's span.
fn record_bytes(field: &'static str, bytes: usize) {
    Span::current().record(field, bytes);
}

impl store::Handler<Option<Context>> for KvProvider {
    async fn get(
        &self,
        cx: Option<Context>,
        bucket: String,
        key: String,
    ) -> anyhow::Result<Result<Option<Bytes>, store::Error>> {
        in_namespace(self, &cx, &bucket, 1, |e, ns| {
            e.check_key_limits(&bucket, &key)?;
            let value = e.get(ns, &bucket, &key);
            record_bytes("keyvalue.bytes_out", value.as_ref().map_or(0, Bytes::len));
            Ok(value)
        })
    }

    async fn set(
        &self,
        cx: Option<Context>,
        bucket: String,
        key: String,
        value: Bytes,
    ) -> anyhow::Result<Result<(), store::Error>> {
        record_bytes("keyvalue.bytes_in", value.len());
        in_namespace(self, &cx, &bucket, 1, |e, ns| {
            e.set(ns, &bucket, &key, &value)
        })
    }

    async fn delete(
        &self,
        cx: Option<Context>,
        bucket: String,
        key: String,
    ) -> anyhow::Result<Result<(), store::Error>> {
        in_namespace(self, &cx, &bucket, 1, |e, ns| {
            e.delete(ns, &bucket, &key);
            Ok(())
        })
    }

    async fn exists(
        &self,
        cx: Option<Context>,
        bucket: String,
        key: String,
    ) -> anyhow::Result<Result<bool, store::Error>> {
        in_namespace(self, &cx, &bucket, 1, |e, ns| {
            Ok(e.exists(ns, &bucket, &key))
        })
    }

    async fn list_keys(
        &self,
        cx: Option<Context>,
        bucket: String,
        cursor: Option<u64>,
    ) -> anyhow::Result<Result<store::KeyResponse, store::Error>> {
        in_namespace(self, &cx, &bucket, 0, |e, ns| {
            let page = e.list_keys(ns, &bucket, cursor)?;
            Span::current().record("keyvalue.keys", page.keys.len());
            Ok(store::KeyResponse {
                keys: page.keys,
                cursor: page.cursor,
            })
        })
    }
}

impl atomics::Handler<Option<Context>> for KvProvider {
    async fn increment(
        &self,
        cx: Option<Context>,
        bucket: String,
        key: String,
        delta: u64,
    ) -> anyhow::Result<Result<u64, store::Error>> {
        in_namespace(self, &cx, &bucket, 1, |e, ns| {
            e.increment(ns, &bucket, &key, delta)
        })
    }
}

impl batch::Handler<Option<Context>> for KvProvider {
    async fn get_many(
        &self,
        cx: Option<Context>,
        bucket: String,
        keys: Vec<String>,
    ) -> anyhow::Result<Result<Vec<Option<(String, Bytes)>>, store::Error>> {
        in_namespace(self, &cx, &bucket, keys.len(), |e, ns| {
            let values = e.get_many(ns, &bucket, keys);
            let bytes = values.iter().flatten().map(|(_, v)| v.len()).sum();
            record_bytes("keyvalue.bytes_out", bytes);
            Ok(values)
        })
    }

    async fn set_many(
        &self,
        cx: Option<Context>,
        bucket: String,
        key_values: Vec<(String, Bytes)>,
    ) -> anyhow::Result<Result<(), store::Error>> {
        record_bytes(
            "keyvalue.bytes_in",
            key_values.iter().map(|(_, v)| v.len()).sum(),
        );
        in_namespace(self, &cx, &bucket, key_values.len(), |e, ns| {
            e.set_many(
                ns,
                &bucket,
                key_values.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
            )
        })
    }

    async fn delete_many(
        &self,
        cx: Option<Context>,
        bucket: String,
        keys: Vec<String>,
    ) -> anyhow::Result<Result<(), store::Error>> {
        in_namespace(self, &cx, &bucket, keys.len(), |e, ns| {
            e.delete_many(ns, &bucket, keys.iter().map(String::as_str));
            Ok(())
        })
    }
}

/// The control plane, called by the SDK from its NATS subscriptions.
impl Provider for KvProvider {
    async fn init(&self, init: impl ProviderInitConfig) -> anyhow::Result<()> {
        self.apply_config(init.get_config());
        info!(
            provider = init.get_provider_id(),
            "{}",
            self.health_message()
        );
        Ok(())
    }

    async fn on_config_update(&self, update: impl ProviderConfigUpdate) -> anyhow::Result<()> {
        self.apply_config(update.get_values());
        Ok(())
    }

    async fn receive_link_config_as_target(&self, link: LinkConfig<'_>) -> anyhow::Result<()> {
        let (wit_namespace, wit_package, _) = link.wit_metadata;
        // Old hosts leave the WIT fields empty; anything else must be wasi:keyvalue.
        let keyvalue = (wit_namespace.is_empty() || wit_namespace == "wasi")
            && (wit_package.is_empty() || wit_package == "keyvalue");
        anyhow::ensure!(
            keyvalue,
            "link from {} named {:?} is for {wit_namespace}:{wit_package}, not wasi:keyvalue; ignored",
            link.source_id,
            link.link_name
        );
        let namespace = link
            .config
            .get(LINK_NAMESPACE)
            .map(|ns| ns.trim())
            .filter(|ns| !ns.is_empty())
            .unwrap_or(link.source_id);
        self.inner
            .links
            .put(link.source_id, link.link_name, namespace);
        info!(
            source = link.source_id,
            link_name = link.link_name,
            namespace,
            "link added"
        );
        Ok(())
    }

    async fn delete_link_as_target(&self, link: impl LinkDeleteInfo) -> anyhow::Result<()> {
        let (source, name) = (link.get_source_id(), link.get_link_name());
        if self.inner.links.remove(source, name) {
            info!(
                source,
                link_name = name,
                "link removed; its namespace's data stays"
            );
        }
        Ok(())
    }

    async fn health_request(&self, _: &HealthCheckRequest) -> anyhow::Result<HealthCheckResponse> {
        // Never `Err`: the SDK stops its control loop on an error here.
        Ok(HealthCheckResponse {
            healthy: true,
            message: Some(self.health_message()),
        })
    }

    /// The host asked us to stop: stop taking calls and let in-flight ones finish before the
    /// SDK replies to the host.
    async fn shutdown(&self) -> anyhow::Result<()> {
        info!("shutdown requested by the host");
        self.stop();
        if tokio::time::timeout(DRAIN_WAIT, self.inner.drained.cancelled())
            .await
            .is_err()
        {
            warn!("in-flight calls did not finish within {DRAIN_WAIT:?}");
        }
        // Before the SDK answers the request: the 1.x host kills the process as soon as the
        // answer arrives (it drops the child, spawned with kill_on_drop).
        self.write_final_snapshot().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cx(source: Option<&str>, link: Option<&str>) -> Option<Context> {
        let mut tracing = HashMap::new();
        if let Some(s) = source {
            tracing.insert("source-id".to_string(), s.to_string());
        }
        if let Some(l) = link {
            tracing.insert("link-name".to_string(), l.to_string());
        }
        Some(Context {
            component: source.map(str::to_string),
            tracing,
        })
    }

    #[test]
    fn namespace_comes_from_the_link_or_is_denied() {
        let p = KvProvider::default();
        p.links().put("c1", "default", "shared");
        assert_eq!(
            p.namespace(&cx(Some("c1"), None)).unwrap().as_ref(),
            "shared"
        );
        assert_eq!(
            p.namespace(&cx(Some("c1"), Some("default")))
                .unwrap()
                .as_ref(),
            "shared"
        );
        assert!(matches!(
            p.namespace(&cx(Some("c1"), Some("other"))),
            Err(store::Error::AccessDenied)
        ));
        assert!(matches!(
            p.namespace(&cx(Some("c2"), None)),
            Err(store::Error::AccessDenied)
        ));
        assert!(matches!(
            p.namespace(&None),
            Err(store::Error::AccessDenied)
        ));
        p.apply_config(&HashMap::from([(
            "allow_unlinked".to_string(),
            "true".to_string(),
        )]));
        assert_eq!(p.namespace(&cx(Some("c2"), None)).unwrap().as_ref(), "c2");
        assert_eq!(p.namespace(&None).unwrap().as_ref(), DEFAULT_NAMESPACE);
        assert_eq!(
            p.namespace(&cx(Some("c1"), None)).unwrap().as_ref(),
            "shared"
        );
    }

    #[test]
    fn config_updates_reach_the_engine() {
        let p = KvProvider::default();
        p.apply_config(&HashMap::from([("max_keys".to_string(), "1".to_string())]));
        assert_eq!(p.engine().limits().max_keys, 1);
        p.engine().set("n", "b", "a", b"").unwrap();
        assert!(p.engine().set("n", "b", "b", b"").is_err());
        assert!(p.health_message().contains("1 keys"));
    }
}
