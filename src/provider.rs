//! The provider: the SDK's control-plane callbacks and the generated wRPC handler traits, on
//! one struct that owns the engine (which holds the limits in force), the link table, the
//! serving settings and the stop.
//!
//! Handlers answer `anyhow::Result<Result<T, store::Error>>`: the outer error means the call
//! itself failed (the caller sees a transport error), the inner one is the answer the
//! component receives. Engine errors become `store::Error::Other` in one place,
//! [`From<EngineError>`](#impl-From<EngineError>-for-Error).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyvalue_store::{AnswerRefused, Cursor, Engine, EngineError, Usage, ANSWER_ELEMENT_BYTES};
use tracing::{debug, info, warn, Span};
use wasmcloud_provider_sdk::{
    Context, HealthCheckRequest, HealthCheckResponse, LinkConfig, LinkDeleteInfo, Provider,
    ProviderConfigUpdate, ProviderInitConfig,
};

use crate::bindings::exports::wrpc::keyvalue::{atomics, batch, store};
use crate::budget::{self, Budget};
use crate::config::{self, Config, Serving, Snapshots};
use crate::links::{Link, LinkTable};
use crate::replica::Replica;
use crate::shutdown::Shutdown;
use crate::snapshots::Snapshotter;
use crate::telemetry;
use crate::watch::delivery::Outbound;
use crate::watch::Watchers;

/// Buckets with more keys than this are copied and sorted for a listing on a blocking thread,
/// not on an async worker.
const SORT_ON_BLOCKING_THREAD: usize = 4096;

/// The in-memory key-value provider. Cheap to clone: clones share one store.
#[derive(Clone)]
pub struct KvProvider {
    inner: Arc<Inner>,
}

struct Inner {
    /// The store; it owns the limits in force.
    engine: Arc<Engine>,
    /// What calls in flight hold.
    budget: Arc<Budget>,
    links: LinkTable,
    // Read on every call for `allow_unlinked` and the request bounds; written on config updates.
    serving: RwLock<Serving>,
    /// Writes the snapshots, when they are on.
    snapshots: Option<Arc<Snapshotter>>,
    shutdown: Shutdown,
    /// Held across a link change and the eviction and watch settings it implies, so that two
    /// changes to one namespace at once cannot leave eviction on that its links no longer all
    /// ask for, or a namespace watched that no watcher observes.
    link_changes: std::sync::Mutex<()>,
    /// Components told of the changes in their namespace.
    watchers: Watchers,
    /// The replicated store, with `replication = "jetstream"`: set once at the start.
    replica: std::sync::OnceLock<Replica>,
}

impl Default for KvProvider {
    fn default() -> Self {
        Self::new(Config::default(), None)
    }
}

impl KvProvider {
    /// A provider with an empty store and `config`, snapshotting as `snapshots` says.
    pub fn new(config: Config, snapshots: Option<Snapshots>) -> Self {
        let engine = Arc::new(Engine::new(config.limits));
        let watchers = Watchers::default();
        engine.set_observer(watchers.observer());
        let snapshots = snapshots.map(|settings| Snapshotter::new(Arc::clone(&engine), settings));
        let serving = config.serving;
        Self {
            inner: Arc::new(Inner {
                engine,
                budget: Budget::new(serving.max_inflight_bytes, serving.max_concurrent_calls),
                links: LinkTable::default(),
                serving: RwLock::new(serving),
                shutdown: Shutdown::new(snapshots.clone()),
                link_changes: std::sync::Mutex::new(()),
                watchers,
                snapshots,
                replica: std::sync::OnceLock::new(),
            }),
        }
    }

    /// What writes the snapshots, when they are on.
    pub fn snapshots(&self) -> Option<&Arc<Snapshotter>> {
        self.inner.snapshots.as_ref()
    }

    /// The provider's stop: asked for, drained, finished with the final snapshot.
    pub fn shutdown_handle(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    /// The store.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// What calls in flight hold.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.inner.budget
    }

    /// The active links.
    pub fn links(&self) -> &LinkTable {
        &self.inner.links
    }

