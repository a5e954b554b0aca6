//! Turns the measured cells into `report.json` (machine-checkable), `report.md` (tables
//! and the targets with their verdicts) and `report.png` (latency percentiles per
//! mode, memory against tasks per host).
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Result;
use serde_json::{Value, json};

use super::{BulkCell, Cell, MODES, Raw, SweepCell};

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Aggregate of one (mode, rate) over rounds.
#[derive(Clone, Debug, Default)]
pub struct Agg {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub added_p50: f64,
    pub added_p90: f64,
    pub added_p99: f64,
    pub cpu: f64,
    pub rss: f64,
    pub peak: f64,
    pub pss: f64,
    pub ok: u64,
    pub errors: u64,
    pub rps: f64,
    pub rounds: usize,
    pub retries: usize,
}

type Pct = fn(&Cell) -> u64;
const PCTS: [(&str, Pct); 5] = [
    ("p50", |c| c.load.p50_us),
    ("p90", |c| c.load.p90_us),
    ("p99", |c| c.load.p99_us),
    ("p999", |c| c.load.p999_us),
    ("max", |c| c.load.max_us),
];

fn aggregate(cells: &[Cell], kind: &str) -> BTreeMap<String, BTreeMap<u64, Agg>> {
    let mut out: BTreeMap<String, BTreeMap<u64, Agg>> = BTreeMap::new();
    for mode in MODES {
        let mine: Vec<&Cell> = cells
            .iter()
            .filter(|c| c.kind == kind && c.mode == mode)
            .collect();
        let mut rates: Vec<u64> = mine.iter().map(|c| c.rate as u64).collect();
        rates.sort();
        rates.dedup();
        for rate in rates {
            let at: Vec<&&Cell> = mine.iter().filter(|c| c.rate as u64 == rate).collect();
            let direct = |round: usize| {
                cells.iter().find(|c| {
                    c.kind == kind
                        && c.mode == "direct"
                        && c.rate as u64 == rate
                        && c.round == round
                })
            };
            let m = |f: Pct| median(at.iter().map(|c| f(c) as f64).collect());
            let added = |f: Pct| {
                median(
                    at.iter()
                        .filter_map(|c| direct(c.round).map(|d| f(c) as f64 - f(d) as f64))
                        .collect(),
                )
            };
            let agg = Agg {
                p50: m(PCTS[0].1),
                p90: m(PCTS[1].1),
                p99: m(PCTS[2].1),
                p999: m(PCTS[3].1),
                max: m(PCTS[4].1),
                added_p50: added(PCTS[0].1),
                added_p90: added(PCTS[1].1),
                added_p99: added(PCTS[2].1),
                cpu: median(at.iter().map(|c| c.cpu_cores).collect()),
                rss: median(at.iter().map(|c| c.memory.rss_bytes as f64).collect()),
                peak: median(at.iter().map(|c| c.memory.peak_rss_bytes as f64).collect()),
                pss: median(at.iter().map(|c| c.memory.pss_bytes as f64).collect()),
                ok: at.iter().map(|c| c.load.ok).sum(),
                errors: at.iter().map(|c| c.load.errors).sum(),
                rps: median(at.iter().map(|c| c.load.achieved_rps).collect()),
                rounds: at.len(),
                retries: at.iter().map(|c| c.attempts - 1).sum(),
            };
            out.entry(mode.to_owned()).or_default().insert(rate, agg);
        }
    }
    out
}

fn agg_json(a: &Agg) -> Value {
    json!({
        "p50_us": a.p50, "p90_us": a.p90, "p99_us": a.p99, "p999_us": a.p999, "max_us": a.max,
        "added_p50_us": a.added_p50, "added_p90_us": a.added_p90, "added_p99_us": a.added_p99,
        "cpu_cores": a.cpu, "rss_bytes": a.rss, "peak_rss_bytes": a.peak, "pss_bytes": a.pss,
        "ok": a.ok, "errors": a.errors, "achieved_rps": a.rps, "rounds": a.rounds,
        "remeasured": a.retries,
    })
}

