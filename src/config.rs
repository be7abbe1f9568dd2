//! Every configuration key the provider reads, its default, and how maps merge: the one place
//! to look up a setting.
//!
//! Three kinds, by where they come from and when they apply:
//! 1. [`Config`]: provider config, from host data at start and from each `config.update`
//!    message (which carries the *full* merged map again). Applied live.
//! 2. [`Snapshots`] and the `OTEL_*` overrides ([`otel_config`]): provider config read at
//!    start only; changing them needs a restart.
//! 3. Link config (`target_config` of a component's link to us): [`link_namespace`] and
//!    [`LinkPolicy`] (expiry and eviction). Applied when the link is put.
//! 4. Watch link config (`source_config` of our link to a component that exports
//!    `wasi:keyvalue/watcher`): [`WatchSettings`], the `watch` rules and the bounds of the
//!    watcher's queue. Applied when the link is put.
//!
//! Each map is read on top of the defaults, so a key removed from the config returns to its
//! default. A key with a value we cannot use is reported as a [`Problem`] and keeps the value
//! it had (at start: the default): a typo never takes the store down. Provider config keys are
//! matched case-insensitively and their values trimmed (`OTEL_*` values are taken as given);
//! link config keys are matched exactly (`ttl_secs.<bucket>` names a bucket, and bucket names
//! are case-sensitive), but for the watch link's, matched in any case as the Redis provider
//! reads `watch`; keys we do not know are ignored.
//!
//! Each value has one owner once applied: the engine holds the [`Limits`], the provider the
//! [`Serving`] bounds (and hands the in-flight ones to its budget).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyvalue_store::Limits;
use wasmcloud_provider_sdk::core::OtelConfig;

use crate::links;
use crate::watch::delivery::Bounds;
use crate::watch::rules::Rules;

/// Largest key (and bucket name) in bytes.
pub const MAX_KEY_BYTES: &str = "max_key_bytes";
/// Largest value in bytes.
pub const MAX_VALUE_BYTES: &str = "max_value_bytes";
/// Most keys per namespace.
pub const MAX_KEYS: &str = "max_keys";
/// Most key plus value bytes in the whole provider.
pub const MAX_TOTAL_BYTES: &str = "max_total_bytes";
/// Most keys per list-keys page.
pub const LIST_PAGE_SIZE: &str = "list_page_size";
/// Admit calls from components with no link to us (`true`/`false`).
pub const ALLOW_UNLINKED: &str = "allow_unlinked";
/// Most bytes of parameters one invocation may send.
pub const MAX_REQUEST_BYTES: &str = "max_request_bytes";
/// How long one invocation may take to send its parameters, in milliseconds.
pub const REQUEST_TIMEOUT_MS: &str = "request_timeout_ms";
/// The shortest wait, in milliseconds, before a caller that has not confirmed the handshake
/// is sent it again (the wait adapts to observed round trips above it).
pub const HANDSHAKE_RETRY_MIN_MS: &str = "handshake_retry_min_ms";
/// Most bytes one answer may hold (get-many values, a list-keys page).
pub const MAX_RESPONSE_BYTES: &str = "max_response_bytes";
/// Most bytes all calls in flight may hold together: parameters being received and decoded,
/// answers being built and sent.
pub const MAX_INFLIGHT_BYTES: &str = "max_inflight_bytes";
/// Most invocations handled at once.
pub const MAX_CONCURRENT_CALLS: &str = "max_concurrent_calls";
/// Most bytes the sorted key copies of open list-keys listings may hold together.
pub const MAX_LISTING_BYTES: &str = "max_listing_bytes";

/// Where snapshots go (start only); none without it.
pub const SNAPSHOT_PATH: &str = "snapshot_path";
/// Seconds between periodic snapshots (start only).
pub const SNAPSHOT_INTERVAL_SECS: &str = "snapshot_interval_secs";
/// Refuse to start on an unreadable snapshot, `true`/`false` (start only).
pub const SNAPSHOT_REQUIRED: &str = "snapshot_required";