    /// Serves as one store with the other instances through `replica` from now on (at the
    /// start, before calls are taken).
    pub fn replicate(&self, replica: Replica) {
        // A reload empties the store, namespace flags included: mark the watched ones again.
        let provider = Arc::downgrade(&self.inner);
        replica.after_reload(move || {
            if let Some(inner) = provider.upgrade() {
                let provider = KvProvider { inner };
                let _one_change =
                    (provider.inner.link_changes.lock()).unwrap_or_else(|p| p.into_inner());
                provider.rewatch();
            }
        });
        let _ = self.inner.replica.set(replica);
    }

    /// The replicated store, when replication is on.
    pub fn replica(&self) -> Option<&Replica> {
        self.inner.replica.get()
    }

    /// With linearizable replicated reads: waits until this instance applied every write
    /// acknowledged before, on any instance.
    async fn read_barrier(&self) -> Result<(), store::Error> {
        match self.replica() {
            Some(replica) => replica.read_barrier().await.map_err(store::Error::Other),
            None => Ok(()),
        }
    }

    /// The watchers.
    pub fn watchers(&self) -> &Watchers {
        &self.inner.watchers
    }

    /// Where watch events go: called once the provider is connected to the lattice.
    pub fn connect_watchers(&self, outbound: Outbound) {
        self.inner.watchers.connect(outbound);
    }

    /// Works out again which namespace each watcher observes (after a change of links or of
    /// `allow_unlinked`), and marks the namespaces watched in the store. Call with
    /// `link_changes` held.
    fn rewatch(&self) {
        let allow_unlinked = self.serving().allow_unlinked;
        let links = &self.inner.links;
        let (now, gone) = self.inner.watchers.resolve(|component, link_name| {
            match links.resolve(component, link_name) {
                Some(link) => Some(link.namespace.clone()),
                None => allow_unlinked.then(|| config::unlinked_namespace(Some(component))),
            }
        });
        for ns in gone {
            self.inner.engine.set_watched(&ns, false);
        }
        for ns in now {
            self.inner.engine.set_watched(&ns, true);
        }
    }

