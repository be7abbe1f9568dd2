//! Counts the messages the host's wRPC stack (wrpc-transport-nats 0.29) throws away, as it
//! reports them itself: in the process of a load generator using its client, or in a process
//! running the wasmCloud host library.
//!
//! Its demultiplexing task routes every message on the client's inbox to the call that
//! registered its subject. A call registers its handshake and result subjects by sending a
//! command to that task, then publishes the invocation without waiting for the task to apply
//! the command; the task `select!`s between its command queue and incoming messages, so a
//! reply can be handled before its subscription and is dropped with the debug event
//! "drop message with no subscriber". The call then waits for an answer that already came.
//! Each such event is counted here; `bench` and the real-lattice test print them next to the
//! calls they lost and the handshakes the provider sent again. The 0.29 *serving* path has the
//! same race for a call's parameter subject (`….params`): those are counted apart.
//!
//! It also keeps every warning and error the process logs ([`warnings`]): where no dropped
//! message explains a lost call, the host's own warnings (an invocation that failed or timed
//! out) are printed beside the figures. Not every loss leaves one: the host aborting a
//! component's accepted invocations when it rescales logs nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::Layer;

static HANDSHAKES: AtomicU64 = AtomicU64::new(0);
static OTHERS: AtomicU64 = AtomicU64::new(0);
static PARAMS: AtomicU64 = AtomicU64::new(0);

/// Messages the client dropped so far: (handshakes, results). A dropped handshake (a message
/// on the call's own inbox subject) leaves its call waiting unless the server sends it again;
/// results arriving after a call gave up or finished, and copies the server sent with a
/// repeated handshake, land in "results". A repeated handshake that arrives after its call
/// went on is counted as a dropped handshake too.
pub fn dropped() -> (u64, u64) {
    (
        HANDSHAKES.load(Ordering::Relaxed),
        OTHERS.load(Ordering::Relaxed),
    )
}

/// Parameter messages the serving side dropped so far (a caller's end of parameters that
/// arrived before the server applied its subscription; harmless when all parameters came with
/// the invocation).
pub fn dropped_params() -> u64 {
    PARAMS.load(Ordering::Relaxed)
}

struct CountDrops;

#[derive(Default)]
struct Drop {
    is_drop: bool,
    subject: String,
}

impl Visit for Drop {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.is_drop |= value == "drop message with no subscriber";
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                self.is_drop |= format!("{value:?}") == "drop message with no subscriber";
            }
            "subject" => self.subject = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for CountDrops {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut drop = Drop::default();
        event.record(&mut drop);
        if drop.is_drop {
            // Inbox subjects are `_INBOX.<client>.<call>`; results go to `….results` (the
            // field is the Debug form of async_nats::Subject, with the subject inside).
            if drop.subject.contains(".results") {
                OTHERS.fetch_add(1, Ordering::Relaxed);
            } else if drop.subject.contains(".params") {
                PARAMS.fetch_add(1, Ordering::Relaxed);
            } else {
                HANDSHAKES.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Distinct warnings kept; later new ones are counted under one line.
const MAX_WARNINGS: usize = 32;
static WARNINGS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// The warnings and errors this process logged so far (the host library's, when it runs in
/// it), each with how often: evidence of where a call was lost when no drop explains it.
pub fn warnings() -> BTreeMap<String, u64> {
    WARNINGS.lock().map(|w| w.clone()).unwrap_or_default()
}

struct CountWarnings;

#[derive(Default)]
struct Warning(String);

impl Visit for Warning {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{}={value:?}", field.name());
    }
}

impl<S: tracing::Subscriber> Layer<S> for CountWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut warning = Warning::default();
        event.record(&mut warning);
        let mut line = format!(
            "{} {}: {}",
            event.metadata().level(),
            event.metadata().target(),
            warning.0
        );
        if line.len() > 300 {
            let mut end = 300;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        let Ok(mut warnings) = WARNINGS.lock() else {
            return;
        };
        if warnings.len() >= MAX_WARNINGS && !warnings.contains_key(&line) {
            line = "(other warnings)".into();
        }
        *warnings.entry(line).or_default() += 1;
    }
}

/// Installs the counters for this process: the debug events of wrpc_transport_nats, and every
/// warning or error.
pub fn install() {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("wrpc_transport_nats", tracing::Level::DEBUG);
    let subscriber = tracing_subscriber::registry()
        .with(CountDrops.with_filter(filter))
        .with(CountWarnings.with_filter(tracing_subscriber::filter::LevelFilter::WARN));
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("(a tracing subscriber was already set: client drops are not counted)");
    }
}
