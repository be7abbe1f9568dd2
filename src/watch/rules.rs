//! The `watch` link config: which changes a watcher is told of.
//!
//! A comma-separated list of rules, as the Redis provider reads it (`SET@key,DEL@key`), with
//! a prefix form and a bucket qualifier:
//!
//! | rule | tells of |
//! |---|---|
//! | `SET@user:1` | writes of key `user:1`, in any bucket |
//! | `DEL@user:1` | removals of key `user:1` (delete, delete-many, expiry, eviction) |
//! | `SET@user:*` | writes of every key starting with `user:` |
//! | `SET@*` | every write |
//! | `DEL:sessions@*` | removals of every key of bucket `sessions` only (`DEL:@*`: bucket `""`) |
//!
//! The event name is `SET` or `DEL`, in any case. A `*` ending the key makes it a prefix; a `*`
//! anywhere else is refused (kept for patterns later). `\` takes the next character as it is:
//! `\,`, `\@`, `\*`, `\\` put a comma, an at sign, a star or a backslash in a key or bucket
//! name. Spaces around a rule are ignored, inside it they count. A rule that cannot be read is
//! reported and left out; the others apply.

use std::borrow::Cow;

use crate::config::{Problem, LINK_WATCH};

/// Most rules one watch link may have: each write of a watched namespace is matched against
/// them all, on the write path.
pub const MAX_RULES: usize = 256;

/// What a rule tells of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Set,
    Delete,
}

/// One rule: an event, an optional bucket and a key or key prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub event: Event,
    /// `None`: any bucket.
    pub bucket: Option<String>,
    pub key: String,
    /// `key` is a prefix (the rule ended in `*`).
    pub prefix: bool,
}

impl Rule {
    fn matches(&self, event: Event, bucket: &str, key: &str) -> bool {
        self.event == event
            && self.bucket.as_deref().is_none_or(|b| b == bucket)
            && match self.prefix {
                true => key.starts_with(&self.key),
                false => key == self.key,
            }
    }
}

/// A watch link's rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules(Vec<Rule>);

impl Rules {
    /// Reads a `watch` value; what cannot be read is reported and left out.
    pub fn parse(text: &str) -> (Rules, Vec<Problem>) {
        let mut rules = Vec::new();
        let mut problems = Vec::new();
        for entry in split_unescaped(text, ',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            if rules.len() == MAX_RULES {
                problems.push(problem(entry, "at most 256 rules; the rest are left out"));
                break;
            }
            match parse_rule(entry) {
                Ok(rule) => rules.push(rule),
                Err(expected) => problems.push(problem(entry, expected)),
            }
        }
        (Rules(rules), problems)
    }

    /// Whether a change of `key` in `bucket` is one to tell of.
    pub fn matches(&self, event: Event, bucket: &str, key: &str) -> bool {
        self.0.iter().any(|rule| rule.matches(event, bucket, key))
    }

    /// Whether no rule applies (nothing will be told).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many rules apply.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

fn problem(entry: &str, expected: &'static str) -> Problem {
    Problem {
        key: Cow::Borrowed(LINK_WATCH),
        value: entry.to_owned(),
        expected,
    }
}

/// `EVENT[:BUCKET]@KEY[*]`.
fn parse_rule(entry: &str) -> Result<Rule, &'static str> {
    const EXPECTED: &str = "SET@key, DEL@key, SET@prefix*, or SET:bucket@key";
    let name_end = (entry.find([':', '@'])).ok_or(EXPECTED)?;
    let event = match entry[..name_end].to_ascii_uppercase().as_str() {
        "SET" => Event::Set,
        "DEL" => Event::Delete,
        _ => return Err("an event SET or DEL before @ (SET@key, DEL@key)"),
    };
    let rest = &entry[name_end..];
    let (bucket, key) = match rest.strip_prefix(':') {
        Some(qualified) => {
            let mut parts = split_unescaped(qualified, '@');
            let bucket = parts.next().unwrap_or_default();
            let key = parts.next().ok_or(EXPECTED)?;
            if parts.next().is_some() {
                return Err("one @ between bucket and key; write \\@ for an @ in a name");
            }
            match unescape(bucket)? {
                (_, true) => return Err("no * in a bucket name; write \\* for a star"),
                (bucket, false) => (Some(bucket), key),
            }
        }
        None => (None, &rest[1..]),
    };
    if bucket.is_none() && split_unescaped(key, '@').nth(1).is_some() {
        return Err("one @ before the key; write \\@ for an @ in a key");
    }
    let (key, star) = unescape(key)?;
    Ok(Rule {
        event,
        bucket,
        key,
        prefix: star,
    })
}

