//! The report of a run: a Markdown table (printed, and written to target/bench/report.md) and
//! the same figures as JSON (target/bench/report.json).

use keyvalue_inmemory::transport::Figures;
use serde_json::json;

use super::cache::CacheRun;
use super::catchup::CatchUp;
use super::driver::{Phase, Results};
use super::expiry::Expiry;
use super::memory::Memory;
use super::targets::{REPLICATED, REPLICATED_LOCAL};
use super::watch::{Row as WatchRow, Watching, IN_FLIGHT as WATCH_IN_FLIGHT, WATCHING};
use super::workload::Workload;
use crate::flags;
use crate::process::root;

/// Writes and prints the report.
pub fn write(
    args: &flags::Bench,
    results: &Results<'_>,
    memory: &[Memory],
    cache: Option<&CacheRun>,
    expiry: Option<&Expiry>,
    watch: &[WatchRow],
    (lags, catchup): (&[(&str, String)], Option<&CatchUp>),
) -> anyhow::Result<()> {
    let mut md = String::new();
    let mut rows = Vec::new();
    md.push_str(&format!(
        "Command: `cargo xtask bench {}` ({} s a phase, {} rounds, medians; machine: {} cores).\n\n",
        // The options `cargo xtask bench` was given (and passed on to `internal bench-run`).
        std::env::args()
            .skip_while(|arg| arg != "bench-run")
            .skip(1)
            .collect::<Vec<_>>()
            .join(" "),
        args.seconds,
        args.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    md.push_str("| workload | in flight | ours calls/s | floor calls/s | ours / floor | ours p50 / p99 / p999 µs | floor p50 / p99 / p999 µs | key-ops/s (ours) | lost (ours, floor) | handshakes the client dropped (ours, floor) | ours resent / recovered / spurious | other messages the client dropped (ours, floor) |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for ((workload, k), by_target) in results {
        let stat = |name: &str, f: &dyn Fn(&Phase) -> f64| {
            by_target
                .get(name)
                .map(|v| median(v.iter().map(f).collect()))
        };
        // Median of the per-round ratios of two targets' rates.
        let ratio_of = |a: &str, b: &str| match (by_target.get(a), by_target.get(b)) {
            (Some(a), Some(b)) => Some(median(
                a.iter()
                    .zip(b)
                    .map(|(x, y)| x.calls_per_sec() / y.calls_per_sec())
                    .collect(),
            )),
            _ => None,
        };
        let ratio = ratio_of("ours", "floor");
        let main = if *workload == Workload::Echo {
            "echo"
        } else {
            "ours"
        };
        let rate = stat(main, &|p| p.calls_per_sec()).unwrap_or(f64::NAN);
        let floor_rate = stat("floor", &|p| p.calls_per_sec());
        let pct = |name: &str| {
            let p = |q: f64| stat(name, &|ph| ph.percentile(q)).unwrap_or(f64::NAN);
            (p(0.5), p(0.99), p(0.999))
        };
        let (o50, o99, o999) = pct(main);
        let (f50, f99, f999) = pct("floor");
        let sum = |name: &str, f: fn(&Phase) -> u64| {
            by_target
                .get(name)
                .map_or(0, |v| v.iter().map(f).sum::<u64>())
        };
        let lost = |name: &str| sum(name, |p| p.lost);
        let drops = |name: &str| {
            (
                sum(name, |p| p.client_drops.0),
                sum(name, |p| p.client_drops.1),
            )
        };
        // What our provider covered for, over the rounds.
        let covered = (by_target.get(main).into_iter().flatten())
            .filter_map(|p| p.covered)
            .fold(Figures::default(), |total, p| total + p);
        let covered_cell = if *workload == Workload::Echo {
            String::new()
        } else {
            format!(
                "{} / {} / {}",
                covered.resent, covered.recovered, covered.spurious
            )
        };
        md.push_str(&format!(
            "| {} | {k} | {rate:.0} | {} | {} | {o50:.0} / {o99:.0} / {o999:.0} | {} | {:.0} | {}, {} | {}, {} | {covered_cell} | {}, {} |\n",
            workload.name(),
            floor_rate.map_or("".into(), |r| format!("{r:.0}")),
            ratio.map_or("".into(), |r| format!("{r:.2}")),
            if floor_rate.is_some() { format!("{f50:.0} / {f99:.0} / {f999:.0}") } else { String::new() },
            rate * workload.keys_per_call() as f64,
            lost(main),
            lost("floor"),
            drops(main).0,
            drops("floor").0,
            drops(main).1,
            drops("floor").1,
        ));
        let compare = stat("compare", &|p| p.calls_per_sec());
        rows.push(json!({
            "workload": workload.name(), "in_flight": k, "calls_per_sec": rate, "floor_calls_per_sec": floor_rate,
            "ratio_to_floor": ratio, "p50_us": o50, "p99_us": o99, "p999_us": o999,
            "floor_p50_us": f50, "key_ops_per_sec": rate * workload.keys_per_call() as f64,
            "lost": lost(main), "floor_lost": lost("floor"), "compare_calls_per_sec": compare, "ratio_to_compare": ratio_of("ours", "compare"),
            "client_dropped_handshakes": drops(main).0, "floor_client_dropped_handshakes": drops("floor").0,
            "client_dropped_others": drops(main).1, "floor_client_dropped_others": drops("floor").1,
            "handshakes_resent": covered.resent, "calls_recovered": covered.recovered,
            "resends_spurious": covered.spurious,
            "ttl_lru_calls_per_sec": stat("cache", &|p| p.calls_per_sec()),
            "ttl_lru_ratio_to_off": ratio_of("cache", "ours"),
            "jetstream_calls_per_sec": stat(REPLICATED, &|p| p.calls_per_sec()),
            "jetstream_ratio_to_off": ratio_of(REPLICATED, "ours"),
            "jetstream_ratio_to_compare": ratio_of(REPLICATED, "compare"),
            "jetstream_lost": lost(REPLICATED), "jetstream_errors": sum(REPLICATED, |p| p.errors),
            "jetstream_local_calls_per_sec": stat(REPLICATED_LOCAL, &|p| p.calls_per_sec()),
            "jetstream_local_ratio_to_off": ratio_of(REPLICATED_LOCAL, "ours"),
            "jetstream_local_ratio_to_compare": ratio_of(REPLICATED_LOCAL, "compare"),
        }));
        for (name, label) in [
            (REPLICATED, "replication=jetstream"),
            (
                REPLICATED_LOCAL,
                "replication=jetstream, read_consistency=local",
            ),
        ] {
            let Some(c) = stat(name, &|p| p.calls_per_sec()) else {
                continue;
            };
            let (c50, c99, c999) = pct(name);
            let vs_compare = ratio_of(name, "compare")
                .map_or(String::new(), |r| format!("; vs --compare: **{r:.2}**"));
            md.push_str(&format!(
                "| ↳ {label} | {k} | {c:.0} | | vs off: **{:.2}**{vs_compare} | {c50:.0} / {c99:.0} / {c999:.0} | | {:.0} | {} (errors {}) | | | |\n",
                ratio_of(name, "ours").unwrap_or(f64::NAN),
                c * workload.keys_per_call() as f64,
                lost(name),
                sum(name, |p| p.errors),
            ));
        }
        if let Some(c) = stat("cache", &|p| p.calls_per_sec()) {
            let (c50, c99, c999) = pct("cache");
            md.push_str(&format!(
                "| ↳ ttl_secs + eviction=lru on | {k} | {c:.0} | | on / off: **{:.2}** | {c50:.0} / {c99:.0} / {c999:.0} | | | {} | | | |\n",
                ratio_of("cache", "ours").unwrap_or(f64::NAN),
                lost("cache")
            ));
        }
        if let Some(c) = compare {
            let (c50, c99, c999) = pct("compare");
            md.push_str(&format!(
                "| ↳ --compare | {k} | {c:.0} | | ours / compare: **{:.2}** | {c50:.0} / {c99:.0} / {c999:.0} | | {:.0} | {} | | | |\n",
                ratio_of("ours", "compare").unwrap_or(f64::NAN),
                c * workload.keys_per_call() as f64,
                lost("compare")
            ));
        }
    }
    let mut memory_json = Vec::new();
    for m in memory {
        let per_key = (m.rss_after.saturating_sub(m.rss_before)) as f64 / m.keys as f64;
        md.push_str(&format!(
            "\nMemory ({}): {} keys of 16 B with 100 B values: RSS {:.1} MiB → {:.1} MiB, **{per_key:.0} B per key**.  \n\
             list-keys full pass over them (page {}): **{:.2} s** ({} keys listed; first page {:.0} ms, \
             then {:.2} ms a page).\n",
            m.label,
            m.keys,
            m.rss_before as f64 / 1048576.0,
            m.rss_after as f64 / 1048576.0,
            m.page_size,
            m.list_seconds,
            m.listed,
            m.first_page_seconds * 1e3,
            (m.list_seconds - m.first_page_seconds) * 1e3
                / (m.listed.div_ceil(m.page_size).saturating_sub(1).max(1)) as f64,
        ));
        memory_json.push(json!({ "link": m.label, "keys": m.keys, "rss_before": m.rss_before, "rss_after": m.rss_after, "bytes_per_key": per_key, "list_keys_full_pass_seconds": m.list_seconds, "list_keys_first_page_seconds": m.first_page_seconds, "list_page_size": m.page_size, "listed": m.listed }));
    }
    let cache_json = cache.map(|c| {
        md.push_str(&format!(
            "\nCache workload (the store alone, max_keys=500000, eviction=lru, Zipf s=0.99 reads over \
             2M keys, a miss sets the key): {} sets, {} gets in {:.1} s, **{} refused**; hit ratio \
             **{:.3}**, exact LRU on the same trace **{:.3}** ({:.3} of it); {} keys at the end; \
             RSS {}. Sets of new keys from every core at once: **{:.0}/s into the full namespace** \
             (each evicts; {} refused) against {:.0}/s with no limit in reach (**{:.2}×**).\n",
            c.sets,
            c.gets,
            c.seconds,
            c.refused,
            c.hit_ratio(),
            c.exact_hit_ratio(),
            c.hit_ratio() / c.exact_hit_ratio(),
            c.keys_at_end,
            c.rss
                .iter()
                .map(|(sets, rss)| format!("{:.0} MiB at {}M", *rss as f64 / 1048576.0, sets / 1_000_000))
                .collect::<Vec<_>>()
                .join(", "),
            c.evicting_sets_per_sec,
            c.evicting_refused,
            c.plain_sets_per_sec,
            c.evicting_sets_per_sec / c.plain_sets_per_sec,
        ));
        json!({ "sets": c.sets, "gets": c.gets, "seconds": c.seconds, "refused": c.refused,
            "hit_ratio": c.hit_ratio(), "exact_lru_hit_ratio": c.exact_hit_ratio(),
            "keys_at_end": c.keys_at_end, "rss": c.rss,
            "evicting_sets_per_sec": c.evicting_sets_per_sec, "evicting_refused": c.evicting_refused,
            "plain_sets_per_sec": c.plain_sets_per_sec })
    });
    let expiry_json = expiry.map(|e| {
        let p99 = |p: &Phase| p.percentile(0.99);
        let rate = |p: &Phase| p.calls_per_sec();
        md.push_str(&format!(
            "\nExpiry sweep: {} keys expiring at once, get and set at {} in flight each: \
             p99 get **{:.0} → {:.0} µs**, set **{:.0} → {:.0} µs** (the {} s before → the {} s after \
             the deadline; {:.0} → {:.0} and {:.0} → {:.0} calls/s; {} and {} lost after); every \
             expired key reclaimed **{:.1} s** after the deadline; key+value bytes {:.1} MiB → {:.1} \
             MiB, RSS {:.1} MiB → {:.1} MiB.\n",
            e.keys,
            32,
            p99(&e.before.0),
            p99(&e.after.0),
            p99(&e.before.1),
            p99(&e.after.1),
            3,
            3,
            rate(&e.before.0),
            rate(&e.after.0),
            rate(&e.before.1),
            rate(&e.after.1),
            e.after.0.lost,
            e.after.1.lost,
            e.reclaimed_seconds,
            e.bytes_loaded as f64 / 1048576.0,
            e.bytes_reclaimed as f64 / 1048576.0,
            e.rss_loaded as f64 / 1048576.0,
            e.rss_reclaimed as f64 / 1048576.0,
        ));
        json!({ "keys": e.keys, "get_p99_us_before": p99(&e.before.0), "get_p99_us_after": p99(&e.after.0),
            "set_p99_us_before": p99(&e.before.1), "set_p99_us_after": p99(&e.after.1),
            "reclaimed_seconds": e.reclaimed_seconds, "bytes_loaded": e.bytes_loaded,
            "bytes_reclaimed": e.bytes_reclaimed, "rss_loaded": e.rss_loaded, "rss_reclaimed": e.rss_reclaimed })
    });
    let watch_json = watch_table(&mut md, watch);
    for (name, lag) in lags {
        md.push_str(&format!(
            "\nReplication, apply lag of `{name}` (from stored in JetStream to applied in its memory: \
             the staleness of local reads) over the run: **{lag}**.\n"
        ));
    }
    let catchup_json = catchup.map(|c| {
        md.push_str(&format!(
            "\nReplication catch-up: {} keys loaded through one instance in {:.1} s; a new instance \
             caught up and answered health **{:.1} s** after it started.\n",
            c.keys, c.load_seconds, c.seconds
        ));
        json!({ "keys": c.keys, "load_seconds": c.load_seconds, "catchup_seconds": c.seconds })
    });
    let lag_json: Vec<_> = lags
        .iter()
        .map(|(n, l)| json!({ "target": n, "apply_lag": l }))
        .collect();
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(
            &json!({ "rows": rows, "memory": memory_json, "cache": cache_json, "expiry": expiry_json, "watch": watch_json, "apply_lag": lag_json, "catchup": catchup_json }),
        )?,
    )?;
    println!("{md}");
    eprintln!("written to target/bench/report.md and report.json");
    Ok(())
}

/// The watch rows: each (watchers, in flight) pair's median rate, its median ratio to the same
/// round's rate with no watcher, and its events.
fn watch_table(md: &mut String, rows: &[WatchRow]) -> serde_json::Value {
    if rows.is_empty() {
        return serde_json::Value::Null;
    }
    md.push_str(
        "\nSets (16 B values) while components watch every written key (`watch=SET@*`; each \
         watcher a stand-in in a helper process at nice 10, answering every call as the host \
         does, or never: \"stalled\"):\n\n\
         | watchers | in flight | sets/s | vs 0 watchers | p50 / p99 µs | events delivered | dropped | failed | lost calls |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut json_rows = Vec::new();
    for k in WATCH_IN_FLIGHT {
        let of = |w: Watching| -> Vec<&WatchRow> {
            (rows.iter())
                .filter(|r| r.watching == w && r.in_flight == k)
                .collect()
        };
        let none = of(Watching::Answering(0));
        for w in WATCHING {
            let these = of(w);
            let rate = median(these.iter().map(|r| r.phase.calls_per_sec()).collect());
            let ratio = median(
                (these.iter().zip(&none))
                    .map(|(r, n)| r.phase.calls_per_sec() / n.phase.calls_per_sec())
                    .collect(),
            );
            let p50 = median(these.iter().map(|r| r.phase.percentile(0.5)).collect());
            let p99 = median(these.iter().map(|r| r.phase.percentile(0.99)).collect());
            let sum = |f: fn(&WatchRow) -> u64| these.iter().map(|r| f(r)).sum::<u64>();
            let (delivered, dropped, failed, lost) = (
                sum(|r| r.events.0),
                sum(|r| r.events.1),
                sum(|r| r.events.2),
                sum(|r| r.phase.lost),
            );
            let label = w.label();
            md.push_str(&format!(
                "| {label} | {k} | {rate:.0} | **{ratio:.2}×** | {p50:.0} / {p99:.0} | {delivered} | {dropped} | {failed} | {lost} |\n"
            ));
            json_rows.push(
                json!({ "watchers": label, "in_flight": k, "sets_per_sec": rate,
                "ratio_to_none": ratio, "p50_us": p50, "p99_us": p99, "delivered": delivered,
                "dropped": dropped, "failed": failed, "lost": lost }),
            );
        }
    }
    serde_json::Value::Array(json_rows)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