struct Throughput {
    bps: f64,
    ratio: f64,
    cpu: f64,
    errors: usize,
}

fn throughput(bulk: &[BulkCell]) -> BTreeMap<String, Throughput> {
    let mut out = BTreeMap::new();
    for mode in MODES {
        let mine: Vec<&BulkCell> = bulk.iter().filter(|b| b.mode == mode).collect();
        if mine.is_empty() {
            continue;
        }
        let ratio = median(
            mine.iter()
                .filter_map(|b| {
                    bulk.iter()
                        .find(|d| d.mode == "direct" && d.round == b.round)
                        .filter(|d| d.bytes_per_sec > 0.0)
                        .map(|d| b.bytes_per_sec / d.bytes_per_sec)
                })
                .collect(),
        );
        out.insert(
            mode.to_owned(),
            Throughput {
                bps: median(mine.iter().map(|b| b.bytes_per_sec).collect()),
                ratio,
                cpu: median(mine.iter().map(|b| b.cpu_cores).collect()),
                errors: mine.iter().filter(|b| b.error.is_some()).count(),
            },
        );
    }
    out
}

struct Target {
    name: String,
    target: String,
    measured: String,
    ratio: f64,
    pass: bool,
    by: String,
}

pub const MIB: f64 = 1024.0 * 1024.0;

fn sweep_at<'a>(sweep: &'a [SweepCell], mode: &str, n: usize) -> Option<&'a SweepCell> {
    sweep
        .iter()
        .find(|s| s.mode == mode && s.tasks_per_host == n)
}