/// `jetstream` to serve as one store with every other instance through NATS JetStream; `none`
/// (the default) for one instance in memory (start only).
pub const REPLICATION: &str = "replication";
/// Prefix of the JetStream stream's name and subjects (start only).
pub const JETSTREAM_PREFIX: &str = "jetstream_prefix";
/// `file` (the default) or `memory` (start only).
pub const JETSTREAM_STORAGE: &str = "jetstream_storage";
/// Replicas of the stream in a JetStream cluster (start only).
pub const JETSTREAM_REPLICAS: &str = "jetstream_replicas";
/// Most bytes the stream may hold; past it, writes are refused (start only).
pub const JETSTREAM_MAX_BYTES: &str = "jetstream_max_bytes";
/// How long a delete's marker stays in the stream (start only).
pub const JETSTREAM_TOMBSTONE_SECS: &str = "jetstream_tombstone_secs";
/// How long a replicated write or read may wait for JetStream (start only).
pub const JETSTREAM_TIMEOUT_MS: &str = "jetstream_timeout_ms";
/// `linearizable` (the default) or `local` (start only).
pub const READ_CONSISTENCY: &str = "read_consistency";

/// Link `target_config` key naming the namespace a link's calls use. Links naming the same
/// namespace share data; without it a component gets a namespace of its own.
pub const LINK_NAMESPACE: &str = "namespace";
/// Link `target_config` key: seconds a key written through the link lives after its last
/// write (set, set-many, increment); `0` or absent: it never expires.
pub const LINK_TTL_SECS: &str = "ttl_secs";
/// Link `target_config` key: `lru` to evict the namespace's least recently used keys at
/// `max_keys` or `max_total_bytes` instead of refusing writes; `none` (the default) refuses.
pub const LINK_EVICTION: &str = "eviction";

/// Watch link `source_config` key (our link to a component exporting `wasi:keyvalue/watcher`):
/// the changes to tell it of, `SET@key,DEL@prefix*,SET:bucket@key,…` (see `watch/rules.rs`).
pub const LINK_WATCH: &str = "watch";
/// Watch link key: events that may wait for the watcher, at most; more are dropped and counted.
pub const LINK_WATCH_QUEUE: &str = "watch_queue";
/// Watch link key: bytes (keys, values and 128 a event) that may wait for the watcher.
pub const LINK_WATCH_QUEUE_BYTES: &str = "watch_queue_bytes";
/// Watch link key: milliseconds one `on-set`/`on-delete` call may take before it counts as
/// failed and the next event of its lane goes.
pub const LINK_WATCH_TIMEOUT_MS: &str = "watch_timeout_ms";

/// The live provider settings: what the engine enforces and what serving is bounded by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// What the engine enforces (the engine owns them once applied).
    pub limits: Limits,
    /// What serving is bounded by (the provider owns them once applied).
    pub serving: Serving,
}

/// The settings of serving calls: who may call, and what one call and all calls may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Serving {
    /// Whether calls without a link are served (standalone and test use).
    pub allow_unlinked: bool,
    /// Bound on the parameter bytes of one invocation.
    pub max_request_bytes: usize,
    /// Bound on the time an invocation may take to deliver its parameters.
    pub request_timeout: Duration,
    /// The shortest retransmission timeout of a handshake.
    pub handshake_retry_min: Duration,
    /// Bound on the bytes of one answer.
    pub max_response_bytes: usize,
    /// Bound on the bytes all calls in flight hold together.
    pub max_inflight_bytes: usize,
    /// Bound on the invocations handled at once.
    pub max_concurrent_calls: usize,
}

impl Default for Config {
    /// The defaults, and why (README's config table says the same):
    /// - keys up to 4 KiB: keys are names, and a bound keeps a listing page small;
    /// - values up to 1 MiB: the default NATS `max_payload`, and memcached's item limit;
    /// - 1,000,000 keys a namespace and 256 MiB in all, so one runaway component cannot eat
    ///   the host's memory; raise them for large caches;
    /// - 1000 keys a page: the size the wasi:keyvalue examples read;
    /// - 64 MiB and 10 s per request: a batch of the largest values still fits, and a peer
    ///   that stops half-way through its parameters is dropped long before a host would give up;
    /// - a handshake sent again after 100 ms at the earliest: a caller that lost it (the host's
    ///   client drops some, README "Known upstream problems") waits that long instead of its
    ///   10 s timeout, and a busy caller is rarely sent one it did not need;
    /// - answers up to 64 MiB, as requests: a get-many of 64 of the largest values;
    /// - 256 MiB for everything in flight and 4096 calls at once (sixteen times what a busy
    ///   host sends us), one component holding at most half of each: the largest request
    ///   still fits in one component's half, and with `max_total_bytes` and
    ///   `max_listing_bytes` this bounds the process's memory whatever arrives;
    /// - 256 MiB of listings, as much as the store holds: listing a bucket of `max_keys` (1M)
    ///   keys of up to ~100 bytes fits (1M keys of 16 bytes take 72 MiB while they are
    ///   copied and sorted, 24 MiB once the listing is open).
    fn default() -> Self {
        Self {
            limits: Limits {
                max_key_bytes: 4096,
                max_value_bytes: 1 << 20,
                max_keys: 1_000_000,
                max_total_bytes: 256 << 20,
                list_page_size: 1000,
                max_listing_bytes: 256 << 20,
            },
            serving: Serving {
                allow_unlinked: false,
                max_request_bytes: 64 << 20,
                request_timeout: Duration::from_secs(10),
                handshake_retry_min: Duration::from_millis(100),
                max_response_bytes: 64 << 20,
                max_inflight_bytes: 256 << 20,
                max_concurrent_calls: 4096,
            },
        }
    }
}

