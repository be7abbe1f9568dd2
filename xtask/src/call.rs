//! `cargo xtask call`: one wRPC call to a running provider, as a linked component makes it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use keyvalue_inmemory::client::{atomics, batch, component_headers, store, Transport};

/// Calls the provider; prints the answer.
#[derive(clap::Args)]
pub struct Args {
    /// The NATS server of the lattice.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Lattice name.
    #[arg(long, default_value = "default")]
    lattice: String,
    /// The provider's key in the lattice.
    #[arg(long, default_value = "keyvalue-inmemory")]
    provider_key: String,
    /// The calling component (the `source-id` header).
    #[arg(long, default_value = "demo-component")]
    source: String,
    /// The link name (the `link-name` header).
    #[arg(long, default_value = "default")]
    link_name: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
    #[command(subcommand)]
    op: Op,
}

#[derive(clap::Subcommand)]
enum Op {
    /// store.get BUCKET KEY
    Get { bucket: String, key: String },
    /// store.set BUCKET KEY VALUE (the value as UTF-8 text)
    Set {
        bucket: String,
        key: String,
        value: String,
    },
    /// store.delete BUCKET KEY
    Delete { bucket: String, key: String },
    /// store.exists BUCKET KEY
    Exists { bucket: String, key: String },
    /// store.list-keys BUCKET [CURSOR]
    ListKeys { bucket: String, cursor: Option<u64> },
    /// atomics.increment BUCKET KEY DELTA
    Increment {
        bucket: String,
        key: String,
        delta: u64,
    },
    /// batch.get-many BUCKET KEY...
    GetMany { bucket: String, keys: Vec<String> },
    /// The provider's health answer
    Health,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(call(args))
}

async fn call(args: Args) -> anyhow::Result<ExitCode> {
    let nats = async_nats::connect(&args.nats)
        .await
        .with_context(|| format!("cannot connect to {}", args.nats))?;
    let kv = Transport::new(nats.clone(), &args.lattice, &args.provider_key);
    let cx = Some(component_headers(&args.source, &args.link_name));
    let limit = Duration::from_secs(args.timeout);
    let timed =
        |what: &'static str| move |_| anyhow::anyhow!("no answer to {what} within the timeout");
    let answer: Result<String, store::Error> = match args.op {
        Op::Get { bucket, key } => tokio::time::timeout(limit, store::get(&kv, cx, &bucket, &key))
            .await
            .map_err(timed("get"))??
            .map(|v| match v {
                Some(v) => String::from_utf8_lossy(&v).into_owned(),
                None => "(none)".into(),
            }),
        Op::Set { bucket, key, value } => {
            tokio::time::timeout(limit, store::set(&kv, cx, &bucket, &key, &value.into()))
                .await
                .map_err(timed("set"))??
                .map(|()| "ok".into())
        }
        Op::Delete { bucket, key } => {
            tokio::time::timeout(limit, store::delete(&kv, cx, &bucket, &key))
                .await
                .map_err(timed("delete"))??
                .map(|()| "ok".into())
        }
        Op::Exists { bucket, key } => {
            tokio::time::timeout(limit, store::exists(&kv, cx, &bucket, &key))
                .await
                .map_err(timed("exists"))??
                .map(|b| b.to_string())
        }
        Op::ListKeys { bucket, cursor } => {
            tokio::time::timeout(limit, store::list_keys(&kv, cx, &bucket, cursor))
                .await
                .map_err(timed("list-keys"))??
                .map(|page| format!("{:?} cursor={:?}", page.keys, page.cursor))
        }
        Op::Increment { bucket, key, delta } => {
            tokio::time::timeout(limit, atomics::increment(&kv, cx, &bucket, &key, delta))
                .await
                .map_err(timed("increment"))??
                .map(|n| n.to_string())
        }
        Op::GetMany { bucket, keys } => {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            tokio::time::timeout(limit, batch::get_many(&kv, cx, &bucket, &keys))
                .await
                .map_err(timed("get-many"))??
                .map(|values| {
                    values
                        .into_iter()
                        .map(|v| match v {
                            Some((k, v)) => format!("{k}={}", String::from_utf8_lossy(&v)),
                            None => "(none)".into(),
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
        }
        Op::Health => {
            let subject = format!("wasmbus.rpc.{}.{}.health", args.lattice, args.provider_key);
            let reply = tokio::time::timeout(limit, nats.request(subject, "{}".into()))
                .await
                .map_err(timed("health"))??;
            Ok(String::from_utf8_lossy(&reply.payload).into_owned())
        }
    };
    match answer {
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("error answer: {err:?}");
            Ok(ExitCode::FAILURE)
        }
    }
}
