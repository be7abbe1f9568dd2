//! `cargo xtask call`: one wRPC call to a running provider, as a linked component makes it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use keyvalue_inmemory::client::{atomics, batch, component_headers, store, Transport};

use crate::flags;

pub fn run(args: flags::Call) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(call(args))
}

async fn call(args: flags::Call) -> anyhow::Result<ExitCode> {
    let nats = async_nats::connect(&args.nats)
        .await
        .with_context(|| format!("cannot connect to {}", args.nats))?;
    let kv = Transport::new(nats.clone(), &args.lattice, &args.provider_key);
    let cx = Some(component_headers(&args.source, &args.link_name));
    let limit = Duration::from_secs(args.timeout);
    let timed =
        |what: &'static str| move |_| anyhow::anyhow!("no answer to {what} within the timeout");
    let answer: Result<String, store::Error> = match args.op {
        flags::Op::Get { bucket, key } => {
            tokio::time::timeout(limit, store::get(&kv, cx, &bucket, &key))
                .await
                .map_err(timed("get"))??
                .map(|v| match v {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None => "(none)".into(),
                })
        }
        flags::Op::Set { bucket, key, value } => {
            tokio::time::timeout(limit, store::set(&kv, cx, &bucket, &key, &value.into()))
                .await
                .map_err(timed("set"))??
                .map(|()| "ok".into())
        }
        flags::Op::Delete { bucket, key } => {
            tokio::time::timeout(limit, store::delete(&kv, cx, &bucket, &key))
                .await
                .map_err(timed("delete"))??
                .map(|()| "ok".into())
        }
        flags::Op::Exists { bucket, key } => {
            tokio::time::timeout(limit, store::exists(&kv, cx, &bucket, &key))
                .await
                .map_err(timed("exists"))??
                .map(|b| b.to_string())
        }
        flags::Op::ListKeys { bucket, cursor } => {
            tokio::time::timeout(limit, store::list_keys(&kv, cx, &bucket, cursor))
                .await
                .map_err(timed("list-keys"))??
                .map(|page| format!("{:?} cursor={:?}", page.keys, page.cursor))
        }
        flags::Op::Increment { bucket, key, delta } => {
            tokio::time::timeout(limit, atomics::increment(&kv, cx, &bucket, &key, delta))
                .await
                .map_err(timed("increment"))??
                .map(|n| n.to_string())
        }
        flags::Op::GetMany { bucket, keys } => {
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
        flags::Op::Health => {
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