/// Splits `text` at each `sep` that no `\` escapes; the parts keep their escapes.
fn split_unescaped(text: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut escaped = false;
    let mut start = 0;
    let mut done = false;
    let mut chars = text.char_indices();
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        for (i, c) in chars.by_ref() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, c) if c == sep => {
                    let part = &text[start..i];
                    start = i + c.len_utf8();
                    return Some(part);
                }
                _ => {}
            }
        }
        done = true;
        Some(&text[start..])
    })
}

/// Resolves escapes; answers the text and whether it ended in an unescaped `*`.
fn unescape(text: &str) -> Result<(String, bool), &'static str> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next().ok_or("a character after \\")?),
            '*' if chars.peek().is_none() => return Ok((out, true)),
            '*' => return Err("* only at the end (a prefix); write \\* for a star"),
            c => out.push(c),
        }
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(event: Event, bucket: Option<&str>, key: &str, prefix: bool) -> Rule {
        Rule {
            event,
            bucket: bucket.map(str::to_owned),
            key: key.to_owned(),
            prefix,
        }
    }

    #[test]
    fn the_redis_providers_syntax_reads_as_it_does_there() {
        let (rules, problems) = Rules::parse("SET@counter,DEL@session");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            rules.0,
            [
                rule(Event::Set, None, "counter", false),
                rule(Event::Delete, None, "session", false)
            ]
        );
        assert!(rules.matches(Event::Set, "any", "counter"));
        assert!(!rules.matches(Event::Delete, "any", "counter"));
        assert!(!rules.matches(Event::Set, "any", "counter2"));
        assert!(rules.matches(Event::Delete, "", "session"));
    }

    #[test]
    fn prefixes_buckets_escapes_and_case() {
        let (rules, problems) =
            Rules::parse(" set@user:* , Del:sessions@* ,SET:@k,SET@a\\,b\\@c\\*,DEL:x\\@y@ü*");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            rules.0,
            [
                rule(Event::Set, None, "user:", true),
                rule(Event::Delete, Some("sessions"), "", true),
                rule(Event::Set, Some(""), "k", false),
                rule(Event::Set, None, "a,b@c*", false),
                rule(Event::Delete, Some("x@y"), "ü", true),
            ]
        );
        assert!(rules.matches(Event::Set, "b", "user:1"));
        assert!(!rules.matches(Event::Set, "b", "use"));
        assert!(rules.matches(Event::Delete, "sessions", "anything"));
        assert!(!rules.matches(Event::Delete, "other", "anything"));
        assert!(rules.matches(Event::Set, "", "k") && !rules.matches(Event::Set, "b", "k"));
        assert!(rules.matches(Event::Set, "b", "a,b@c*"));
        assert!(rules.matches(Event::Delete, "x@y", "über"));
    }

    #[test]
    fn what_cannot_be_read_is_reported_and_the_rest_applies() {
        let (rules, problems) =
            Rules::parse("PUT@k,SET,SET@a*b,SET@k\\,SET:b@c@d,SET@x@y,SET:b*@k,SET@ok,,");
        let bad: Vec<&str> = problems.iter().map(|p| p.value.as_str()).collect();
        assert_eq!(
            bad,
            [
                "PUT@k",
                "SET",
                "SET@a*b",
                "SET@k\\,SET:b@c@d",
                "SET@x@y",
                "SET:b*@k"
            ]
        );
        assert!(problems.iter().all(|p| p.key == LINK_WATCH));
        assert_eq!(rules.0, [rule(Event::Set, None, "ok", false)]);
        assert!(Rules::parse("").0.is_empty());
    }

    #[test]
    fn rules_are_bounded() {
        let text = vec!["SET@k"; MAX_RULES + 10].join(",");
        let (rules, problems) = Rules::parse(&text);
        assert_eq!(rules.len(), MAX_RULES);
        assert_eq!(problems.len(), 1);
    }
}