    /// The serving settings in force.
    pub fn serving(&self) -> Serving {
        *self
            .inner
            .serving
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Applies a config map (the full merged map, as the host sends it).
    pub fn apply_config(&self, map: &std::collections::HashMap<String, String>) {
        let mut serving = self
            .inner
            .serving
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let current = Config {
            limits: self.inner.engine.limits(),
            serving: *serving,
        };
        let (next, problems) = Config::from_map(map, &current);
        for problem in problems {
            warn!("{problem}");
        }
        self.inner.engine.set_limits(next.limits);
        (self.inner.budget).set_limits(
            next.serving.max_inflight_bytes,
            next.serving.max_concurrent_calls,
        );
        if current != next {
            info!(config = ?next, "config applied");
        }
        let unlinked_changed = serving.allow_unlinked != next.serving.allow_unlinked;
        *serving = next.serving;
        drop(serving);
        if unlinked_changed {
            // Watchers without a store link observe their component's own namespace only
            // while unlinked calls are served.
            let _one_change = (self.inner.link_changes.lock()).unwrap_or_else(|p| p.into_inner());
            self.rewatch();
        }
    }

    /// The health message: live figures a person can read in `wash get inventory`.
    pub fn health_message(&self) -> String {
        let Usage {
            namespaces,
            buckets,
            keys,
            bytes,
            expired,
            evicted,
        } = self.inner.engine.usage();
        let l = self.inner.engine.limits();
        let watch = self.inner.watchers.totals();
        format!(
            "{} links, {} watchers, {namespaces} namespaces, {buckets} buckets, {keys} keys, \
             {bytes} bytes, {expired} expired, {evicted} evicted; \
             watch events: {} delivered, {} dropped, {} failed, {} queued; \
             replication: {}; limits: max_key_bytes={} max_value_bytes={} max_keys={} max_total_bytes={} \
             list_page_size={} allow_unlinked={}; transport: {}",
            self.inner.links.len(),
            watch.watchers,
            watch.delivered,
            watch.dropped,
            watch.failed,
            watch.queued,
            self.replica().map_or_else(|| "none".to_owned(), Replica::figures),
            l.max_key_bytes,
            l.max_value_bytes,
            l.max_keys,
            l.max_total_bytes,
            l.list_page_size,
            self.serving().allow_unlinked,
            crate::transport::stats().figures(),
        )
    }

    /// Turns eviction in `namespace` on or off as its links now say (see
    /// [`LinkTable::evicts`]).
    fn update_eviction(&self, namespace: &str) {
        let evicts = self.inner.links.evicts(namespace);
        if evicts != self.inner.engine.evicts(namespace) {
            info!(namespace, evicts, "eviction changed");
        }
        self.inner.engine.set_eviction(namespace, evicts);
    }

    /// Whose share of the in-flight budget a call uses: its `source-id` when a link admits it
    /// (the host vouches for that header), one share for every unlinked caller (with
    /// `allow_unlinked`), or `access-denied` before anything of the call is read: an unlinked
    /// caller cannot take budget by naming a new source on each call.
    pub fn budget_share(&self, cx: &Option<Context>) -> Result<String, store::Error> {
        let (source, link_name) = caller(cx);
        match source {
            Some(source) if self.inner.links.resolve(source, link_name).is_some() => {
                Ok(source.to_owned())
            }
            _ if self.serving().allow_unlinked => Ok(String::new()),
            _ => Err(store::Error::AccessDenied),
        }
    }

    /// The namespace a call works in, from its `source-id` and `link-name` headers, and the
    /// link that admits it (none for an unlinked call).
    fn namespace(
        &self,
        cx: &Option<Context>,
    ) -> Result<(Arc<str>, Option<Arc<Link>>), store::Error> {
        let (source, link_name) = caller(cx);
        if let Some(link) = source.and_then(|s| self.inner.links.resolve(s, link_name)) {
            return Ok((link.namespace.clone(), Some(link)));
        }
        if self.serving().allow_unlinked {
            return Ok((config::unlinked_namespace(source), None));
        }
        debug!(?source, link_name, "call without an active link refused");
        Err(store::Error::AccessDenied)
    }
}

/// The calling component (`source-id` header) and its link name (`link-name`, `default` when
/// absent), as the host sends them on each invocation.
fn caller(cx: &Option<Context>) -> (Option<&str>, &str) {
    // The SDK's `Context` keeps every header of the invocation in its field `tracing`, the
    // host's `source-id` and `link-name` as well as the W3C trace headers.
    let headers = cx.as_ref().map(|cx| &cx.tracing);
    let source = headers.and_then(|h| h.get("source-id")).map(String::as_str);
    let link_name = headers
        .and_then(|h| h.get("link-name"))
        .map_or("default", String::as_str);
    (source, link_name)
}

/// Whether a link's WIT metadata names `wasi:keyvalue`. Old hosts leave the fields empty.
fn is_keyvalue(wit_namespace: &str, wit_package: &str) -> bool {
    (wit_namespace.is_empty() || wit_namespace == "wasi")
        && (wit_package.is_empty() || wit_package == "keyvalue")
}

impl From<EngineError> for store::Error {
    fn from(err: EngineError) -> Self {
        store::Error::Other(err.to_string())
    }
}

/// Why a call was refused: by the engine, or by a bound on what one call may hold.
#[derive(Debug)]
enum Refused {
    Engine(EngineError),
    /// A serving bound: its config key and the caller's message.
    Bound(&'static str, String),
}

impl From<EngineError> for Refused {
    fn from(err: EngineError) -> Self {
        Refused::Engine(err)
    }
}

/// Room for one answer: at most `max_response_bytes`, taken from the call's in-flight budget
/// as it grows, asked by the engine before it copies each value or key.
struct AnswerRoom {
    limit: usize,
    used: usize,
    busy: Option<budget::Refusal>,
}

impl AnswerRoom {
    fn new(serving: &Serving) -> Self {
        Self {
            limit: serving.max_response_bytes,
            used: 0,
            busy: None,
        }
    }

    fn take(&mut self, n: usize) -> bool {
        if self.used.saturating_add(n) > self.limit {
            return false;
        }
        if let Err(refusal) = budget::take_for_answer(n) {
            self.busy = Some(refusal);
            return false;
        }
        self.used += n;
        true
    }