/// A config value that could not be used; the setting kept its previous value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The config key.
    pub key: Cow<'static, str>,
    /// The value given (config values are not secret: secrets travel separately).
    pub value: String,
    /// What would have been accepted.
    pub expected: &'static str,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config {}={:?} ignored: expected {}",
            self.key, self.value, self.expected
        )
    }
}

impl std::error::Error for Problem {}

impl Config {
    /// Reads `map` on top of the defaults. A value that cannot be used keeps the value it has
    /// in `current`, and is reported.
    pub fn from_map(map: &HashMap<String, String>, current: &Config) -> (Config, Vec<Problem>) {
        let mut r = Reader::new(map);
        let (d, c) = (Config::default().limits, current.limits);
        let limits = Limits {
            max_key_bytes: r.positive(MAX_KEY_BYTES, d.max_key_bytes, c.max_key_bytes),
            max_value_bytes: r.positive(MAX_VALUE_BYTES, d.max_value_bytes, c.max_value_bytes),
            max_keys: r.positive(MAX_KEYS, d.max_keys, c.max_keys),
            max_total_bytes: r.positive(MAX_TOTAL_BYTES, d.max_total_bytes, c.max_total_bytes),
            list_page_size: r.positive(LIST_PAGE_SIZE, d.list_page_size, c.list_page_size),
            max_listing_bytes: r.positive(
                MAX_LISTING_BYTES,
                d.max_listing_bytes,
                c.max_listing_bytes,
            ),
        };
        let (defaults, current) = (Config::default().serving, current.serving);
        let serving = Serving {
            allow_unlinked: r.boolean(
                ALLOW_UNLINKED,
                defaults.allow_unlinked,
                current.allow_unlinked,
            ),
            max_request_bytes: r.positive(
                MAX_REQUEST_BYTES,
                defaults.max_request_bytes,
                current.max_request_bytes,
            ),
            request_timeout: Duration::from_millis(r.positive(
                REQUEST_TIMEOUT_MS,
                duration_ms(defaults.request_timeout),
                duration_ms(current.request_timeout),
            )),
            handshake_retry_min: Duration::from_millis(r.positive(
                HANDSHAKE_RETRY_MIN_MS,
                duration_ms(defaults.handshake_retry_min),
                duration_ms(current.handshake_retry_min),
            )),
            max_response_bytes: r.positive(
                MAX_RESPONSE_BYTES,
                defaults.max_response_bytes,
                current.max_response_bytes,
            ),
            max_inflight_bytes: r.positive(
                MAX_INFLIGHT_BYTES,
                defaults.max_inflight_bytes,
                current.max_inflight_bytes,
            ),
            max_concurrent_calls: r.positive(
                MAX_CONCURRENT_CALLS,
                defaults.max_concurrent_calls,
                current.max_concurrent_calls,
            ),
        };
        (Config { limits, serving }, r.problems)
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where and how often to snapshot (provider config, read at start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshots {
    pub path: PathBuf,
    pub interval: Duration,
    /// Refuse to start when the snapshot exists but cannot be read.
    pub required: bool,
}

impl Snapshots {
    /// Every 60 s unless `snapshot_interval_secs` says otherwise.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

    /// The snapshot settings of the provider config: `None` without `snapshot_path`. A value
    /// that cannot be used keeps its default and is reported, as with every other key.
    pub fn from_map(map: &HashMap<String, String>) -> (Option<Snapshots>, Vec<Problem>) {
        let mut r = Reader::new(map);
        let Some(path) = r.given.get(SNAPSHOT_PATH).filter(|p| !p.is_empty()) else {
            return (None, r.problems);
        };
        let path = PathBuf::from(path);
        let default = Self::DEFAULT_INTERVAL.as_secs();
        let interval = r.read(
            SNAPSHOT_INTERVAL_SECS,
            "whole seconds above 0; snapshotting every 60 s",
            default,
            default,
            |v| v.parse::<u64>().ok().filter(|&s| s > 0),
        );
        let required = r.read(
            SNAPSHOT_REQUIRED,
            "true or false; an unreadable snapshot is moved aside",
            false,
            false,
            parse_bool,
        );
        let settings = Snapshots {
            path,
            interval: Duration::from_secs(interval),
            required,
        };
        (Some(settings), r.problems)
    }
}

/// How reads see the writes of other instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadConsistency {
    /// A read sees every write acknowledged before it began, on any instance.
    Linearizable,
    /// A read answers from this instance's memory at once: writes of other instances show
    /// once they are applied here.
    Local,
}

/// Where the replicated store lives in JetStream (`replication = "jetstream"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replication {
    /// Prefix of the stream's name and subjects.
    pub prefix: String,
    /// On disk (`true`) or in memory.
    pub file_storage: bool,
    pub replicas: usize,
    /// Most bytes the stream may hold, `None` for no limit but the server's.
    pub max_bytes: Option<u64>,
    /// How long a delete's marker stays (an instance out of touch for longer reloads).
    pub tombstone: Duration,
    /// How long a write or a read barrier may wait for JetStream.
    pub timeout: Duration,
    pub reads: ReadConsistency,
}

impl Replication {
    pub const DEFAULT_PREFIX: &'static str = "KVINMEM";
    pub const DEFAULT_TOMBSTONE: Duration = Duration::from_secs(3600);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// The replication settings of the provider config: `None` unless `replication` is
    /// `jetstream`. A value that cannot be used keeps its default and is reported, but for
    /// `replication` itself: an instance that guessed would hold a store of its own while its
    /// peers share one, so that is refused.
    pub fn from_map(
        map: &HashMap<String, String>,
    ) -> Result<(Option<Replication>, Vec<Problem>), Problem> {
        let mut r = Reader::new(map);
        let on = r.one_of(
            REPLICATION,
            "`jetstream` or `none`",
            false,
            &[("jetstream", true), ("none", false), ("", false)],
        );
        if let Some(refused) = r.problems.pop() {
            return Err(refused);
        }
        if !on {
            return Ok((None, r.problems));
        }
        let prefix = r.read(
            JETSTREAM_PREFIX,
            "letters, digits, `-` and `_`",
            Self::DEFAULT_PREFIX.to_owned(),
            Self::DEFAULT_PREFIX.to_owned(),
            |v| (v.len() <= 32 && crate::replica::log::is_plain(v)).then(|| v.to_owned()),
        );
        let file_storage = r.one_of(
            JETSTREAM_STORAGE,
            "`file` or `memory`; file",
            true,
            &[("file", true), ("memory", false)],
        );
        let replicas = r.read(JETSTREAM_REPLICAS, "1 to 5; 1", 1, 1, |v| {
            v.parse::<usize>().ok().filter(|n| (1..=5).contains(n))
        });
        let max_bytes = r.read(
            JETSTREAM_MAX_BYTES,
            "a whole number above 0; no limit",
            None,
            None,
            |v| {
                v.parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0 && n < i64::MAX as u64)
                    .map(Some)
            },
        );
        let tombstone = r.read(
            JETSTREAM_TOMBSTONE_SECS,
            "whole seconds from 60; 3600",
            Self::DEFAULT_TOMBSTONE,
            Self::DEFAULT_TOMBSTONE,
            |v| {
                v.parse::<u64>()
                    .ok()
                    .filter(|&s| s >= 60)
                    .map(Duration::from_secs)
            },
        );
        let timeout = r.read(
            JETSTREAM_TIMEOUT_MS,
            "milliseconds from 100 to 9000 (under the host's 10 s invocation timeout); 5000",
            Self::DEFAULT_TIMEOUT,
            Self::DEFAULT_TIMEOUT,
            |v| {
                let ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| (100..=9000).contains(ms))?;
                Some(Duration::from_millis(ms))
            },
        );
        let reads = r.one_of(
            READ_CONSISTENCY,
            "`linearizable` or `local`; linearizable",
            ReadConsistency::Linearizable,
            &[
                ("linearizable", ReadConsistency::Linearizable),
                ("local", ReadConsistency::Local),
            ],
        );
        let settings = Replication {
            prefix,
            file_storage,
            replicas,
            max_bytes,
            tombstone,
            timeout,
            reads,
        };
        Ok((Some(settings), r.problems))
    }
}

