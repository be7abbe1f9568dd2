//! Delivering one watcher's events: a bounded queue in [`LANES`] lanes, each drained in order
//! by a task of its own that invokes the component's `on-set` / `on-delete`.
//!
//! An event goes to the lane its key hashes to (the key only: the component is not told the
//! bucket), so the changes of one key are delivered one after another, in the order they
//! happened, while up to [`LANES`] calls of different keys are in flight at once. The queue is
//! bounded in events and in bytes across all lanes, calls in flight included; room is taken
//! from the lengths before anything is copied, and an event that does not fit is dropped and
//! counted ([`Stats`]): the write that caused it never waits for a watcher. A call that fails
//! or times out is counted as failed and not sent again (a timed-out call may have been
//! delivered, and may still be running when the next event of its key goes).
//!
//! Every watcher's tasks run on one thread of their own at a lower CPU priority
//! ([`runtime`]): when the machine is busy, serving calls wins over telling watchers, and a
//! watcher that falls behind loses events rather than slowing the writes.

use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::bindings::wrpc::keyvalue::watcher;
use crate::client::Transport;

/// Calls in flight per watcher, at most (one per lane).
pub const LANES: usize = 16;

/// What the host parses as the watcher's `bucket` argument: a number, turned into a resource
/// handle the component receives (see the README's "Watching keys").
pub const BUCKET_HANDLE: &str = "0";

/// Bytes an event takes in the queue besides its key and value.
const EVENT_OVERHEAD: usize = 128;

/// How often a watcher that dropped or failed events since the last warning warns again.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// One change, as a watcher is told of it. Watchers told of the same change share its key,
/// value and trace.
pub struct Event {
    pub key: Arc<str>,
    /// `Some(value)`: `on-set`; `None`: `on-delete`.
    pub value: Option<Bytes>,
    /// The trace of the write that caused it.
    pub trace: opentelemetry::Context,
}

/// An event in a lane: with the room it holds and the epoch it was queued in.
struct Queued {
    event: Event,
    room: Room,
    epoch: u64,
}

/// The room an event holds in its queue. Given back when dropped, however the event goes
/// (delivered, failed, stale, or with its lane when the watcher halts), after its outcome was
/// counted: `dropped` unless [`Room::settle`] counted another one. So what the queue holds is
/// never left taken, and once it reads zero, every outcome is in the figures.
struct Room {
    queue: Arc<Queue>,
    size: usize,
    counted: bool,
}

impl Room {
    fn settle(mut self, outcome: fn(&Stats) -> &AtomicU64) {
        count(outcome, &self.queue.stats, &self.queue.all);
        self.counted = true;
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if !self.counted {
            count(|s| &s.dropped, &self.queue.stats, &self.queue.all);
        }
        self.queue.release(self.size);
    }
}

/// What events came to, so far: of one watcher, or of all that ever were.
#[derive(Default)]
pub struct Stats {
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
}

impl Stats {
    /// (delivered, dropped, failed).
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Counts one outcome in a watcher's figures and in those of all watchers.
fn count(counter: fn(&Stats) -> &AtomicU64, own: &Stats, all: &Stats) {
    counter(own).fetch_add(1, Ordering::Relaxed);
    counter(all).fetch_add(1, Ordering::Relaxed);
}

/// Where calls go: the lattice's NATS connection and our own key (the calls' `source-id`).
#[derive(Clone)]
pub struct Outbound {
    pub nats: async_nats::Client,
    pub lattice: String,
    pub provider_key: String,
}

/// How much a watcher may queue and how long a call may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub max_events: usize,
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// One watcher's queue: its lanes' senders and what they hold.
pub struct Queue {
    lanes: Vec<mpsc::UnboundedSender<Queued>>,
    /// Bumped when the watcher stops observing what its queued events came from: lanes drop
    /// events of an older epoch.
    epoch: AtomicU64,
    events: AtomicUsize,
    bytes: AtomicUsize,
    bounds: Bounds,
    hasher: std::collections::hash_map::RandomState,
    pub stats: Stats,
    /// The figures of all watchers, this one's included.
    all: Arc<Stats>,
}

impl Queue {
    /// Queues the event `make` makes, of key `key` and a value of `value_len` bytes, or drops
    /// and counts it when the queue is full (then `make` is not called). Never waits.
    pub fn offer(self: &Arc<Self>, key: &str, value_len: usize, make: impl FnOnce() -> Event) {
        let size = EVENT_OVERHEAD + key.len() + value_len;
        if !self.reserve(size) {
            count(|s| &s.dropped, &self.stats, &self.all);
            return;
        }
        let room = Room {
            queue: Arc::clone(self),
            size,
            counted: false,
        };
        let lane = (self.hasher.hash_one(key) % LANES as u64) as usize;
        let queued = Queued {
            event: make(),
            room,
            epoch: self.epoch.load(Ordering::Acquire),
        };
        // A send fails only once the watcher halted: the event is dropped with its room.
        let _ = self.lanes[lane].send(queued);
    }

