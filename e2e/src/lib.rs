//! Real-lattice harness for tests/lattice.rs: a wasmCloud 1.x host (the `wasmcloud-host`
//! library inside host 1.9.2) on a nats-server of the test's own, driven through the control
//! interface like `wash` drives it, with the driver component of [`component`].
//!
//! Every control request and every wait is bounded; [`Lattice::stop`] stops the provider
//! (graceful shutdown request), the components and the host.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures::StreamExt as _;
use wasmcloud_control_interface::{Client as CtlClient, ClientBuilder, Link};
use wasmcloud_host::wasmbus::Host;
use wasmcloud_host::WasmbusHostConfig;

pub mod component;

/// Client bindings of the driver's `kv` interface, called over wRPC through the host.
pub mod driver {
    wit_bindgen_wrpc::generate!({
        world: "test:driver/caller",
        path: "wit",
        additional_derives: [PartialEq, Eq],
    });
    pub use test::driver::kv;
}

/// How long one control request or wait may take.
pub const WAIT: Duration = Duration::from_secs(30);

type Shutdown = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A host joined to a lattice, and a control-interface client of that lattice.
pub struct Lattice {
    pub lattice: String,
    pub host_id: String,
    pub nats: async_nats::Client,
    pub ctl: CtlClient,
    host: Arc<Host>,
    shutdown: Option<Shutdown>,
}

fn ctl_err(
    context: &str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{context}: {e}")
}

/// A control response that must say "success".
fn succeeded<T>(
    what: &str,
    response: wasmcloud_control_interface::CtlResponse<T>,
) -> anyhow::Result<()> {
    ensure!(
        response.succeeded(),
        "{what} refused by the host: {}",
        response.message()
    );
    Ok(())
}