/// The host's `otel_config` with the provider config's `OTEL_*` overrides applied (start only):
/// the overrides the SDK's `initialize_observability!` honours, one field each.
pub fn otel_config(host: &OtelConfig, map: &HashMap<String, String>) -> OtelConfig {
    let mut otel = host.clone();
    for (key, value) in map {
        let field = match key.to_ascii_uppercase().as_str() {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => &mut otel.observability_endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => &mut otel.traces_endpoint,
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT" => &mut otel.metrics_endpoint,
            "OTEL_TRACES_SAMPLER" => &mut otel.traces_sampler,
            "OTEL_TRACES_SAMPLER_ARG" => &mut otel.traces_sampler_arg,
            _ => continue,
        };
        *field = Some(value.clone());
    }
    otel
}

/// The namespace the calls of a link from component `source_id` use, from the link's config:
/// the one [`LINK_NAMESPACE`] names, else the component's own. A named namespace and a
/// component's own can never be the same one: naming another component's id reaches
/// `named:<id>`, not that component's `component:<id>`.
pub fn link_namespace(link_config: &HashMap<String, String>, source_id: &str) -> Arc<str> {
    match link_config.get(LINK_NAMESPACE).map(|ns| ns.trim()) {
        Some(name) if !name.is_empty() => links::named_namespace(name),
        _ => links::component_namespace(source_id),
    }
}

