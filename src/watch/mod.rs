//! Watching: components told of the changes in their namespace, through
//! `wrpc:keyvalue/watcher@0.2.0-draft.on-set|on-delete`.
//!
//! A component that exports `wasi:keyvalue/watcher` is linked *from* this provider (a link
//! whose source is us and target the component); the link's config says which changes it
//! wants ([`rules`]) and how much may wait for it ([`config::WatchSettings`]). It observes the
//! namespace its own store link of the same name resolves to, as its calls would: a component
//! only ever hears of data it could read. The store reports every change of a watched
//! namespace to [`Watchers`] under the entry's lock (`keyvalue_store::Observer`); matching
//! changes go, without waiting, into the watcher's bounded queue, which [`delivery`] drains.
//!
//! Link changes (watch links, store links, `allow_unlinked`) re-resolve which namespace each
//! watcher observes ([`Watchers::resolve`]); the provider then marks the namespaces watched in
//! the store. Deleting a watch link stops its delivery at once: no event is taken from its
//! queue after that, and its queue is dropped.

pub mod delivery;
pub mod rules;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use keyvalue_store::{Change, Observer, What};
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::WatchSettings;
use delivery::{Event, Outbound, Queue, Stats, Target};
use rules::{Event as Kind, Rules};

/// One watch link's watcher.
pub struct Watcher {
    target: Target,
    rules: Rules,
    queue: Arc<Queue>,
    stop: CancellationToken,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What all watchers came to: for health and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub watchers: usize,
    pub delivered: u64,
    pub dropped: u64,
    pub failed: u64,
    pub queued: usize,
}

/// The active watch links and the namespaces they observe.
pub struct Watchers {
    shared: Arc<Shared>,
}

struct Shared {
    /// Watch links: (component, link name) → its watcher. A std lock: never held across an
    /// await.
    links: Mutex<HashMap<(String, String), Arc<Watcher>>>,
    /// Namespace → the watchers observing it: read by the store on every change of a watched
    /// namespace (under an entry's lock), written on link changes.
    observing: RwLock<HashMap<Arc<str>, Vec<Arc<Watcher>>>>,
    outbound: tokio::sync::watch::Sender<Option<Outbound>>,
    /// What the events of every watcher so far came to.
    all: Arc<Stats>,
}

impl Default for Watchers {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                links: Mutex::default(),
                observing: RwLock::default(),
                outbound: tokio::sync::watch::Sender::new(None),
                all: Arc::default(),
            }),
        }
    }
}

impl Watchers {
    /// The observer to give the store.
    pub fn observer(&self) -> Arc<dyn Observer> {
        Arc::clone(&self.shared) as Arc<dyn Observer>
    }

    /// Where calls go, once the provider is connected; events wait in their queues till then.
    pub fn connect(&self, outbound: Outbound) {
        self.shared.outbound.send_replace(Some(outbound));
    }

    /// Starts delivering to `component` through the watch link `link_name`, replacing any
    /// watcher that link had. Call [`Watchers::resolve`] after.
    pub fn put(&self, component: &str, link_name: &str, settings: WatchSettings) {
        let stop = CancellationToken::new();
        let target = Target {
            component: component.to_owned(),
            link_name: link_name.to_owned(),
        };
        let queue = delivery::start(
            target.clone(),
            settings.bounds,
            self.shared.outbound.subscribe(),
            stop.clone(),
            Arc::clone(&self.shared.all),
        );
        let watcher = Arc::new(Watcher {
            target,
            rules: settings.rules,
            queue,
            stop,
        });
        let key = (component.to_owned(), link_name.to_owned());
        let old = self.links().insert(key, watcher);
        if let Some(old) = old {
            old.stop.cancel();
        }
    }

    /// Stops delivering through the watch link; answers whether it was known. Call
    /// [`Watchers::resolve`] after (the watcher is out of the store's way only then; it already
    /// delivers nothing more).
    pub fn remove(&self, component: &str, link_name: &str) -> bool {
        let key = (component.to_owned(), link_name.to_owned());
        let removed = self.links().remove(&key);
        if let Some(watcher) = &removed {
            watcher.stop.cancel();
        }
        removed.is_some()
    }

    /// Works out again which namespace each watcher observes, with `namespace_of(component,
    /// link_name)` (the namespace that component's calls over that link name use, if any), and
    /// answers the namespaces watched now and those no longer watched.
    pub fn resolve(
        &self,
        namespace_of: impl Fn(&str, &str) -> Option<Arc<str>>,
    ) -> (HashSet<Arc<str>>, HashSet<Arc<str>>) {
        let links = self.links();
        let mut observing: HashMap<Arc<str>, Vec<Arc<Watcher>>> = HashMap::new();
        for watcher in links.values() {
            let target = &watcher.target;
            if let Some(ns) = namespace_of(&target.component, &target.link_name) {
                observing.entry(ns).or_default().push(Arc::clone(watcher));
            }
        }
        let now: HashSet<Arc<str>> = observing.keys().cloned().collect();
        let mut current = (self.shared.observing.write()).unwrap_or_else(|p| p.into_inner());
        let gone = current
            .keys()
            .filter(|ns| !now.contains(*ns))
            .cloned()
            .collect();
        *current = observing;
        (now, gone)
    }

    /// Figures across all watchers: the events of every watcher so far (deleted ones
    /// included), and what the active ones have queued.
    pub fn totals(&self) -> Totals {
        let links = self.links();
        let (delivered, dropped, failed) = self.shared.all.read();
        Totals {
            watchers: links.len(),
            delivered,
            dropped,
            failed,
            queued: links.values().map(|w| w.queue.len()).sum(),
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Watcher>>> {
        self.shared.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Observer for Shared {
    /// On the write path, under the entry's lock: match, copy, queue; never wait.
    fn changed(&self, change: Change<'_>) {
        let observing = self.observing.read().unwrap_or_else(|p| p.into_inner());
        let Some(watchers) = observing.get(change.namespace) else {
            return;
        };
        let (kind, value) = match change.what {
            What::Set(value) => (Kind::Set, Some(value)),
            What::Deleted | What::Expired | What::Evicted => (Kind::Delete, None),
        };
        let mut made: Option<(Arc<str>, opentelemetry::Context)> = None;
        for watcher in watchers {
            if watcher.stop.is_cancelled()
                || !watcher.rules.matches(kind, change.bucket, change.key)
            {
                continue;
            }
            let (bucket, trace) = made.get_or_insert_with(|| {
                (Arc::from(change.bucket), tracing::Span::current().context())
            });
            watcher.queue.push(Event {
                bucket: Arc::clone(bucket),
                key: Box::from(change.key),
                value: value.map(bytes::Bytes::copy_from_slice),
                trace: trace.clone(),
            });
        }
    }
}