/// Retries `probe` every 100 ms until it answers `Some`, for at most [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Lattice {
    /// Starts a host on `nats_url` (control and RPC) in `lattice`, with file loading allowed
    /// and 256 MiB of linear memory per component (the default is too small for real ones).
    pub async fn start(nats_url: &str, lattice: &str) -> anyhow::Result<Self> {
        let host_key = Arc::new(nkeys::KeyPair::new_server());
        let host_id = host_key.public_key();
        let url = url::Url::parse(nats_url)?;
        let config = WasmbusHostConfig {
            ctl_nats_url: url.clone(),
            rpc_nats_url: url,
            lattice: lattice.into(),
            host_key: Some(host_key),
            allow_file_load: true,
            max_linear_memory: 256 << 20,
            rpc_timeout: Duration::from_secs(10),
            provider_shutdown_delay: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let (host, shutdown) = tokio::time::timeout(WAIT, Host::new(config))
            .await
            .context("the host did not start in time")?
            .context("the host did not start")?;
        let nats = async_nats::connect(nats_url).await?;
        let ctl = ClientBuilder::new(nats.clone())
            .lattice(lattice)
            .timeout(WAIT)
            .build();
        Ok(Self {
            lattice: lattice.into(),
            host_id,
            nats,
            ctl,
            host,
            shutdown: Some(Box::pin(shutdown)),
        })
    }

    /// Named config, as `wash config put`.
    pub async fn put_config(&self, name: &str, values: &[(&str, &str)]) -> anyhow::Result<()> {
        let values: HashMap<String, String> = values
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let response = self
            .ctl
            .put_config(name, values)
            .await
            .map_err(ctl_err("put config"))?;
        succeeded("put config", response)
    }

    /// Asks the provider for its health over the control subject the host uses.
    pub async fn provider_health(&self, provider_id: &str) -> Option<String> {
        let subject = format!("wasmbus.rpc.{}.{provider_id}.health", self.lattice);
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            self.nats.request(subject, "{}".into()),
        )
        .await
        .ok()?
        .ok()?;
        let health: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        (health["healthy"] == true).then(|| health["message"].as_str().unwrap_or("").to_string())
    }

    /// Starts a provider from a provider archive file and waits until it answers health.
    pub async fn start_provider(
        &self,
        par: &Path,
        provider_id: &str,
        config: &[&str],
    ) -> anyhow::Result<String> {
        let reference = format!("file://{}", par.display());
        let response = self
            .ctl
            .start_provider(
                &self.host_id,
                &reference,
                provider_id,
                None,
                config.iter().map(|c| c.to_string()).collect(),
            )
            .await
            .map_err(ctl_err("start provider"))?;
        succeeded("start provider", response)?;
        wait_for("the provider to answer health", || {
            self.provider_health(provider_id)
        })
        .await
    }

    /// Runs a component from a `.wasm` file (as `wash start component file://…`) and waits
    /// until the host lists it.
    pub async fn scale_component(&self, wasm: &Path, component_id: &str) -> anyhow::Result<()> {
        self.scale_component_to(wasm, component_id, 16).await
    }

    /// Like [`Lattice::scale_component`], allowing at most `max_instances` instances of the
    /// component to run at once (a wadm manifest's `instances`).
    pub async fn scale_component_to(
        &self,
        wasm: &Path,
        component_id: &str,
        max_instances: u32,
    ) -> anyhow::Result<()> {
        let reference = format!("file://{}", wasm.display());
        // The host scales in a task of its own after it answered: a running component gets a
        // new set of instances, then the old set is stopped (`exports.abort()` in
        // wasmcloud-host 0.27.1), and the invocations the old set had taken but not started
        // are lost. Calls sent before that are over can vanish; the host's `component_scaled`
        // event comes once it is.
        let mut events = self
            .nats
            .subscribe(format!("wasmbus.evt.{}.>", self.lattice))
            .await?;
        let response = self
            .ctl
            .scale_component(
                &self.host_id,
                &reference,
                component_id,
                max_instances,
                Some(BTreeMap::new()),
                Vec::new(),
                false,
            )
            .await
            .map_err(ctl_err("scale component"))?;
        succeeded("scale component", response)?;
        tokio::time::timeout(WAIT, async {
            while let Some(event) = events.next().await {
                let Ok(event) = serde_json::from_slice::<serde_json::Value>(&event.payload) else {
                    continue;
                };
                let data = &event["data"];
                if data["component_id"] != component_id {
                    continue;
                }
                match event["type"].as_str().unwrap_or("") {
                    kind if kind.ends_with("component_scaled")
                        && data["max_instances"] == max_instances =>
                    {
                        return Ok(());
                    }
                    kind if kind.ends_with("component_scale_failed") => {
                        bail!("the host could not scale {component_id}: {data}")
                    }
                    _ => {}
                }
            }
            bail!("the lattice's event subscription ended")
        })
        .await
        .with_context(|| format!("no component_scaled event for {component_id} in {WAIT:?}"))?
    }

    /// Links `source` to `target` on `wasi:keyvalue` `[store, atomics, batch]`, the link's
    /// target config naming the provider-side settings (e.g. `namespace`).
    pub async fn link_keyvalue(
        &self,
        source: &str,
        target: &str,
        target_config: &[&str],
    ) -> anyhow::Result<()> {
        let interfaces = ["store", "atomics", "batch"];
        self.put_keyvalue_link(source, target, &interfaces, &[], target_config)
            .await
    }

    /// Links the provider `source` to component `target` on `wasi:keyvalue` `[watcher]`, the
    /// link's source config naming the provider-side watch settings (e.g. `watch`).
    pub async fn link_watcher(
        &self,
        source: &str,
        target: &str,
        source_config: &[&str],
    ) -> anyhow::Result<()> {
        self.put_keyvalue_link(source, target, &["watcher"], source_config, &[])
            .await
    }

    /// A `wasi:keyvalue` link named `default`, its configs given as named config names.
    async fn put_keyvalue_link(
        &self,
        source: &str,
        target: &str,
        interfaces: &[&str],
        source_config: &[&str],
        target_config: &[&str],
    ) -> anyhow::Result<()> {
        let names = |names: &[&str]| names.iter().map(|c| c.to_string()).collect();
        let link = Link::builder()
            .source_id(source)
            .target(target)
            .name("default")
            .wit_namespace("wasi")
            .wit_package("keyvalue")
            .interfaces(names(interfaces))
            .source_config(names(source_config))
            .target_config(names(target_config))
            .build()
            .map_err(ctl_err("link"))?;
        let response = self.ctl.put_link(link).await.map_err(ctl_err("put link"))?;
        succeeded("put link", response)
    }

    /// A wRPC transport calling a component's exports through the host.
    pub fn component(&self, component_id: &str) -> keyvalue_inmemory::client::Transport {
        keyvalue_inmemory::client::Transport::new(self.nats.clone(), &self.lattice, component_id)
    }

    /// Stops the provider (the host sends it the graceful shutdown request), then the host.
    /// Everything the host started is a child it kills on drop, so this is also what runs
    /// when a test fails.
    pub async fn stop(mut self, provider_id: &str) -> anyhow::Result<()> {
        let provider = self
            .ctl
            .stop_provider(&self.host_id, provider_id)
            .await
            .map_err(ctl_err("stop provider"));
        if let Some(shutdown) = self.shutdown.take() {
            tokio::time::timeout(WAIT, shutdown)
                .await
                .context("the host did not stop in time")??;
        }
        drop(self.host);
        succeeded("stop provider", provider?)
    }
}