fn targets(
    keep: &BTreeMap<String, BTreeMap<u64, Agg>>,
    tp: &BTreeMap<String, Throughput>,
    sweep: &[SweepCell],
    cells: &[Cell],
) -> Vec<Target> {
    let mut t = Vec::new();
    let rate = keep
        .get("node")
        .and_then(|r| {
            r.keys()
                .copied()
                .find(|r| *r == 1000)
                .or(r.keys().copied().max())
        })
        .unwrap_or(0);
    let node = keep.get("node").and_then(|r| r.get(&rate));
    let sc = keep.get("sidecar").and_then(|r| r.get(&rate));
    if let Some(n) = node {
        let ratio = n.added_p99 / 200.0;
        t.push(Target {
            name: format!("node: added p99 over direct at {rate} req/s"),
            target: "≤ 200 µs".into(),
            measured: format!("{:.0} µs", n.added_p99),
            ratio,
            pass: n.added_p99 <= 200.0,
            by: miss_by(n.added_p99 - 200.0, "µs"),
        });
        if let Some(s) = sc {
            let ratio = n.added_p99 / s.added_p99;
            t.push(Target {
                name: format!("node vs sidecar: added p99 at {rate} req/s, 1 task per host"),
                target: "≤ 1.0×".into(),
                measured: format!("{:.0} µs vs {:.0} µs", n.added_p99, s.added_p99),
                ratio,
                pass: n.added_p99 <= s.added_p99,
                by: miss_by(n.added_p99 - s.added_p99, "µs"),
            });
        }
    }
    if let (Some(n), Some(s)) = (sweep_at(sweep, "node", 10), sweep_at(sweep, "sidecar", 10)) {
        let ratio = n.cpu_cores / s.cpu_cores;
        t.push(Target {
            name: "10 tasks per host: node CPU vs sidecar total".into(),
            target: "≤ 0.8×".into(),
            measured: format!("{:.3} vs {:.3} cores", n.cpu_cores, s.cpu_cores),
            ratio,
            pass: ratio <= 0.8,
            by: miss_by((ratio - 0.8) * s.cpu_cores, "cores"),
        });
        let ratio = n.p99_us as f64 / s.p99_us as f64;
        t.push(Target {
            name: "10 tasks per host: node p99 vs sidecar p99".into(),
            target: "≤ 1.0×".into(),
            measured: format!("{} µs vs {} µs", n.p99_us, s.p99_us),
            ratio,
            pass: n.p99_us <= s.p99_us,
            by: miss_by(n.p99_us as f64 - s.p99_us as f64, "µs"),
        });
    }
    let nodes: Vec<&SweepCell> = sweep.iter().filter(|s| s.mode == "node").collect();
    if let Some(worst) = nodes.iter().max_by_key(|s| s.max_process_rss_bytes) {
        // Per node proxy: each task connection plus its tunnel (one pooled connection per
        // source/destination identity pair), and the idle bench pair.
        let conns = 2 * (worst.open_connections_per_host + 1);
        let budget = 15e6 + 16.0 * 1024.0 * conns as f64;
        let rss = worst.max_process_rss_bytes as f64;
        t.push(Target {
            name: format!(
                "node proxy memory (largest, {} tasks per host, ~{conns} open connections)",
                worst.tasks_per_host
            ),
            target: "≤ 15 MB + 16 KiB per open connection".into(),
            measured: format!("{:.1} MiB (budget {:.1} MiB)", rss / MIB, budget / MIB),
            ratio: rss / budget,
            pass: rss <= budget,
            by: miss_by((rss - budget) / MIB, "MiB"),
        });
    }
    if let (Some(lo), Some(hi)) = (
        nodes.iter().min_by_key(|s| s.tasks_per_host),
        nodes.iter().max_by_key(|s| s.tasks_per_host),
    ) && hi.tasks_per_host > lo.tasks_per_host
    {
        let growth = hi.max_process_rss_bytes as f64 - lo.max_process_rss_bytes as f64;
        let allowed = 16.0 * 1024.0 * 2.0 * (hi.tasks_per_host - lo.tasks_per_host) as f64;
        t.push(Target {
            name: format!(
                "node proxy memory flat in tasks per host ({} → {})",
                lo.tasks_per_host, hi.tasks_per_host
            ),
            target: "growth ≤ 16 KiB per added connection".into(),
            measured: format!(
                "{:+.1} MiB (allowed {:.1} MiB)",
                growth / MIB,
                allowed / MIB
            ),
            ratio: growth / allowed,
            pass: growth <= allowed,
            by: miss_by((growth - allowed) / MIB, "MiB"),
        });
    }
    let nmax = sweep.iter().map(|s| s.tasks_per_host).max().unwrap_or(0);
    if let (Some(n), Some(s)) = (
        sweep_at(sweep, "node", nmax),
        sweep_at(sweep, "sidecar", nmax),
    ) {
        let ratio = n.memory.rss_bytes as f64 / s.memory.rss_bytes as f64;
        t.push(Target {
            name: format!("{nmax} tasks per host: node memory vs sidecar total (RSS)"),
            target: "≤ 10 %".into(),
            measured: format!(
                "{:.1} MiB vs {:.1} MiB",
                n.memory.rss_bytes as f64 / MIB,
                s.memory.rss_bytes as f64 / MIB
            ),
            ratio,
            pass: ratio <= 0.10,
            by: miss_by((ratio - 0.10) * 100.0, "percentage points"),
        });
    }
    for v in super::baseline::compare(cells) {
        t.push(Target {
            name: format!(
                "node vs node-base (baseline build): p50 at {} req/s (median of {} same-round differences)",
                v.rate, v.rounds
            ),
            target: "≤ +15 µs".into(),
            measured: format!("{:+.0} µs", v.p50_delta_us),
            ratio: v.p50_delta_us / 15.0,
            pass: v.p50_delta_us <= 15.0,
            by: miss_by(v.p50_delta_us - 15.0, "µs"),
        });
        t.push(Target {
            name: format!(
                "node vs node-base (baseline build): mesh CPU at {} req/s (median of {} same-round ratios)",
                v.rate, v.rounds
            ),
            target: "≤ 1.10×".into(),
            measured: format!("{:.2}×", v.cpu_ratio),
            ratio: v.cpu_ratio / 1.1,
            pass: v.cpu_ratio <= 1.1,
            by: miss_by((v.cpu_ratio - 1.1) * 100.0, "percentage points"),
        });
    }
    if let Some(n) = tp.get("node") {
        t.push(Target {
            name: "single-connection mTLS throughput, node vs direct".into(),
            target: "≥ 0.6×".into(),
            measured: format!(
                "{:.0} MB/s vs {:.0} MB/s",
                n.bps / 1e6,
                tp.get("direct").map_or(0.0, |d| d.bps / 1e6)
            ),
            ratio: n.ratio,
            pass: n.ratio >= 0.6,
            by: miss_by((0.6 - n.ratio) * 100.0, "percentage points of direct"),
        });
    }
    t
}

