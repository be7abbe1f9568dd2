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
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::WatchSettings;
use delivery::{Delivery, Event, Outbound, Stats, Target};
use rules::Event as Kind;

/// One watch link's watcher.
pub struct Watcher {
    target: Target,
    settings: WatchSettings,
    delivery: Delivery,
    /// The namespace it observes, as last resolved.
    observing: Mutex<Option<Arc<str>>>,
}

impl Watcher {
    /// Stops its delivery: no call starts after this returns.
    pub async fn halt(&self) {
        self.delivery.halt().await;
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

impl Totals {
    /// Reads the figures out of a health message (`N watchers, …; watch events: N delivered,
    /// N dropped, N failed, N queued; …`), for tests and tools.
    pub fn read(health: &str) -> Option<Self> {
        let figure = |part: &str, what: &str| -> Option<u64> {
            (part.split([',', ';'])).find_map(|p| p.trim().strip_suffix(what)?.trim().parse().ok())
        };
        let (_, events) = health.split_once("watch events: ")?;
        Some(Self {
            watchers: usize::try_from(figure(health, " watchers")?).ok()?,
            delivered: figure(events, " delivered")?,
            dropped: figure(events, " dropped")?,
            failed: figure(events, " failed")?,
            queued: usize::try_from(figure(events, " queued")?).ok()?,
        })
    }
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

    /// Starts delivering to `component` through the watch link `link_name`. Answers the
    /// watcher this one replaces, to [`Watcher::halt`] once the lock is released; a put
    /// with the settings in force changes nothing. Call [`Watchers::resolve`] after.
    pub fn put(
        &self,
        component: &str,
        link_name: &str,
        settings: WatchSettings,
    ) -> Option<Arc<Watcher>> {
        let key = (component.to_owned(), link_name.to_owned());
        let mut links = self.links();
        if links.get(&key).is_some_and(|w| w.settings == settings) {
            return None;
        }
        let target = Target {
            component: component.to_owned(),
            link_name: link_name.to_owned(),
        };
        let delivery = delivery::start(
            target.clone(),
            settings.bounds,
            self.shared.outbound.subscribe(),
            Arc::clone(&self.shared.all),
        );
        let watcher = Arc::new(Watcher {
            target,
            settings,
            delivery,
            observing: Mutex::new(None),
        });
        links.insert(key, watcher)
    }

    /// Forgets the watch link; answers its watcher, to [`Watcher::halt`] once the lock is
    /// released. Call [`Watchers::resolve`] after (the watcher is out of the store's way only
    /// then).
    pub fn remove(&self, component: &str, link_name: &str) -> Option<Arc<Watcher>> {
        let key = (component.to_owned(), link_name.to_owned());
        self.links().remove(&key)
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
        let mut moved = Vec::new();
        for watcher in links.values() {
            let target = &watcher.target;
            let ns = namespace_of(&target.component, &target.link_name);
            let mut last = watcher.observing.lock().unwrap_or_else(|p| p.into_inner());
            if *last != ns {
                if last.is_some() {
                    moved.push(Arc::clone(watcher));
                }
                *last = ns.clone();
            }
            // A watcher without rules is told nothing: its namespace pays nothing for it.
            if let Some(ns) = ns.filter(|_| !watcher.settings.rules.is_empty()) {
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
        // What a moved watcher queued came from data it may no longer read. Invalidated with
        // the write lock held: a change reported from the old map was queued before (old
        // epoch), one from the new map is queued after (new epoch).
        for watcher in moved {
            watcher.delivery.queue.invalidate();
        }
        (now, gone)
    }

    /// Figures across all watchers: the events of every watcher so far (deleted ones
    /// included), and what the active ones have queued.
    pub fn totals(&self) -> Totals {
        let links = self.links();
        // The queues first: once one reads empty, its events' outcomes are all counted.
        let queued = links.values().map(|w| w.delivery.queue.len()).sum();
        let (delivered, dropped, failed) = self.shared.all.read();
        Totals {
            watchers: links.len(),
            delivered,
            dropped,
            failed,
            queued,
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Watcher>>> {
        self.shared.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Observer for Shared {
    /// On the write path, under the entry's lock: match, take room, queue; never wait. The key,
    /// the value and the trace are copied once per change, shared by the watchers told, and
    /// only after one of them had room.
    fn changed(&self, change: Change<'_>) {
        let observing = self.observing.read().unwrap_or_else(|p| p.into_inner());
        let Some(watchers) = observing.get(change.namespace) else {
            return;
        };
        let (kind, value) = match change.what {
            What::Set(value) => (Kind::Set, Some(value)),
            What::Deleted | What::Expired | What::Evicted => (Kind::Delete, None),
        };
        let mut made: Option<Event> = None;
        for watcher in watchers {
            if watcher.delivery.halted()
                || !(watcher.settings.rules).matches(kind, change.bucket, change.key)
            {
                continue;
            }
            let value_len = value.map_or(0, <[u8]>::len);
            watcher.delivery.queue.offer(change.key, value_len, || {
                let event = made.get_or_insert_with(|| Event {
                    key: Arc::from(change.key),
                    value: value.map(bytes::Bytes::copy_from_slice),
                    trace: tracing::Span::current().context(),
                });
                Event {
                    key: Arc::clone(&event.key),
                    value: event.value.clone(),
                    trace: event.trace.clone(),
                }
            });
        }
    }
}