    /// Drops, uncounted as delivered, every event queued so far (the watcher no longer
    /// observes the data they came from).
    pub fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    fn reserve(&self, size: usize) -> bool {
        let limit = |bound| move |held: usize| held.checked_add(size).filter(|&n| n <= bound);
        if (self.events)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.bounds.max_events).then_some(n + 1)
            })
            .is_err()
        {
            return false;
        }
        let bytes = (self.bytes).fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            limit(self.bounds.max_bytes),
        );
        if bytes.is_err() {
            self.events.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn release(&self, size: usize) {
        self.events.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(size, Ordering::AcqRel);
    }

    /// Events queued now, calls in flight included. Read before the [`Stats`] (an event's
    /// outcome is counted before its room is given back).
    pub fn len(&self) -> usize {
        self.events.load(Ordering::Acquire)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Who is told: component `component`, through the watch link named `link_name`.
#[derive(Clone, Debug)]
pub struct Target {
    pub component: String,
    pub link_name: String,
}

/// A watcher's queue and the tasks that drain it.
pub struct Delivery {
    pub queue: Arc<Queue>,
    stop: CancellationToken,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Delivery {
    /// Stops delivery: no call starts after this returns (a call in flight is abandoned), and
    /// what was still queued is counted as dropped.
    pub async fn halt(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in &tasks {
            task.abort();
        }
        // Once they ended, what they held (in flight, or queued in their channels) has been
        // dropped, and counted.
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Whether delivery was stopped.
    pub fn halted(&self) -> bool {
        self.stop.is_cancelled()
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Makes the queue and starts its lane tasks and its warning task on the delivery
/// [`runtime`]. The tasks wait for `outbound` before the first call.
pub fn start(
    target: Target,
    bounds: Bounds,
    outbound: tokio::sync::watch::Receiver<Option<Outbound>>,
    all: Arc<Stats>,
) -> Delivery {
    let stop = CancellationToken::new();
    let mut receivers = Vec::with_capacity(LANES);
    let mut lanes = Vec::with_capacity(LANES);
    for _ in 0..LANES {
        let (tx, rx) = mpsc::unbounded_channel();
        lanes.push(tx);
        receivers.push(rx);
    }
    let queue = Arc::new(Queue {
        lanes,
        epoch: AtomicU64::new(0),
        events: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        bounds,
        hasher: Default::default(),
        stats: Stats::default(),
        all,
    });
    let target = Arc::new(target);
    let runtime = runtime();
    let mut tasks = Vec::with_capacity(LANES + 1);
    for rx in receivers {
        let lane = Lane {
            queue: Arc::clone(&queue),
            target: Arc::clone(&target),
            outbound: outbound.clone(),
            stop: stop.clone(),
        };
        tasks.push(runtime.spawn(lane.run(rx)));
    }
    tasks.push(runtime.spawn(warn_of_losses(Arc::clone(&queue), target, stop.clone())));
    Delivery {
        queue,
        stop,
        tasks: std::sync::Mutex::new(tasks),
    }
}

/// The runtime every watcher's tasks run on: one thread of its own, niced (+10) on Linux, so
/// that the threads serving calls go first when the CPU is busy. Where that thread cannot be
/// started, the caller's runtime.
fn runtime() -> tokio::runtime::Handle {
    static HANDLE: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    let started = HANDLE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("watch-delivery".into())
            .spawn(move || {
                lower_priority();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => {
                        let _ = tx.send(Some(runtime.handle().clone()));
                        runtime.block_on(std::future::pending::<()>());
                    }
                    Err(err) => {
                        warn!("cannot start the watch delivery runtime: {err}");
                        let _ = tx.send(None);
                    }
                }
            });
        match spawned {
            Ok(_) => rx.recv().ok().flatten(),
            Err(err) => {
                warn!("cannot start the watch delivery thread: {err}");
                None
            }
        }
    });
    started
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current)
}

/// A NATS connection of the watchers' own ([`crate::connect`]), on the delivery
/// [`runtime`]: its I/O runs on that thread, and events never queue on the connection that
/// serves calls.
pub async fn connect(
    url: &str,
    jwt: &str,
    seed: &str,
    name: &str,
) -> anyhow::Result<async_nats::Client> {
    let (url, jwt, seed, name) = (
        url.to_owned(),
        jwt.to_owned(),
        seed.to_owned(),
        name.to_owned(),
    );
    runtime()
        .spawn(async move {
            crate::connect(&url, &jwt, &seed, &name, "watch delivery connection").await
        })
        .await?
}

/// Lowers the calling thread's CPU priority (nice +10), where the platform allows it.
fn lower_priority() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `gettid` and `setpriority` only read and set the calling thread's scheduling
    // priority; on Linux a nice value is per thread.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// One lane's task.
struct Lane {
    queue: Arc<Queue>,
    target: Arc<Target>,
    outbound: tokio::sync::watch::Receiver<Option<Outbound>>,
    stop: CancellationToken,
}

impl Lane {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let Some(transport) = self.transport().await else {
            return;
        };
        loop {
            let Queued { event, room, epoch } = tokio::select! {
                biased;
                () = self.stop.cancelled() => return,
                next = rx.recv() => match next {
                    Some(next) => next,
                    None => return,
                },
            };
            if epoch != self.queue.epoch.load(Ordering::Acquire) {
                // Stale: dropped with its room.
                continue;
            }
            let call =
                tokio::time::timeout(self.queue.bounds.timeout, self.deliver(&transport, &event));
            let outcome = tokio::select! {
                biased;
                () = self.stop.cancelled() => return,
                outcome = call => outcome,
            };
            match outcome {
                Ok(Ok(())) => room.settle(|s| &s.delivered),
                Ok(Err(err)) => {
                    debug!(
                        component = self.target.component,
                        "watch event failed: {err:#}"
                    );
                    room.settle(|s| &s.failed);
                }
                Err(_) => room.settle(|s| &s.failed),
            }
        }
    }

    /// The client of the component's prefix, once the provider is connected.
    async fn transport(&mut self) -> Option<(Transport, Outbound)> {
        let outbound = tokio::select! {
            biased;
            () = self.stop.cancelled() => return None,
            ready = self.outbound.wait_for(Option::is_some) => ready.ok()?.clone()?,
        };
        let transport = Transport::new(
            outbound.nats.clone(),
            &outbound.lattice,
            &self.target.component,
        );
        Some((transport, outbound))
    }

    async fn deliver(
        &self,
        (transport, outbound): &(Transport, Outbound),
        event: &Event,
    ) -> anyhow::Result<()> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("source-id", outbound.provider_key.as_str());
        headers.insert("link-name", self.target.link_name.as_str());
        let mut trace = std::collections::HashMap::new();
        TraceContextPropagator::new().inject_context(&event.trace, &mut trace);
        for (name, value) in &trace {
            headers.insert(name.as_str(), value.as_str());
        }
        let cx = Some(headers);
        match &event.value {
            Some(value) => watcher::on_set(transport, cx, BUCKET_HANDLE, &event.key, value).await,
            None => watcher::on_delete(transport, cx, BUCKET_HANDLE, &event.key).await,
        }
    }
}

/// Warns, at most once per [`WARN_EVERY`], of the events a watcher dropped or failed to
/// deliver meanwhile.
async fn warn_of_losses(queue: Arc<Queue>, target: Arc<Target>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(WARN_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut dropped, mut failed) = (0, 0);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let (_, dropped_now, failed_now) = queue.stats.read();
        let now = (dropped_now, failed_now);
        if now != (dropped, failed) {
            warn!(
                component = target.component,
                link_name = target.link_name,
                dropped = now.0 - dropped,
                failed = now.1 - failed,
                queued = queue.len(),
                max_events = queue.bounds.max_events,
                max_bytes = queue.bounds.max_bytes,
                "watch events lost in the last {}s: dropped (the watcher's queue was full) or \
                 failed (the call failed or timed out)",
                WARN_EVERY.as_secs()
            );
            (dropped, failed) = now;
        }
    }
}