/// What a link's config asks of the data written through it: expiry, and eviction in its
/// namespace. When links that share a namespace disagree, each write expires as its own link
/// says, and the namespace evicts only while every link to it asks for eviction
/// ([`LinkTable::evicts`](crate::links::LinkTable::evicts)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkPolicy {
    /// [`LINK_TTL_SECS`]; `None`: no expiry.
    pub ttl: Option<Duration>,
    /// `ttl_secs.<bucket>`, overriding `ttl` for one bucket (`None`: that bucket never expires).
    pub bucket_ttls: HashMap<String, Option<Duration>>,
    /// [`LINK_EVICTION`]` = lru`.
    pub evicts: bool,
}

impl LinkPolicy {
    /// Reads the link config keys [`LINK_TTL_SECS`], `ttl_secs.<bucket>` and
    /// [`LINK_EVICTION`]. A value that cannot be used is reported and the setting is off.
    pub fn from_link_config(map: &HashMap<String, String>) -> (LinkPolicy, Vec<Problem>) {
        let mut policy = LinkPolicy::default();
        let mut problems = Vec::new();
        let ttl =
            |key: &str, value: &str, problems: &mut Vec<Problem>| match value.trim().parse::<u64>()
            {
                Ok(0) => Some(None),
                Ok(secs) if secs <= keyvalue_store::MAX_TTL.as_secs() => {
                    Some(Some(Duration::from_secs(secs)))
                }
                _ => {
                    problems.push(Problem {
                        key: Cow::Owned(key.to_owned()),
                        value: value.to_owned(),
                        expected: "whole seconds, 0 (no expiry) to 315360000 (ten years)",
                    });
                    None
                }
            };
        for (key, value) in map {
            if key == LINK_TTL_SECS {
                policy.ttl = ttl(key, value, &mut problems).flatten();
            } else if let Some(bucket) = key.strip_prefix("ttl_secs.") {
                // Unusable: that bucket's keys never expire (rather than falling back to the
                // link's TTL, which could make data meant to stay expire).
                let bucket_ttl = ttl(key, value, &mut problems).flatten();
                policy.bucket_ttls.insert(bucket.to_owned(), bucket_ttl);
            } else if key == LINK_EVICTION {
                match value.trim().to_ascii_lowercase().as_str() {
                    "lru" => policy.evicts = true,
                    "" | "none" => {}
                    _ => problems.push(Problem {
                        key: Cow::Borrowed(LINK_EVICTION),
                        value: value.clone(),
                        expected: "lru or none; writes are refused at a limit",
                    }),
                }
            }
        }
        (policy, problems)
    }

    /// The TTL of a key written to `bucket` through the link.
    pub fn ttl(&self, bucket: &str) -> Option<Duration> {
        match self.bucket_ttls.get(bucket) {
            Some(ttl) => *ttl,
            None => self.ttl,
        }
    }
}

/// What a watch link's config asks: the changes to tell of, and how much may wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSettings {
    /// [`LINK_WATCH`]; empty: nothing is told.
    pub rules: Rules,
    /// [`LINK_WATCH_QUEUE`], [`LINK_WATCH_QUEUE_BYTES`], [`LINK_WATCH_TIMEOUT_MS`].
    pub bounds: Bounds,
}

impl WatchSettings {
    /// Defaults: 10,000 events, 16 MiB, 10 s (the host's own invocation timeout).
    pub const DEFAULT_BOUNDS: Bounds = Bounds {
        max_events: 10_000,
        max_bytes: 16 << 20,
        timeout: Duration::from_secs(10),
    };