    /// Why `what` was refused.
    fn refused(self, what: &str, refused: AnswerRefused) -> Refused {
        match self.busy {
            Some(busy) => Refused::Bound(busy.limit(), busy.to_string()),
            None => Refused::Bound(
                config::MAX_RESPONSE_BYTES,
                format!(
                    "{what} would answer {} bytes, over max_response_bytes={}: ask for less at once",
                    refused.asked, self.limit
                ),
            ),
        }
    }
}

/// Runs `op` on `keys` keys of `bucket` in the caller's namespace, with the TTL its link gives
/// keys written to `bucket`, or answers `access-denied`. Puts what the call touched on its
/// span (never values), and counts limit refusals.
fn in_namespace<T>(
    provider: &KvProvider,
    cx: &Option<Context>,
    bucket: &str,
    keys: usize,
    op: impl FnOnce(&Engine, &str, Option<Duration>) -> Result<T, Refused>,
) -> anyhow::Result<Result<T, store::Error>> {
    let span = Span::current();
    span.record("keyvalue.bucket", bucket);
    span.record("keyvalue.keys", keys);
    let (ns, link) = match provider.namespace(cx) {
        Ok(found) => found,
        Err(denied) => return Ok(Err(denied)),
    };
    span.record("keyvalue.namespace", &*ns);
    let ttl = link.and_then(|link| link.policy.ttl(bucket));
    Ok(
        op(&provider.inner.engine, &ns, ttl).map_err(|refused| match refused {
            Refused::Engine(err) => {
                if let Some(limit) = err.limit() {
                    telemetry::metrics().rejection(limit);
                }
                store::Error::from(err)
            }
            Refused::Bound(limit, message) => {
                telemetry::metrics().rejection(limit);
                store::Error::Other(message)
            }
        }),
    )
}

/// A write with replication on: `check` runs as `in_namespace`'s op does (against what this
/// instance has applied) and hands its result to `write`, which replicates it.
async fn replicated<P, T, F>(
    provider: &KvProvider,
    cx: &Option<Context>,
    bucket: &str,
    keys: usize,
    (check, grows): (
        impl FnOnce(&Engine, &str, Option<Duration>) -> Result<P, Refused>,
        bool,
    ),
    write: impl FnOnce(Arc<str>, P, Instant) -> F,
) -> anyhow::Result<Result<T, store::Error>>
where
    F: std::future::Future<Output = Result<T, store::Error>>,
{
    let Some(replica) = provider.replica() else {
        anyhow::bail!("a replicated write without replication");
    };
    // One deadline for the whole call, catching up included.
    let until = replica.call_deadline();
    // Near a limit, a write that grows the store must be checked against every write
    // acknowledged before it, wherever.
    let near = || in_namespace(provider, cx, bucket, keys, |e, ns, _| Ok(e.near_limits(ns)));
    if grows && matches!(near()?, Ok(true)) {
        if let Err(unavailable) = replica.catch_up(until).await {
            return Ok(Err(store::Error::Other(unavailable)));
        }
    }
    let checked = in_namespace(provider, cx, bucket, keys, |e, ns, ttl| {
        Ok((Arc::<str>::from(ns), check(e, ns, ttl)?))
    })?;
    Ok(match checked {
        Ok((ns, checked)) => write(ns, checked, until).await,
        Err(err) => Err(err),
    })
}

/// What a list-keys call found in this instance.
enum Listed {
    Page(keyvalue_store::KeyPage),
    /// A first page of a large bucket, to sort on a blocking thread.
    Sort(Arc<str>),
    /// A cursor this instance does not know: replicated, another may.
    Elsewhere(Arc<str>),
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
        if let Err(err) = self.read_barrier().await {
            return Ok(Err(err));
        }
        let mut room = AnswerRoom::new(&self.serving());
        in_namespace(self, &cx, &bucket, 1, |e, ns, _| {
            e.check_key_limits(&bucket, &key)?;
            let value = e
                .get_within(ns, &bucket, &key, |n| room.take(n))
                .map_err(|refused| room.refused("get", refused))?;
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
        if let Some(replica) = self.replica() {
            let check = |e: &Engine, ns: &str, ttl| {
                e.admits(ns, &bucket, [(key.as_str(), &value[..])])?;
                Ok(e.deadline_unix_ms(ttl))
            };
            let write = |ns: Arc<str>, deadline, until| {
                let (bucket, key, value) = (&bucket, &key, &value);
                async move {
                    let names = (&*ns, bucket.as_str(), key.as_str());
                    let written = replica.set(names, value, deadline, until).await;
                    written.map_err(store::Error::Other)
                }
            };
            return replicated(self, &cx, &bucket, 1, (check, true), write).await;
        }
        in_namespace(self, &cx, &bucket, 1, |e, ns, ttl| {
            Ok(e.set_expiring(ns, &bucket, &key, &value, ttl)?)
        })
    }

    async fn delete(
        &self,
        cx: Option<Context>,
        bucket: String,
        key: String,
    ) -> anyhow::Result<Result<(), store::Error>> {
        if let Some(replica) = self.replica() {
            // As with one instance, a key that cannot exist is deleted as a no-op.
            let check = |_: &Engine, _: &str, _| Ok(());
            let write = |ns: Arc<str>, (), until| {
                let (bucket, key) = (&bucket, &key);
                async move {
                    let names = (&*ns, bucket.as_str());
                    let deleted = replica.delete_many(names, &[key.as_str()], until).await;
                    deleted.map_err(store::Error::Other)
                }
            };
            return replicated(self, &cx, &bucket, 1, (check, false), write).await;
        }
        in_namespace(self, &cx, &bucket, 1, |e, ns, _| {
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
        if let Err(err) = self.read_barrier().await {
            return Ok(Err(err));
        }
        in_namespace(self, &cx, &bucket, 1, |e, ns, _| {
            Ok(e.exists(ns, &bucket, &key))
        })
    }

    async fn list_keys(
        &self,
        cx: Option<Context>,
        bucket: String,
        cursor: Option<u64>,
    ) -> anyhow::Result<Result<store::KeyResponse, store::Error>> {
        if let Err(err) = self.read_barrier().await {
            return Ok(Err(err));
        }
        let max_bytes = self.serving().max_response_bytes;
        let replicated = self.replica().is_some();
        let listed = in_namespace(self, &cx, &bucket, 0, |e, ns, _| {
            // A first page of a large bucket copies and sorts its keys: that runs on a blocking
            // thread, not on an async worker.
            if cursor.is_none() && e.bucket_len(ns, &bucket) > SORT_ON_BLOCKING_THREAD {
                return Ok(Listed::Sort(Arc::<str>::from(ns)));
            }
            match e.list_keys_within(ns, &bucket, cursor.map(Cursor::from), max_bytes) {
                // Replicated, another instance may hold the listing.
                Err(EngineError::UnknownCursor(_)) if replicated => {
                    Ok(Listed::Elsewhere(Arc::<str>::from(ns)))
                }
                page => Ok(Listed::Page(page?)),
            }
        })?;
        let page = match listed {
            Ok(Listed::Page(page)) => Ok(page),
            Ok(Listed::Sort(ns)) => {
                let (provider, bucket) = (self.clone(), bucket.clone());
                tokio::task::spawn_blocking(move || {
                    let engine = provider.engine();
                    engine.list_keys_within(&ns, &bucket, None, max_bytes)
                })
                .await?
                .map_err(|err| {
                    if let Some(limit) = err.limit() {
                        telemetry::metrics().rejection(limit);
                    }
                    store::Error::from(err)
                })
            }
            Ok(Listed::Elsewhere(ns)) => {
                let (replica, cursor) = (self.replica(), cursor.unwrap_or_default());
                let asked = match replica {
                    Some(replica) => {
                        replica
                            .page_elsewhere(&ns, &bucket, cursor, max_bytes)
                            .await
                    }
                    None => None,
                };
                match asked {
                    Some(page) => page.map_err(store::Error::Other),
                    None => Err(store::Error::from(EngineError::UnknownCursor(
                        Cursor::from(cursor),
                    ))),
                }
            }
            Err(err) => Err(err),
        };
        let page = page.and_then(|page| {
            let size: usize = page.keys.iter().map(String::len).sum();
            // The page is already bounded by max_response_bytes; it counts in flight too.
            let answer = size + page.keys.len() * ANSWER_ELEMENT_BYTES;
            budget::take_for_answer(answer).map_err(|busy| {
                telemetry::metrics().rejection(busy.limit());
                store::Error::Other(busy.to_string())
            })?;
            Span::current().record("keyvalue.keys", page.keys.len());
            record_bytes("keyvalue.bytes_out", size);
            Ok(store::KeyResponse {
                keys: page.keys,
                cursor: page.cursor.map(u64::from),
            })
        });
        Ok(page)
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
        if let Some(replica) = self.replica() {
            let check = |e: &Engine, _: &str, ttl| {
                e.check_key_limits(&bucket, &key)?;
                Ok(e.deadline_unix_ms(ttl))
            };
            let write = |ns: Arc<str>, deadline, until| {
                let (bucket, key) = (&bucket, &key);
                async move {
                    let names = (&*ns, bucket.as_str(), key.as_str());
                    replica.increment(names, delta, deadline, until).await
                }
            };
            return replicated(self, &cx, &bucket, 1, (check, true), write).await;
        }
        in_namespace(self, &cx, &bucket, 1, |e, ns, ttl| {
            Ok(e.increment_expiring(ns, &bucket, &key, delta, ttl)?)
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
        if let Err(err) = self.read_barrier().await {
            return Ok(Err(err));
        }
        let mut room = AnswerRoom::new(&self.serving());
        in_namespace(self, &cx, &bucket, keys.len(), |e, ns, _| {
            let values = e
                .get_many_within(ns, &bucket, keys, |n| room.take(n))
                .map_err(|refused| room.refused("get-many", refused))?;
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
        if let Some(replica) = self.replica() {
            let check = |e: &Engine, ns: &str, ttl| {
                let pairs = key_values.iter().map(|(k, v)| (k.as_str(), v.as_ref()));
                e.admits(ns, &bucket, pairs)?;
                Ok(e.deadline_unix_ms(ttl))
            };
            let write = |ns: Arc<str>, deadline, until| {
                let (bucket, key_values) = (&bucket, &key_values);
                async move {
                    let names = (&*ns, bucket.as_str());
                    let written = replica.set_many(names, key_values, deadline, until).await;
                    written.map_err(store::Error::Other)
                }
            };
            let (keys, check) = (key_values.len(), (check, true));
            return replicated(self, &cx, &bucket, keys, check, write).await;
        }
        in_namespace(self, &cx, &bucket, key_values.len(), |e, ns, ttl| {
            Ok(e.set_many_expiring(
                ns,
                &bucket,
                key_values.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
                ttl,
            )?)
        })
    }

    async fn delete_many(
        &self,
        cx: Option<Context>,
        bucket: String,
        keys: Vec<String>,
    ) -> anyhow::Result<Result<(), store::Error>> {
        if let Some(replica) = self.replica() {
            let check = |_: &Engine, _: &str, _| Ok(());
            let write = |ns: Arc<str>, (), until| {
                let (bucket, keys) = (&bucket, &keys);
                async move {
                    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                    let deleted = replica
                        .delete_many((&*ns, bucket.as_str()), &keys, until)
                        .await;
                    deleted.map_err(store::Error::Other)
                }
            };
            return replicated(self, &cx, &bucket, keys.len(), (check, false), write).await;
        }
        in_namespace(self, &cx, &bucket, keys.len(), |e, ns, _| {
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
        anyhow::ensure!(
            is_keyvalue(wit_namespace, wit_package),
            "link from {} named {:?} is for {wit_namespace}:{wit_package}, not wasi:keyvalue; ignored",
            link.source_id,
            link.link_name
        );
        let namespace = config::link_namespace(link.config, link.source_id);
        let (policy, problems) = config::LinkPolicy::from_link_config(link.config);
        for problem in problems {
            warn!(
                source = link.source_id,
                link_name = link.link_name,
                "link {problem}"
            );
        }
        // Each instance would evict on its own what the others keep: the copies would part.
        anyhow::ensure!(
            !(policy.evicts && self.replica().is_some()),
            "link from {} named {:?} asks for eviction, which replication = jetstream cannot \
             keep alike on every instance; link refused (drop `eviction`, or bound the data \
             with ttl_secs)",
            link.source_id,
            link.link_name
        );
        info!(
            source = link.source_id,
            link_name = link.link_name,
            namespace = &*namespace,
            ttl_secs = policy.ttl.map(|ttl| ttl.as_secs()),
            bucket_ttls = policy.bucket_ttls.len(),
            eviction = policy.evicts,
            "link added"
        );
        let entry = Link {
            namespace: namespace.clone(),
            policy,
        };
        let _one_change = (self.inner.link_changes.lock()).unwrap_or_else(|p| p.into_inner());
        let replaced = (self.inner.links).put_link(link.source_id, link.link_name, entry);
        self.update_eviction(&namespace);
        if let Some(old) = replaced.filter(|old| old.namespace != namespace) {
            self.update_eviction(&old.namespace);
        }
        self.rewatch();
        Ok(())
    }

    /// A link from us to a component that exports `wasi:keyvalue/watcher`: tell it of the
    /// changes its link config asks for, in the namespace its own store link of the same name
    /// uses.
    async fn receive_link_config_as_source(&self, link: LinkConfig<'_>) -> anyhow::Result<()> {
        let (wit_namespace, wit_package, interfaces) = link.wit_metadata;
        let watcher = is_keyvalue(wit_namespace, wit_package)
            && (interfaces.is_empty() || interfaces.iter().any(|i| i == "watcher"));
        anyhow::ensure!(
            watcher,
            "link to {} named {:?} is for {wit_namespace}:{wit_package}/{interfaces:?}, not \
             wasi:keyvalue/watcher; ignored",
            link.target_id,
            link.link_name
        );
        let (settings, problems) = config::WatchSettings::from_link_config(link.config);
        for problem in problems {
            warn!(
                target_component = link.target_id,
                link_name = link.link_name,
                "watch link {problem}"
            );
        }
        if settings.rules.is_empty() {
            warn!(
                target_component = link.target_id,
                link_name = link.link_name,
                "watch link without rules: set {}=SET@key,DEL@key,SET@prefix* to be told of \
                 changes",
                config::LINK_WATCH
            );
        }
        info!(
            target_component = link.target_id,
            link_name = link.link_name,
            rules = settings.rules.len(),
            max_events = settings.bounds.max_events,
            max_bytes = settings.bounds.max_bytes,
            timeout_ms = settings.bounds.timeout.as_millis() as u64,
            "watch link added"
        );
        let replaced = {
            let _one_change = (self.inner.link_changes.lock()).unwrap_or_else(|p| p.into_inner());
            let replaced = (self.inner.watchers).put(link.target_id, link.link_name, settings);
            self.rewatch();
            replaced
        };
        if let Some(old) = replaced {
            old.halt().await;
        }
        Ok(())
    }

    async fn delete_link_as_source(&self, link: impl LinkDeleteInfo) -> anyhow::Result<()> {
        let (target, name) = (link.get_target_id(), link.get_link_name());
        let removed = {
            let _one_change = (self.inner.link_changes.lock()).unwrap_or_else(|p| p.into_inner());
            let removed = self.inner.watchers.remove(target, name);
            if removed.is_some() {
                self.rewatch();
            }
            removed
        };
        // Out of the store's way already; once halted, no call to it starts any more.
        if let Some(watcher) = removed {
            watcher.halt().await;
            info!(
                target_component = target,
                link_name = name,
                "watch link removed"
            );
        }
        Ok(())
    }

    async fn delete_link_as_target(&self, link: impl LinkDeleteInfo) -> anyhow::Result<()> {
        let (source, name) = (link.get_source_id(), link.get_link_name());
        let _one_change = (self.inner.link_changes.lock()).unwrap_or_else(|p| p.into_inner());
        if let Some(removed) = self.inner.links.remove(source, name) {
            self.update_eviction(&removed.namespace);
            self.rewatch();
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

    /// The host asked us to stop: see [`Shutdown::host_request`].
    async fn shutdown(&self) -> anyhow::Result<()> {
        self.inner.shutdown.host_request().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::links;
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
            p.namespace(&cx(Some("c1"), None)).unwrap().0.as_ref(),
            "shared"
        );
        assert_eq!(
            p.namespace(&cx(Some("c1"), Some("default")))
                .unwrap()
                .0
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
        assert_eq!(
            p.namespace(&cx(Some("c2"), None)).unwrap().0.as_ref(),
            "component:c2"
        );
        assert_eq!(
            p.namespace(&None).unwrap().0.as_ref(),
            links::ANONYMOUS_NAMESPACE
        );
        assert_eq!(
            p.namespace(&cx(Some("c1"), None)).unwrap().0.as_ref(),
            "shared"
        );
    }

    /// Tests and tools read the watch figures out of health with `Totals::read`.
    #[test]
    fn health_carries_the_watch_figures_totals_reads() {
        let p = KvProvider::default();
        let health = p.health_message();
        assert_eq!(
            crate::watch::Totals::read(&health),
            Some(p.watchers().totals()),
            "{health}"
        );
        let message = "1 links, 2 watchers, 3 namespaces; \
                       watch events: 4 delivered, 5 dropped, 6 failed, 7 queued; limits: x";
        let read = crate::watch::Totals::read(message).unwrap();
        assert_eq!(
            (
                read.watchers,
                read.delivered,
                read.dropped,
                read.failed,
                read.queued
            ),
            (2, 4, 5, 6, 7)
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
