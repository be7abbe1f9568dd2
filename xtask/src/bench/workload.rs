//! What the benchmark asks: the workloads, one call of each, the keys they read preloaded,
//! and the plan of (workload, concurrency) pairs a run goes through.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use keyvalue_inmemory::client::{atomics, batch, component_headers, store, Transport};

use super::shared::BUCKET;
use crate::flags;

/// One workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    Get(usize),
    Set(usize),
    Increment,
    /// get-many of this many keys.
    GetMany(usize),
    /// set-many of this many 16 B values.
    SetMany(usize),
    Echo,
}

impl Workload {
    pub fn name(self) -> String {
        match self {
            Workload::Get(size) => format!("get {}", size_name(size)),
            Workload::Set(size) => format!("set {}", size_name(size)),
            Workload::Increment => "increment (16 hot keys)".into(),
            Workload::GetMany(n) => format!("get-many {n}"),
            Workload::SetMany(n) => format!("set-many {n}"),
            Workload::Echo => "NATS request/reply".into(),
        }
    }

    /// Key operations per call.
    pub fn keys_per_call(self) -> u64 {
        match self {
            Workload::GetMany(n) | Workload::SetMany(n) => n as u64,
            _ => 1,
        }
    }
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// Keys preloaded for the get workloads of a value size.
pub fn preloaded(size: usize) -> usize {
    if size > 4096 {
        1000
    } else {
        10_000
    }
}

pub async fn one_call(target: &Target, workload: Workload, i: u64) -> anyhow::Result<bool> {
    let wrpc = match target {
        Target::Wrpc(wrpc) => wrpc.as_ref(),
        Target::Echo(nats) => {
            nats.request("bench.echo", Bytes::from_static(b"0123456789abcdef"))
                .await?;
            return Ok(true);
        }
    };
    Ok(match workload {
        Workload::Get(size) => {
            let key = format!("s{size}-k{}", i % preloaded(size) as u64);
            store::get(wrpc, cx(), BUCKET, &key).await?.is_ok()
        }
        Workload::Set(size) => {
            let key = format!("s{size}-k{}", i % preloaded(size) as u64);
            store::set(wrpc, cx(), BUCKET, &key, &Bytes::from(vec![b'v'; size]))
                .await?
                .is_ok()
        }
        Workload::Increment => {
            let key = format!("hot-{}", i % 16);
            atomics::increment(wrpc, cx(), BUCKET, &key, 1)
                .await?
                .is_ok()
        }
        Workload::GetMany(n) => {
            let n = n as u64;
            let keys: Vec<String> = (0..n)
                .map(|j| format!("s16-k{}", (i * n + j) % 10_000))
                .collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            batch::get_many(wrpc, cx(), BUCKET, &keys).await?.is_ok()
        }
        Workload::SetMany(n) => {
            let n = n as u64;
            let keys: Vec<String> = (0..n)
                .map(|j| format!("many-{}", (i * n + j) % 10_000))
                .collect();
            let value = Bytes::from_static(b"0123456789abcdef");
            let pairs: Vec<(&str, &Bytes)> = keys.iter().map(|k| (k.as_str(), &value)).collect();
            batch::set_many(wrpc, cx(), BUCKET, &pairs).await?.is_ok()
        }
        Workload::Echo => unreachable!(),
    })
}

/// Where calls go: a provider (ours, the floor, --compare) or the echo.
#[derive(Clone)]
pub enum Target {
    Wrpc(Arc<wrpc_transport_nats::Client>),
    Echo(async_nats::Client),
}

/// The headers of the one component every benchmark call comes from.
pub fn cx() -> Option<async_nats::HeaderMap> {
    Some(component_headers("bench-component", "default"))
}

/// Value sizes of the get and set workloads.
pub fn sizes(args: &flags::Bench) -> &'static [usize] {
    if args.quick {
        &[16]
    } else {
        &[16, 1024, 65536]
    }
}

/// Preloads the keys the get workloads read into each of `targets` (name, wRPC prefix),
/// through the race-free client.
pub async fn preload(
    nats: &async_nats::Client,
    targets: &[(&str, String)],
    sizes: &[usize],
) -> anyhow::Result<()> {
    for (name, prefix) in targets {
        let kv = Transport {
            nats: nats.clone(),
            prefix: prefix.clone(),
        };
        for &size in sizes {
            let per_call = (256 * 1024 / size).clamp(1, 1000);
            let value = Bytes::from(vec![b'v'; size]);
            let keys: Vec<String> = (0..preloaded(size))
                .map(|i| format!("s{size}-k{i}"))
                .collect();
            for chunk in keys.chunks(per_call) {
                let pairs: Vec<(&str, &Bytes)> =
                    chunk.iter().map(|k| (k.as_str(), &value)).collect();
                tokio::time::timeout(
                    Duration::from_secs(10),
                    batch::set_many(&kv, cx(), BUCKET, &pairs),
                )
                .await
                .with_context(|| format!("preloading {name} timed out"))??
                .map_err(|e| anyhow::anyhow!("preloading {name}: {e:?}"))?;
            }
        }
    }
    Ok(())
}

/// The (workload, concurrency) pairs of a run, as `--quick`, `--only` and `--in-flight` say.
pub fn plan(args: &flags::Bench, sizes: &[usize]) -> anyhow::Result<Vec<(Workload, usize)>> {
    let inflights: &[usize] = if args.quick {
        &[1, 256]
    } else {
        &[1, 16, 64, 256]
    };
    let mut plan: Vec<(Workload, usize)> = Vec::new();
    for &size in sizes {
        for &k in inflights {
            plan.push((Workload::Get(size), k));
            plan.push((Workload::Set(size), k));
        }
    }
    for &k in inflights {
        plan.push((Workload::Increment, k));
        plan.push((Workload::GetMany(100), k));
        plan.push((Workload::SetMany(100), k));
        plan.push((Workload::Echo, k));
    }
    // Per-call overhead against per-key work: the same batch calls, 10× the keys.
    for &k in inflights.iter().filter(|&&k| k >= 16) {
        plan.push((Workload::GetMany(1000), k));
        plan.push((Workload::SetMany(1000), k));
    }
    if let Some(only) = &args.only {
        // A workload's whole name picks it alone ("get-many 100", not "get-many 1000").
        let exact = plan.iter().any(|(w, _)| w.name() == *only);
        plan.retain(|(w, _)| w.name() == *only || (!exact && w.name().contains(only.as_str())));
        anyhow::ensure!(!plan.is_empty(), "--only {only:?} matches no workload");
    }
    if let Some(k) = args.in_flight {
        plan.retain(|&(_, inflight)| inflight == k);
        anyhow::ensure!(
            !plan.is_empty(),
            "--in-flight {k}: not one of the concurrencies run"
        );
    }
    Ok(plan)
}