    /// Reads a watch link's config; a value that cannot be used is reported and the default
    /// applies (a rule that cannot be read is left out).
    /// The keys are matched in any case (as the Redis provider reads `watch`).
    pub fn from_link_config(map: &HashMap<String, String>) -> (WatchSettings, Vec<Problem>) {
        let get = |key: &str| {
            (map.iter())
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        };
        let (rules, mut problems) = Rules::parse(get(LINK_WATCH).map_or("", String::as_str));
        let mut bounds = Self::DEFAULT_BOUNDS;
        let mut number = |key: &'static str, most: u64, expected: &'static str| {
            let value = get(key)?;
            match value.trim().parse::<u64>() {
                Ok(n) if (1..=most).contains(&n) => Some(n),
                _ => {
                    problems.push(Problem {
                        key: Cow::Borrowed(key),
                        value: value.clone(),
                        expected,
                    });
                    None
                }
            }
        };
        if let Some(n) = number(LINK_WATCH_QUEUE, 1_000_000, "1 to 1000000 events") {
            bounds.max_events = n as usize;
        }
        if let Some(n) = number(LINK_WATCH_QUEUE_BYTES, 1 << 30, "1 to 1073741824 bytes") {
            bounds.max_bytes = n as usize;
        }
        if let Some(n) = number(LINK_WATCH_TIMEOUT_MS, 600_000, "1 to 600000 milliseconds") {
            bounds.timeout = Duration::from_millis(n);
        }
        (WatchSettings { rules, bounds }, problems)
    }
}

/// The namespace of a call no link admits, served with `allow_unlinked`: its component's own
/// (from the `source-id` header), or one shared by every caller that names no component.
pub fn unlinked_namespace(source: Option<&str>) -> Arc<str> {
    source.map_or_else(
        || Arc::from(links::ANONYMOUS_NAMESPACE),
        links::component_namespace,
    )
}

/// Reads settings out of one config map, collecting what could not be used.
struct Reader<'a> {
    given: HashMap<String, &'a str>,
    problems: Vec<Problem>,
}

impl<'a> Reader<'a> {
    fn new(map: &'a HashMap<String, String>) -> Self {
        Reader {
            given: map
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
                .collect(),
            problems: Vec::new(),
        }
    }

    /// The setting when given and valid, `current` when given but invalid, else `default`.
    fn read<T>(
        &mut self,
        key: &'static str,
        expected: &'static str,
        default: T,
        current: T,
        parse: impl Fn(&str) -> Option<T>,
    ) -> T {
        let Some(value) = self.given.get(key) else {
            return default;
        };
        parse(value).unwrap_or_else(|| {
            self.problems.push(Problem {
                key: Cow::Borrowed(key),
                value: (*value).to_owned(),
                expected,
            });
            current
        })
    }

    fn positive<T: TryFrom<u64>>(&mut self, key: &'static str, default: T, current: T) -> T {
        self.read(key, "a whole number above 0", default, current, |v| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .and_then(|n| T::try_from(n).ok())
        })
    }

    fn boolean(&mut self, key: &'static str, default: bool, current: bool) -> bool {
        self.read(key, "true or false", default, current, parse_bool)
    }

    /// One of `options` (names matched in any case); `default` when absent or unusable.
    fn one_of<T: Copy>(
        &mut self,
        key: &'static str,
        expected: &'static str,
        default: T,
        options: &[(&str, T)],
    ) -> T {
        self.read(key, expected, default, default, |v| {
            (options.iter())
                .find(|(name, _)| name.eq_ignore_ascii_case(v))
                .map(|&(_, value)| value)
        })
    }
}

