//! The floors the provider is measured against, each a process of its own:
//! - a minimal wRPC server of the same WIT on the host's stack (wrpc-transport-nats 0.29, the
//!   `serve` function wit-bindgen-wrpc generates, one task per invocation, a DashMap and
//!   nothing else): what any provider on this stack could reach at best;
//! - a raw NATS request/reply echo: what NATS itself costs.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt as _;
use keyvalue_inmemory::bindings::exports::wrpc::keyvalue::{atomics, batch, store};

type Cx = Option<async_nats::HeaderMap>;
type Answer<T> = anyhow::Result<Result<T, store::Error>>;

/// The trivial handler: no namespaces, no limits, no telemetry.
#[derive(Clone, Default)]
struct Floor {
    map: Arc<DashMap<String, Bytes>>,
}

impl store::Handler<Cx> for Floor {
    async fn get(&self, _: Cx, _bucket: String, key: String) -> Answer<Option<Bytes>> {
        Ok(Ok(self.map.get(&key).map(|v| v.clone())))
    }
    async fn set(&self, _: Cx, _bucket: String, key: String, value: Bytes) -> Answer<()> {
        self.map.insert(key, value);
        Ok(Ok(()))
    }
    async fn delete(&self, _: Cx, _bucket: String, key: String) -> Answer<()> {
        self.map.remove(&key);
        Ok(Ok(()))
    }
    async fn exists(&self, _: Cx, _bucket: String, key: String) -> Answer<bool> {
        Ok(Ok(self.map.contains_key(&key)))
    }
    async fn list_keys(
        &self,
        _: Cx,
        _bucket: String,
        _cursor: Option<u64>,
    ) -> Answer<store::KeyResponse> {
        Ok(Ok(store::KeyResponse {
            keys: self.map.iter().map(|e| e.key().clone()).collect(),
            cursor: None,
        }))
    }
}

impl atomics::Handler<Cx> for Floor {
    async fn increment(&self, _: Cx, _bucket: String, key: String, delta: u64) -> Answer<u64> {
        let mut entry = self
            .map
            .entry(key)
            .or_insert_with(|| Bytes::from_static(b"0"));
        let n = std::str::from_utf8(&entry)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            + delta;
        *entry = Bytes::from(n.to_string());
        Ok(Ok(n))
    }
}

impl batch::Handler<Cx> for Floor {
    async fn get_many(
        &self,
        _: Cx,
        _bucket: String,
        keys: Vec<String>,
    ) -> Answer<Vec<Option<(String, Bytes)>>> {
        Ok(Ok(keys
            .into_iter()
            .map(|k| {
                let v = self.map.get(&k).map(|v| v.clone());
                v.map(|v| (k, v))
            })
            .collect()))
    }
    async fn set_many(&self, _: Cx, _bucket: String, pairs: Vec<(String, Bytes)>) -> Answer<()> {
        for (k, v) in pairs {
            self.map.insert(k, v);
        }
        Ok(Ok(()))
    }
    async fn delete_many(&self, _: Cx, _bucket: String, keys: Vec<String>) -> Answer<()> {
        for k in keys {
            self.map.remove(&k);
        }
        Ok(Ok(()))
    }
}

/// Serves the minimal wRPC server on `{lattice}.{key}` until killed.
pub async fn serve_wrpc(nats_url: &str, prefix: &str) -> anyhow::Result<()> {
    let nats = async_nats::connect(nats_url).await?;
    let prefix: Arc<str> = Arc::from(prefix);
    let client =
        wrpc_transport_nats::Client::new(nats.clone(), Arc::clone(&prefix), Some(prefix)).await?;
    let invocations = keyvalue_inmemory::bindings::serve(&client, Floor::default()).await?;
    nats.flush().await?;
    println!("ready");
    let mut all = futures::stream::select_all(invocations.into_iter().map(|(_, _, s)| s));
    while let Some(accepted) = all.next().await {
        if let Ok(call) = accepted {
            tokio::spawn(async move {
                let _ = call.await;
            });
        }
    }
    Ok(())
}

/// Answers every request on `subject` with its own payload until killed.
pub async fn serve_echo(nats_url: &str, subject: &str) -> anyhow::Result<()> {
    let nats = async_nats::connect(nats_url).await?;
    let mut requests = nats.subscribe(subject.to_owned()).await?;
    nats.flush().await?;
    println!("ready");
    while let Some(msg) = requests.next().await {
        if let Some(reply) = msg.reply {
            let nats = nats.clone();
            tokio::spawn(async move {
                let _ = nats.publish(reply, msg.payload).await;
            });
        }
    }
    Ok(())
}
