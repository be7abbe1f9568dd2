//! A wRPC-over-NATS client of the keyvalue interfaces, free of the reply race; used by the
//! tests, `cargo xtask call` and the benchmarks.
//!
//! ```no_run
//! # async fn demo(nats: async_nats::Client) -> anyhow::Result<()> {
//! use keyvalue_inmemory::client::{store, Transport};
//! let kv = Transport::new(nats, "default", "my-provider-key");
//! store::set(&kv, None, "bucket", "key", &"value".into()).await??;
//! # Ok(()) }
//! ```
//!
//! Why not the `wrpc-transport-nats` client: both 0.29 (the host's) and 0.31 route every
//! reply through one demultiplexing task and lose calls under load. Captured here with a NATS
//! subscriber on `>` (see the note on the core issue): for each lost call the provider had
//! published the handshake and both result messages on the client's inbox, and the client
//! never sent its end-of-parameters message, i.e. the client dropped the handshake it had been
//! delivered. This transport subscribes to its result subject with a NATS subscription of its
//! own *before* it publishes the invocation, on the same connection, so the server cannot
//! answer before the subscription exists.
//!
//! Wire protocol (what the server sees is what any wRPC client sends): publish the encoded
//! parameters to `{prefix}.wrpc.0.0.1.{instance}.{func}` with reply subject `R` and headers;
//! the server answers a handshake on `R` (its reply subject `S`) and the encoded results on
//! `R.results`, closed by an empty message; on the handshake we send the end of parameters,
//! an empty message on `S.params`. Parameters must fit one NATS message (asynchronous
//! parameters and results, which no keyvalue function has, are not supported).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use anyhow::{ensure, Context as _};
use bytes::{Buf as _, Bytes};
use futures::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use bindings::wrpc::keyvalue::{atomics, batch, store};

pub mod drops;
pub mod watcher;

/// Client bindings of `wrpc:keyvalue/imports`, generated from `wit/`.
pub mod bindings {
    wit_bindgen_wrpc::generate!({
        world: "wrpc:keyvalue/imports",
        additional_derives: [PartialEq, Eq],
    });
}

/// The transport: a NATS connection and the `{lattice}.{provider}` prefix of the target.
/// Its invocation context is the NATS headers to send (`source-id`, `link-name`, …).
#[derive(Clone, Debug)]
pub struct Transport {
    /// The connection calls go out on.
    pub nats: async_nats::Client,
    /// `{lattice}.{provider_key}`.
    pub prefix: String,
}

impl Transport {
    /// A transport calling provider `provider_key` in `lattice`.
    pub fn new(nats: async_nats::Client, lattice: &str, provider_key: &str) -> Self {
        Self {
            nats,
            prefix: format!("{lattice}.{provider_key}"),
        }
    }
}

/// The headers the 1.x host sends with a component's call.
pub fn component_headers(source_id: &str, link_name: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("source-id", source_id);
    headers.insert("link-name", link_name);
    headers
}

impl wrpc_transport::Invoke for Transport {
    type Context = Option<async_nats::HeaderMap>;
    type Outgoing = NoAsync;
    type Incoming = Results;

    async fn invoke<P>(
        &self,
        cx: Self::Context,
        instance: &str,
        func: &str,
        params: Bytes,
        paths: impl AsRef<[P]> + Send,
    ) -> anyhow::Result<(NoAsync, Results)>
    where
        P: AsRef<[Option<usize>]> + Send + Sync,
    {
        ensure!(
            paths.as_ref().is_empty(),
            "asynchronous results are not supported"
        );
        ensure!(
            params.len() < self.nats.server_info().max_payload,
            "parameters of {} bytes do not fit one NATS message",
            params.len()
        );
        // One subscription for the handshake (on `reply`) and the results (`reply.results`),
        // made before the invocation is published, on the same connection: nothing the server
        // sends can arrive before it.
        let inbox = self.nats.new_inbox();
        let reply = format!("{inbox}.r");
        let sub = self
            .nats
            .subscribe(format!("{inbox}.>"))
            .await
            .context("failed to subscribe to the handshake and results")?;
        let subject = format!("{}.wrpc.0.0.1.{instance}.{func}", self.prefix);
        match cx {
            Some(headers) => {
                self.nats
                    .publish_with_reply_and_headers(subject, reply.clone(), headers, params)
                    .await
            }
            None => {
                self.nats
                    .publish_with_reply(subject, reply.clone(), params)
                    .await
            }
        }
        .context("failed to publish the invocation")?;
        Ok((
            NoAsync,
            Results {
                nats: self.nats.clone(),
                sub,
                handshake: reply,
                confirmed: false,
                buffer: Bytes::new(),
                done: false,
            },
        ))
    }
}

/// An asynchronous parameter or result stream that does not exist: the keyvalue functions
/// have none, and all parameters go with the invocation.
pub struct NoAsync;

impl AsyncWrite for NoAsync {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::Error::other(
            "asynchronous parameters are not supported",
        )))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl wrpc_transport::Index<NoAsync> for NoAsync {
    fn index(&self, _: &[usize]) -> anyhow::Result<NoAsync> {
        anyhow::bail!("asynchronous parameters are not supported")
    }
}

/// The result stream: message payloads in order, ended by an empty message. Reading it also
/// answers the server's handshake with the end of parameters (all of them went with the
/// invocation), which tells the server our subscription is live.
pub struct Results {
    nats: async_nats::Client,
    sub: async_nats::Subscriber,
    handshake: String,
    confirmed: bool,
    buffer: Bytes,
    done: bool,
}

impl AsyncRead for Results {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buffer.is_empty() && !self.done {
            match ready!(self.sub.poll_next_unpin(cx)) {
                // NATS's answer to an invocation nobody serves: fail now, not at the timeout.
                Some(msg) if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "no responders: nothing serves the invoked function",
                    )));
                }
                Some(msg) if msg.subject.as_str() == self.handshake => {
                    if let (false, Some(server)) = (self.confirmed, msg.reply) {
                        self.confirmed = true;
                        let nats = self.nats.clone();
                        tokio::spawn(async move {
                            let _ = nats.publish(format!("{server}.params"), Bytes::new()).await;
                        });
                    }
                }
                Some(msg) if msg.payload.is_empty() => self.done = true,
                Some(msg) => self.buffer = msg.payload,
                None => self.done = true,
            }
        }
        let n = self.buffer.len().min(out.remaining());
        out.put_slice(&self.buffer[..n]);
        self.buffer.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl wrpc_transport::Index<Results> for Results {
    fn index(&self, _: &[usize]) -> anyhow::Result<Results> {
        anyhow::bail!("asynchronous results are not supported")
    }
}