fn miss_by(excess: f64, unit: &str) -> String {
    if excess > 0.0 {
        let digits = if excess >= 10.0 { 0 } else { 2 };
        format!("missed by {excess:.digits$} {unit}")
    } else {
        String::new()
    }
}

pub fn write(raw: &Raw, dir: &Path) -> Result<()> {
    let keep = aggregate(&raw.cells, "keepalive");
    let newc = aggregate(&raw.cells, "new_connection");
    let tp = throughput(&raw.bulk);
    let targets = targets(&keep, &tp, &raw.sweep, &raw.cells);
    let by_rate = |m: &BTreeMap<String, BTreeMap<u64, Agg>>| -> Value {
        let mut o = serde_json::Map::new();
        for (mode, rates) in m {
            let mut r = serde_json::Map::new();
            for (rate, a) in rates {
                r.insert(rate.to_string(), agg_json(a));
            }
            o.insert(mode.clone(), Value::Object(r));
        }
        Value::Object(o)
    };
    let mut tpj = serde_json::Map::new();
    for (mode, t) in &tp {
        tpj.insert(
            mode.clone(),
            json!({"bytes_per_sec": t.bps, "ratio_to_direct": t.ratio, "cpu_cores": t.cpu, "errors": t.errors}),
        );
    }
    let sweep: Vec<Value> = raw
        .sweep
        .iter()
        .map(|s| {
            json!({
                "mode": s.mode, "tasks_per_host": s.tasks_per_host,
                "rss_bytes": s.memory.rss_bytes, "peak_rss_bytes": s.memory.peak_rss_bytes,
                "pss_bytes": s.memory.pss_bytes, "max_process_rss_bytes": s.max_process_rss_bytes,
                "processes": s.processes, "cpu_cores": s.cpu_cores,
                "p50_us": s.p50_us, "p99_us": s.p99_us, "max_us": s.max_us,
                "ok": s.ok, "errors": s.errors, "first_error": s.first_error,
                "neighbour_cores": s.neighbour_cores, "remeasured": s.attempts - 1,
            })
        })
        .collect();
    let targets_json: Vec<Value> = targets
        .iter()
        .map(|t| json!({"name": t.name, "target": t.target, "measured": t.measured, "ratio": t.ratio, "pass": t.pass, "note": t.by}))
        .collect();
    let report = json!({
        "started": raw.started,
        "elapsed_s": raw.elapsed_s,
        "machine": raw.machine,
        "settings": raw.settings,
        "modes": by_rate(&keep),
        "new_connection": by_rate(&newc),
        "throughput": tpj,
        "sweep": sweep,
        "targets": targets_json,
        "cells": raw.cells,
        "bulk_cells": raw.bulk,
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(
        dir.join("report.md"),
        markdown(raw, &keep, &newc, &tp, &targets),
    )?;
    if let Err(e) = super::plot::draw(&dir.join("report.png"), &keep, &raw.sweep) {
        eprintln!("xtask bench: plot failed: {e:#}");
        return Err(e);
    }
    Ok(())
}

fn us(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.0}")
    }
}

fn signed(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:+.0}")
    }
}

