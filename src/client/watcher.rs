//! A stand-in for a component that exports `wrpc:keyvalue/watcher@0.2.0-draft`, for tests and
//! the benchmarks: it serves `on-set` and `on-delete` on `{lattice}.{component}` straight over
//! NATS and hands over what it heard, in arrival order. It answers as the host's wRPC server
//! does (a handshake, then the empty results closed by an empty message), or, while stalled,
//! not at all: the caller's call then waits until it gives up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::{Buf as _, Bytes};
use futures::StreamExt as _;
use tokio::sync::mpsc;

/// The watcher interface, as it appears in invocation subjects.
pub const INSTANCE: &str = "wrpc:keyvalue/watcher@0.2.0-draft";

/// One call heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    /// The `bucket` argument as sent.
    pub bucket: String,
    pub key: String,
    /// `Some`: `on-set` with this value; `None`: `on-delete`.
    pub value: Option<Vec<u8>>,
    /// The invocation's headers (`traceparent`, `source-id`, …).
    pub headers: Vec<(String, String)>,
}

impl Heard {
    /// The value of header `name`, if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The serving stand-in; stops serving when dropped.
pub struct Watcher {
    heard: mpsc::UnboundedReceiver<Heard>,
    /// Calls heard so far.
    count: Arc<AtomicU64>,
    stalled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// Serves component `component` of `lattice`, keeping every call heard for [`Watcher::next`];
    /// subscribed when this returns.
    pub async fn serve(
        nats: async_nats::Client,
        lattice: &str,
        component: &str,
    ) -> anyhow::Result<Self> {
        Self::serve_keeping(nats, lattice, component, true).await
    }

    /// Serves like [`Watcher::serve`], only counting the calls ([`Watcher::count`]): for
    /// loads whose calls nobody reads.
    pub async fn serve_counting(
        nats: async_nats::Client,
        lattice: &str,
        component: &str,
    ) -> anyhow::Result<Self> {
        Self::serve_keeping(nats, lattice, component, false).await
    }

    async fn serve_keeping(
        nats: async_nats::Client,
        lattice: &str,
        component: &str,
        keep: bool,
    ) -> anyhow::Result<Self> {
        let subject = format!("{lattice}.{component}.wrpc.0.0.1.{INSTANCE}.*");
        let mut calls = nats.subscribe(subject).await?;
        nats.flush().await?;
        let (tx, heard) = mpsc::unbounded_channel();
        let stalled = Arc::new(AtomicBool::new(false));
        let stall = Arc::clone(&stalled);
        let count = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&count);
        let task = tokio::spawn(async move {
            while let Some(msg) = calls.next().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let set = msg.subject.ends_with(".on-set");
                let Ok(call) = decode(msg.payload.clone(), set) else {
                    continue;
                };
                let headers = (msg.headers.iter().flat_map(|h| h.iter()))
                    .flat_map(|(name, values)| {
                        let name = name.to_string();
                        values.iter().map(move |v| (name.clone(), v.to_string()))
                    })
                    .collect();
                let (bucket, key, value) = call;
                if keep
                    && tx
                        .send(Heard {
                            bucket,
                            key,
                            value,
                            headers,
                        })
                        .is_err()
                {
                    return;
                }
                if stall.load(Ordering::Relaxed) {
                    continue;
                }
                if let Some(reply) = msg.reply {
                    let server = nats.new_inbox();
                    let _ = (nats.publish_with_reply(reply.clone(), server, Bytes::new())).await;
                    let _ = nats.publish(format!("{reply}.results"), Bytes::new()).await;
                }
            }
        });
        Ok(Self {
            heard,
            count,
            stalled,
            task,
        })
    }

    /// Calls heard so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops answering calls (they are still heard) or answers them again.
    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Relaxed);
    }

    /// The next call heard, waiting up to `limit`.
    pub async fn next(&mut self, limit: std::time::Duration) -> Option<Heard> {
        tokio::time::timeout(limit, self.heard.recv()).await.ok()?
    }

    /// Every call heard so far, without waiting.
    pub fn drain(&mut self) -> Vec<Heard> {
        let mut all = Vec::new();
        while let Ok(heard) = self.heard.try_recv() {
            all.push(heard);
        }
        all
    }
}

/// `(bucket, key, value)` of an `on-set` (`set`) or `(bucket, key)` of an `on-delete`.
type Params = (String, String, Option<Vec<u8>>);

fn decode(mut payload: Bytes, set: bool) -> anyhow::Result<Params> {
    let bucket = String::from_utf8(field(&mut payload)?)?;
    let key = String::from_utf8(field(&mut payload)?)?;
    let value = match set {
        true => Some(field(&mut payload)?),
        false => None,
    };
    Ok((bucket, key, value))
}

/// One length-prefixed (LEB128) string or byte list.
fn field(payload: &mut Bytes) -> anyhow::Result<Vec<u8>> {
    let mut len = 0u64;
    for shift in (0..35).step_by(7) {
        let byte = *payload.first().context("truncated length")?;
        payload.advance(1);
        len |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            let len = usize::try_from(len)?;
            if payload.len() < len {
                bail!("truncated field");
            }
            return Ok(payload.split_to(len).to_vec());
        }
    }
    bail!("length too long")
}
