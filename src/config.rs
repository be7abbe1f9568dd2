//! Provider configuration: typed, with defaults, from the host's string maps.
//!
//! Two sources, merged by the host before we see them:
//! 1. the provider config the host sends in host data (`config`) at start, and
//! 2. `config.update` messages, each carrying the *full* merged map again.
//!
//! Each map is read on top of the defaults, so a key removed from the config returns to its
//! default. A key with a value we cannot use is reported and keeps the value it had (at start:
//! the default): a typo never takes the store down. Keys are matched case-insensitively;
//! keys we do not know (the host passes `OTEL_*` and others through the same map) are ignored.
//!
//! Link config (`target_config` of a link to us) is separate: see [`LINK_NAMESPACE`].

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use crate::engine::Limits;

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

/// Link `target_config` key naming the namespace a link's calls use. Links naming the same
/// namespace share data; without it a component gets a namespace of its own.
pub const LINK_NAMESPACE: &str = "namespace";

/// The provider's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// What the engine enforces.
    pub limits: Limits,
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
            allow_unlinked: false,
            max_request_bytes: 64 << 20,
            request_timeout: Duration::from_secs(10),
            handshake_retry_min: Duration::from_millis(100),
            max_response_bytes: 64 << 20,
            max_inflight_bytes: 256 << 20,
            max_concurrent_calls: 4096,
        }
    }
}

/// A config value that could not be used; the setting kept its previous value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The config key.
    pub key: &'static str,
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

impl Config {
    /// Reads `map` on top of the defaults. A value that cannot be used keeps the value it has
    /// in `current`, and is reported.
    pub fn from_map(map: &HashMap<String, String>, current: &Config) -> (Config, Vec<Problem>) {
        let defaults = Config::default();
        let mut r = Reader {
            given: map
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
                .collect(),
            problems: Vec::new(),
        };
        let (d, c) = (defaults.limits, current.limits);
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
        let config = Config {
            limits,
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
        (config, r.problems)
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads settings out of one config map, collecting what could not be used.
struct Reader<'a> {
    given: HashMap<String, &'a str>,
    problems: Vec<Problem>,
}

impl Reader<'_> {
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
                key,
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
        self.read(key, "true or false", default, current, |v| {
            if v.eq_ignore_ascii_case("true") {
                Some(true)
            } else if v.eq_ignore_ascii_case("false") {
                Some(false)
            } else {
                None
            }
        })
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
                allow_unlinked: true,
                max_request_bytes: 100,
                request_timeout: Duration::from_millis(250),
                handshake_retry_min: Duration::from_millis(30),
                max_response_bytes: 11,
                max_inflight_bytes: 12,
                max_concurrent_calls: 13,
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
        assert!(config.allow_unlinked);
        let keys: Vec<_> = problems.iter().map(|p| p.key).collect();
        assert_eq!(keys, vec![MAX_KEYS, LIST_PAGE_SIZE, ALLOW_UNLINKED]);
        assert!(problems[0].to_string().contains("max_keys=\"-1\""));
    }

    #[test]
    fn a_removed_key_returns_to_its_default() {
        let (current, _) = Config::from_map(&map(&[("max_keys", "5")]), &Config::default());
        let (config, _) = Config::from_map(&HashMap::new(), &current);
        assert_eq!(config.limits.max_keys, Config::default().limits.max_keys);
    }
}