fn markdown(
    raw: &Raw,
    keep: &BTreeMap<String, BTreeMap<u64, Agg>>,
    newc: &BTreeMap<String, BTreeMap<u64, Agg>>,
    tp: &BTreeMap<String, Throughput>,
    targets: &[Target],
) -> String {
    let s = &raw.settings;
    let mut m = String::new();
    let cmd = if s.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let _ = writeln!(m, "# ecsmesh benchmark: node mode vs sidecar mode\n");
    let _ = writeln!(
        m,
        "`{cmd}`, started {} UTC, took {:.0} s. Machine: {} vCPUs, {}, kernel {}, {} RAM.\n",
        raw.started,
        raw.elapsed_s,
        raw.machine.get("nproc").map_or("?", String::as_str),
        raw.machine.get("cpu_model").map_or("?", String::as_str),
        raw.machine.get("kernel").map_or("?", String::as_str),
        raw.machine.get("memory").map_or("?", String::as_str),
    );
    let _ = writeln!(m, "## Settings (identical for every mode)\n");
    let _ = writeln!(m, "| setting | value |\n|---|---|");
    let rows = [
        (
            "modes",
            "direct (no mesh), node (`ecsmesh run` on both instances, mTLS tunnel, opaque port: raw TCP in a CONNECT stream), node-http (the same node proxies on a port that is not opaque: protocol detection, each request as HTTP/2 through the tunnel), node-base (with a baseline: node mode of the baseline build), sidecar (`ecsmesh sidecar` in the client task and in the server task), peer (stunnel client in the client task, stunnel server in the server task, mTLS)".to_string(),
        ),
        ("task layout", "bridge-mode tasks: one client task on instance 0, one server task on instance 1, a separate pair per mode (same layout)".into()),
        ("rates (keep-alive)", format!("{:?} req/s", s.rates)),
        ("connections (keep-alive)", s.connections.to_string()),
        (
            "new connection per request",
            format!("{} req/s over {} concurrent slots", s.new_connection_rate, s.new_connection_connections),
        ),
        ("payload", format!("HTTP/1.1 POST with a {} B body, {} B response body", s.body_bytes, s.body_bytes)),
        ("cell", format!("{} ms warm-up (not recorded) + {} ms measured", s.warmup_ms, s.duration_ms)),
        ("rounds", format!("{} (modes interleaved, order rotated per round; added = median over rounds of mode − direct in the same round)", s.rounds)),
        ("load generator", format!("meshtool load: open loop, latency from each request's due time (coordinated-omission corrected), timer: sleep with 1 ns slack, then spin {} µs", s.spin_us)),
        ("proxy worker threads", format!("{} per process (node proxies and sidecars alike: `--workers {}`)", s.workers, s.workers)),
        ("CPU layout", s.cpu_layout.clone()),
        ("peer reference", s.peer.clone()),
        (
            "baseline (node-base)",
            s.baseline.clone().map_or_else(
                || "none (`--baseline <rev>` adds it)".into(),
                |b| format!("node mode run by the release build of {b}, on instances 2 (CPU 0) and 3 (CPU 1); config fields it does not know left out"),
            ),
        ),
        ("CPU measurement", "cgroup cpu.stat usage_usec of the mesh processes' cgroups over the cell (warm-up included)".into()),
        ("memory", "sum over mesh processes: VmRSS sampled at 80 % of the cell (steady), VmHWM reset at cell start (peak), Pss from smaps_rollup".into()),
        ("neighbour watch", format!("cell measured again (≤ {} times, only in the run's first {} s) when other processes used > {} cores (per-process /proc/<pid>/stat deltas)", s.max_retries, s.retry_budget_s, s.neighbour_limit_cores)),
        ("single-connection throughput", format!("one connection writes for {} s, throughput = bytes the server counted / time until its count arrived", s.bulk_secs)),
        ("tasks-per-host sweep", format!("{:?} tasks per host; each client task sends {} req/s over 1 keep-alive connection to its own server task, {} ms measured", s.sweep_tasks, s.sweep_rate_per_task, s.sweep_duration_ms)),
    ];
    for (k, v) in rows {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    let _ = writeln!(m, "\n## Latency, keep-alive (median over rounds, µs)\n");
    let _ = writeln!(
        m,
        "| mode | req/s | p50 | p90 | p99 | p99.9 | max | added p50 | added p90 | added p99 | mesh CPU (cores) | mesh RSS (MiB) | peak RSS (MiB) | PSS (MiB) | ok | errors |"
    );
    let _ = writeln!(
        m,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let rates: std::collections::BTreeSet<u64> =
        keep.values().flat_map(|r| r.keys().copied()).collect();
    for rate in &rates {
        for mode in MODES {
            if let Some(a) = keep.get(mode).and_then(|r| r.get(rate)) {
                let _ = writeln!(
                    m,
                    "| {mode} | {rate} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.1} | {:.1} | {:.1} | {} | {} |",
                    us(a.p50),
                    us(a.p90),
                    us(a.p99),
                    us(a.p999),
                    us(a.max),
                    signed(a.added_p50),
                    signed(a.added_p90),
                    signed(a.added_p99),
                    a.cpu,
                    a.rss / MIB,
                    a.peak / MIB,
                    a.pss / MIB,
                    a.ok,
                    a.errors
                );
            }
        }
    }
    let _ = writeln!(
        m,
        "\np99.9 and max are dominated by VM scheduling (see bench/METHOD.md); compare on p50/p90/p99, CPU and memory.\n"
    );
    let _ = writeln!(
        m,
        "## Latency, new connection per request (median over rounds, µs)\n"
    );
    let _ = writeln!(
        m,
        "| mode | req/s | p50 | p90 | p99 | added p50 | added p99 | mesh CPU (cores) | ok | errors |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|");
    for mode in MODES {
        for (rate, a) in newc.get(mode).into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {mode} | {rate} | {} | {} | {} | {} | {} | {:.3} | {} | {} |",
                us(a.p50),
                us(a.p90),
                us(a.p99),
                signed(a.added_p50),
                signed(a.added_p99),
                a.cpu,
                a.ok,
                a.errors
            );
        }
    }
    let _ = writeln!(
        m,
        "\n## Single-connection throughput (median over rounds)\n"
    );
    let _ = writeln!(
        m,
        "| mode | MB/s | × direct | mesh CPU (cores) | failed runs |\n|---|---|---|---|---|"
    );
    for mode in MODES {
        if let Some(t) = tp.get(mode) {
            let _ = writeln!(
                m,
                "| {mode} | {:.0} | {:.2} | {:.2} | {} |",
                t.bps / 1e6,
                t.ratio,
                t.cpu,
                t.errors
            );
        }
    }
    let _ = writeln!(m, "\n## Tasks-per-host sweep (both instances together)\n");
    let _ = writeln!(
        m,
        "| tasks per host | mode | mesh processes | RSS (MiB) | peak RSS (MiB) | PSS (MiB) | largest process (MiB) | mesh CPU (cores) | p50 (µs) | p99 (µs) | ok | errors |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &raw.sweep {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {} | {} | {} | {} |",
            s.tasks_per_host,
            s.mode,
            s.processes,
            s.memory.rss_bytes as f64 / MIB,
            s.memory.peak_rss_bytes as f64 / MIB,
            s.memory.pss_bytes as f64 / MIB,
            s.max_process_rss_bytes as f64 / MIB,
            s.cpu_cores,
            s.p50_us,
            s.p99_us,
            s.ok,
            s.errors
        );
    }
    let _ = writeln!(m, "\n## Targets\n");
    let _ = writeln!(
        m,
        "| target | wanted | measured | ratio | verdict |\n|---|---|---|---|---|"
    );
    for t in targets {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {:.2} | {}{} |",
            t.name,
            t.target,
            t.measured,
            t.ratio,
            if t.pass { "PASS" } else { "MISS" },
            if t.by.is_empty() {
                String::new()
            } else {
                format!(" ({})", t.by)
            }
        );
    }
    let remeasured: usize = raw.cells.iter().map(|c| c.attempts - 1).sum::<usize>()
        + raw.bulk.iter().map(|c| c.attempts - 1).sum::<usize>()
        + raw.sweep.iter().map(|c| c.attempts - 1).sum::<usize>();
    let noisy = raw
        .cells
        .iter()
        .filter(|c| c.neighbour_cores > s.neighbour_limit_cores)
        .count();
    let _ = writeln!(
        m,
        "\nCells measured again because of busy neighbours: {remeasured}; latency cells kept although neighbours stayed above {} cores after the retries: {noisy}.",
        s.neighbour_limit_cores
    );
    let _ = writeln!(m, "\n![latency and memory](report.png)");
    m
}