/// `true` or `false`, in any case.
fn parse_bool(value: &str) -> Option<bool> {
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn link_policy_reads_ttls_per_bucket_and_eviction() {
        let (policy, problems) = LinkPolicy::from_link_config(&map(&[
            ("namespace", "sessions"),
            ("ttl_secs", "60"),
            ("ttl_secs.counters", " 5 "),
            ("ttl_secs.forever", "0"),
            ("ttl_secs.", "7"),
            ("ttl_secs.a.b", "9"),
            ("eviction", "LRU"),
        ]));
        assert!(problems.is_empty(), "{problems:?}");
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(policy.ttl("sessions"), secs(60));
        assert_eq!(policy.ttl("counters"), secs(5));
        assert_eq!(
            policy.ttl("Counters"),
            secs(60),
            "bucket names are case-sensitive"
        );
        assert_eq!(policy.ttl("forever"), None);
        assert_eq!(policy.ttl(""), secs(7));
        assert_eq!(policy.ttl("a.b"), secs(9));
        assert!(policy.evicts);
        assert_eq!(
            LinkPolicy::from_link_config(&map(&[])).0,
            LinkPolicy::default()
        );
    }

    #[test]
    fn unusable_link_policy_values_are_reported_and_off() {
        let (policy, problems) = LinkPolicy::from_link_config(&map(&[
            ("ttl_secs", "-1"),
            ("ttl_secs.b", "soon"),
            ("ttl_secs.c", "999999999999"),
            ("eviction", "lfu"),
        ]));
        assert_eq!(policy.ttl("a"), None);
        assert_eq!(policy.ttl("b"), None);
        assert!(!policy.evicts);
        // A bad bucket value never falls back to the link's TTL.
        let (policy, _) =
            LinkPolicy::from_link_config(&map(&[("ttl_secs", "60"), ("ttl_secs.keep", "never")]));
        assert_eq!(policy.ttl("keep"), None);
        assert_eq!(policy.ttl("other"), Some(Duration::from_secs(60)));
        let mut keys: Vec<_> = problems.iter().map(|p| p.key.to_string()).collect();
        keys.sort();
        assert_eq!(keys, ["eviction", "ttl_secs", "ttl_secs.b", "ttl_secs.c"]);
        assert!(
            problems[0].to_string().contains("ignored"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn empty_map_gives_defaults() {
        let (config, problems) = Config::from_map(&HashMap::new(), &Config::default());
        assert_eq!(config, Config::default());
        assert!(problems.is_empty());
    }

    #[test]
    fn values_are_read_case_insensitively_and_trimmed() {
        let (config, problems) = Config::from_map(
            &map(&[
                ("MAX_KEYS", " 10 "),
                ("max_value_bytes", "7"),
                ("max_key_bytes", "8"),
                ("max_total_bytes", "9"),
                ("list_page_size", "2"),
                ("Allow_Unlinked", "TRUE"),
                ("max_request_bytes", "100"),
                ("request_timeout_ms", "250"),
                ("handshake_retry_min_ms", "30"),
                ("max_response_bytes", "11"),
                ("max_inflight_bytes", "12"),
                ("max_concurrent_calls", "13"),
                ("max_listing_bytes", "14"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ]),
            &Config::default(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            config,
            Config {
                limits: Limits {
                    max_key_bytes: 8,
                    max_value_bytes: 7,
                    max_keys: 10,
                    max_total_bytes: 9,
                    list_page_size: 2,
                    max_listing_bytes: 14,
                },
                serving: Serving {
                    allow_unlinked: true,
                    max_request_bytes: 100,
                    request_timeout: Duration::from_millis(250),
                    handshake_retry_min: Duration::from_millis(30),
                    max_response_bytes: 11,
                    max_inflight_bytes: 12,
                    max_concurrent_calls: 13,
                },
            }
        );
    }

    #[test]
    fn bad_values_keep_the_current_value_and_are_reported() {
        let (current, _) = Config::from_map(
            &map(&[("max_keys", "5"), ("allow_unlinked", "true")]),
            &Config::default(),
        );
        let (config, problems) = Config::from_map(
            &map(&[
                ("max_keys", "-1"),
                ("list_page_size", "0"),
                ("allow_unlinked", "yes"),
            ]),
            &current,
        );
        assert_eq!(config.limits.max_keys, 5);
        assert_eq!(
            config.limits.list_page_size,
            Config::default().limits.list_page_size
        );
        assert!(config.serving.allow_unlinked);
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_ref()).collect();
        assert_eq!(keys, vec![MAX_KEYS, LIST_PAGE_SIZE, ALLOW_UNLINKED]);
        assert!(problems[0].to_string().contains("max_keys=\"-1\""));
    }

    #[test]
    fn a_removed_key_returns_to_its_default() {
        let (current, _) = Config::from_map(&map(&[("max_keys", "5")]), &Config::default());
        let (config, _) = Config::from_map(&HashMap::new(), &current);
        assert_eq!(config.limits.max_keys, Config::default().limits.max_keys);
    }

    #[test]
    fn snapshot_settings_come_from_config_and_bad_values_keep_their_defaults() {
        assert_eq!(Snapshots::from_map(&map(&[])), (None, vec![]));
        let (s, problems) = Snapshots::from_map(&map(&[("SNAPSHOT_PATH", "/tmp/x")]));
        let s = s.unwrap();
        assert!(problems.is_empty());
        assert_eq!(s.interval, Duration::from_secs(60));
        assert!(!s.required);
        let (s, problems) = Snapshots::from_map(&map(&[
            ("snapshot_path", "/tmp/x"),
            ("snapshot_interval_secs", "0"),
            ("snapshot_required", "yes"),
        ]));
        let s = s.expect("a bad value does not turn snapshots off");
        assert_eq!(s.interval, Duration::from_secs(60));
        assert!(!s.required);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0]
            .to_string()
            .contains("snapshot_interval_secs=\"0\""));
        assert!(problems[1]
            .to_string()
            .contains("snapshot_required=\"yes\""));
    }

    #[test]
    fn replication_is_off_unless_asked_and_bad_values_keep_their_defaults() {
        assert_eq!(Replication::from_map(&map(&[])).unwrap().0, None);
        let none = Replication::from_map(&map(&[("replication", "none")]));
        assert_eq!(none.unwrap().0, None);
        // A typo is not taken for "off": this instance would part from its peers.
        let refused = Replication::from_map(&map(&[("replication", "jetstraem")]));
        assert!(refused.unwrap_err().to_string().contains("jetstraem"));
        let (on, problems) = Replication::from_map(&map(&[
            ("REPLICATION", "JetStream"),
            ("jetstream_storage", "memory"),
            ("jetstream_replicas", "3"),
            ("read_consistency", "local"),
            ("jetstream_prefix", "a.b"),
            ("jetstream_tombstone_secs", "5"),
        ]))
        .unwrap();
        let on = on.unwrap();
        assert!(!on.file_storage);
        assert_eq!(on.replicas, 3);
        assert_eq!(on.reads, ReadConsistency::Local);
        // A dot would split the stream's subjects; too short a marker life would lose deletes.
        assert_eq!(on.prefix, Replication::DEFAULT_PREFIX);
        assert_eq!(on.tombstone, Replication::DEFAULT_TOMBSTONE);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let (defaults, _) = Replication::from_map(&map(&[("replication", "jetstream")])).unwrap();
        let defaults = defaults.unwrap();
        assert!(defaults.file_storage);
        assert_eq!(defaults.reads, ReadConsistency::Linearizable);
        assert_eq!(defaults.max_bytes, None);
    }

    #[test]
    fn otel_keys_override_the_hosts_otel_config_case_insensitively() {
        let host = OtelConfig::default();
        let otel = otel_config(
            &host,
            &map(&[
                ("otel_exporter_otlp_endpoint", "http://127.0.0.1:4318"),
                ("OTEL_TRACES_SAMPLER", "always_on"),
                ("max_keys", "5"),
            ]),
        );
        assert_eq!(
            otel.observability_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        assert_eq!(otel.traces_sampler.as_deref(), Some("always_on"));
        assert_eq!(otel.traces_endpoint, host.traces_endpoint);
    }

    #[test]
    fn a_link_without_a_namespace_gets_the_components_own() {
        assert_eq!(
            &*link_namespace(&map(&[]), "c1"),
            &*links::component_namespace("c1")
        );
        assert_eq!(
            &*link_namespace(&map(&[("namespace", " shared ")]), "c1"),
            &*links::named_namespace("shared")
        );
        assert_eq!(
            &*link_namespace(&map(&[("namespace", " ")]), "c1"),
            &*links::component_namespace("c1")
        );
    }

    #[test]
    fn watch_link_settings_read_with_defaults_and_bounds() {
        let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (s, problems) = WatchSettings::from_link_config(&map(&[]));
        assert!(problems.is_empty() && s.rules.is_empty());
        assert_eq!(s.bounds, WatchSettings::DEFAULT_BOUNDS);
        let (s, problems) = WatchSettings::from_link_config(&map(&[
            ("Watch", "SET@a,BAD@b"),
            (LINK_WATCH_QUEUE, "5"),
            (LINK_WATCH_QUEUE_BYTES, "0"),
            (LINK_WATCH_TIMEOUT_MS, "soon"),
        ]));
        assert_eq!(s.rules.len(), 1);
        assert_eq!(s.bounds.max_events, 5);
        assert_eq!(s.bounds.max_bytes, WatchSettings::DEFAULT_BOUNDS.max_bytes);
        assert_eq!(s.bounds.timeout, WatchSettings::DEFAULT_BOUNDS.timeout);
        let keys: Vec<&str> = problems.iter().map(|p| &*p.key).collect();
        assert_eq!(
            keys,
            [LINK_WATCH, LINK_WATCH_QUEUE_BYTES, LINK_WATCH_TIMEOUT_MS]
        );
    }
}
