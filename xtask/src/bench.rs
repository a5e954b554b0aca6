//! `cargo xtask bench [--quick]`: node mode against sidecar mode, a pair of mTLS sidecars
//! from Debian (stunnel) as an outside reference, and no mesh at all, on the harness's two
//! simulated container instances, with the method of `bench/METHOD.md`:
//!
//! - every process of instance 0 (client tasks, their proxies) runs on CPU 0 and every
//!   process of instance 1 (server tasks, their proxies) on CPU 1: only the A→B hop
//!   crosses CPUs, like two real hosts;
//! - every mode has its own pair of bridge-mode tasks (same layout), all set up once, so
//!   modes are interleaved cell by cell in rounds and compared as the median over rounds of
//!   (mode − direct in the same round);
//! - open-loop load at a fixed rate, latency from each request's due time (meshtool `load`);
//! - a cell is measured again (bounded) when other processes on the machine used more than
//!   0.3 cores during it.
//!
//! Results: `target/bench/report.{md,json,png}`.
mod baseline;
mod measure;
mod plot;
mod report;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use harness::{NetworkMode, ProxyOptions, Tools, World, process};
use serde::{Deserialize, Serialize};

use crate::{build, setup, workspace_root};

/// `node-http` is the node proxy on a port that is not opaque: requests go through protocol
/// detection and the HTTP path (one HTTP/2 request per task request through the tunnel);
/// `node` is the same proxy on an opaque port (raw TCP through a CONNECT stream);
/// `node-base` (only with `--baseline <rev>`) is node mode run by the binary built from
/// another commit, on a second pair of instances pinned like the first, so a change's cost
/// is measured side by side in one run.
pub const MODES: [&str; 6] = [
    "direct",
    "node",
    "node-http",
    "sidecar",
    "peer",
    "node-base",
];
const TRUST_DOMAIN: &str = "bench.test";
const SERVER_PORT: u16 = 8080;
/// Where the servers also listen for the `node-http` mode (not in the opaque ports).
const HTTP_PORT: u16 = 8081;
const PEER_PORT: u16 = 15443;
const PEER_LOCAL: &str = "127.0.0.1:15101";
/// Other processes may use this many cores during a cell before it is measured again.
const NEIGHBOUR_LIMIT: f64 = 0.3;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub quick: bool,
    pub rates: Vec<f64>,
    pub connections: usize,
    pub body_bytes: usize,
    pub warmup_ms: u64,
    pub duration_ms: u64,
    pub rounds: usize,
    pub workers: usize,
    pub spin_us: u64,
    pub new_connection_rate: f64,
    pub new_connection_connections: usize,
    pub bulk_secs: f64,
    pub sweep_tasks: Vec<usize>,
    pub sweep_rate_per_task: f64,
    pub sweep_duration_ms: u64,
    pub cpu_layout: String,
    pub neighbour_limit_cores: f64,
    pub max_retries: usize,
    /// No cell is measured again after this many seconds (bounds the run time).
    pub retry_budget_s: u64,
    pub peer: String,
    /// The modes of this run (`node-base` only with a baseline).
    #[serde(default)]
    pub modes: Vec<String>,
    /// The modes whose cells are measured (all of `modes` unless focused).
    #[serde(default)]
    pub measured: Vec<String>,
    /// Latency cells only (a focused A/B run).
    #[serde(default)]
    pub latency_only: bool,
    /// The baseline build of `node-base`: the commit it was built from.
    #[serde(default)]
    pub baseline: Option<String>,
}

/// A narrower run for an A/B of one change: fewer cells, same method. Every mode is
/// still set up (so the proxies carry the same warm-up traffic), only the chosen cells are
/// measured; `direct` is always measured, it is what "added" is relative to.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Focus {
    /// Measure only these modes' latency cells (comma-separated), e.g. `node,node-base`.
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Only these rates (req/s, comma-separated) for the keep-alive cells.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Number of rounds.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Latency cells only: no new-connection cells, no throughput, no sweep.
    #[arg(long)]
    pub latency_only: bool,
}

impl Settings {
    fn new(quick: bool, baseline: Option<String>, focus: &Focus) -> Result<Self> {
        for m in &focus.modes {
            if !MODES.contains(&m.as_str()) || (m == "node-base" && baseline.is_none()) {
                bail!(
                    "--modes: unknown mode {m:?} (modes: {}; node-base needs --baseline)",
                    MODES.join(", ")
                );
            }
        }
        if focus.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            bail!("--rates: every rate must be a positive number of requests per second");
        }
        if focus.rounds == Some(0) {
            bail!("--rounds: at least one round");
        }
        let mut s = Self::defaults(quick, baseline);
        if !focus.modes.is_empty() {
            s.measured = s
                .modes
                .iter()
                .filter(|m| *m == "direct" || focus.modes.contains(m))
                .cloned()
                .collect();
        }
        if !focus.rates.is_empty() {
            s.rates = focus.rates.clone();
        }
        if let Some(r) = focus.rounds {
            s.rounds = r;
        }
        s.latency_only = focus.latency_only;
        Ok(s)
    }

    fn defaults(quick: bool, baseline: Option<String>) -> Self {
        let full = !quick;
        let modes: Vec<String> = MODES
            .iter()
            .filter(|m| **m != "node-base" || baseline.is_some())
            .map(|m| m.to_string())
            .collect();
        Self {
            quick,
            measured: modes.clone(),
            modes,
            latency_only: false,
            baseline,
            rates: if full {
                vec![200.0, 500.0, 1000.0]
            } else {
                vec![500.0]
            },
            connections: 16,
            body_bytes: 1024,
            warmup_ms: if full { 2000 } else { 1000 },
            duration_ms: if full { 10_000 } else { 3000 },
            rounds: if full { 3 } else { 1 },
            workers: 1,
            spin_us: 50,
            new_connection_rate: 200.0,
            new_connection_connections: 8,
            bulk_secs: if full { 4.0 } else { 1.5 },
            sweep_tasks: if full {
                vec![1, 10, 50, 100]
            } else {
                vec![1, 10]
            },
            sweep_rate_per_task: 10.0,
            sweep_duration_ms: if full { 10_000 } else { 3000 },
            cpu_layout: "instance 0 (client tasks, their sidecars, node proxy A, stunnel client) on CPU 0; \
                         instance 1 (server tasks, their sidecars, node proxy B, stunnel server) on CPU 1"
                .into(),
            neighbour_limit_cores: NEIGHBOUR_LIMIT,
            max_retries: if full { 2 } else { 1 },
            retry_budget_s: if full { 16 * 60 } else { 150 },
            peer: format!(
                "stunnel {} (TLS 1.3, mutual, verifyChain, TCP_NODELAY both sides), one per task",
                stunnel_version()
            ),
        }
    }
}

fn stunnel_version() -> String {
    Command::new(setup::STUNNEL)
        .arg("-version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            text.lines()
                .find(|l| l.starts_with("stunnel "))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into())
}

/// What meshtool `load` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Load {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    #[serde(default)]
    pub first_error: Option<String>,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub achieved_rps: f64,
    #[serde(default)]
    pub start_lag_p99_us: u64,
    #[serde(default, skip_serializing)]
    pub latencies_us: Option<Vec<u32>>,
}

/// One measured cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub kind: String,
    pub mode: String,
    pub round: usize,
    pub rate: f64,
    pub load: Load,
    /// CPU of the mode's mesh processes during the cell, in cores.
    pub cpu_cores: f64,
    pub memory: measure::Memory,
    pub neighbour_cores: f64,
    pub busiest_neighbour: Option<String>,
    pub attempts: usize,
    pub wall_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BulkCell {
    pub mode: String,
    pub round: usize,
    pub bytes_per_sec: f64,
    pub error: Option<String>,
    pub cpu_cores: f64,
    pub neighbour_cores: f64,
    pub attempts: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepCell {
    pub mode: String,
    pub tasks_per_host: usize,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub cpu_cores: f64,
    /// Mesh processes of both instances together.
    pub memory: measure::Memory,
    /// Largest single mesh process (node mode: a node proxy).
    pub max_process_rss_bytes: u64,
    pub processes: usize,
    /// Task connections open through each host's proxies during the cell.
    pub open_connections_per_host: usize,
    pub neighbour_cores: f64,
    pub attempts: usize,
}

pub struct Raw {
    pub settings: Settings,
    pub cells: Vec<Cell>,
    pub bulk: Vec<BulkCell>,
    pub sweep: Vec<SweepCell>,
    pub started: String,
    pub elapsed_s: f64,
    pub machine: BTreeMap<String, String>,
}

pub fn out_dir() -> PathBuf {
    workspace_root().join("target/bench")
}

pub fn run(quick: bool, baseline: Option<String>, focus: Focus) -> Result<()> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark builds namespaces, cgroups and eBPF programs: run it as root");
    }
    if !setup::toolchain_ready() {
        setup::install()?;
    }
    let tools = match std::env::var_os("ECSMESH_BENCH_BINS") {
        // Development aid: binaries built elsewhere (same names), no build step.
        Some(dir) => Tools {
            ecsmesh: Path::new(&dir).join("ecsmesh"),
            meshtool: Path::new(&dir).join("meshtool"),
        },
        None => {
            let built = build::all(true)?;
            Tools {
                ecsmesh: built.ecsmesh,
                meshtool: built.meshtool,
            }
        }
    };
    let base = match &baseline {
        Some(rev) => Some(baseline::build(rev)?),
        None => None,
    };
    let settings = Settings::new(quick, base.as_ref().map(|b| b.describe()), &focus)?;
    println!(
        "xtask bench{}: modes {}, rates {:?} req/s, {} round(s)",
        if quick { " --quick" } else { "" },
        settings.measured.join("/"),
        settings.rates,
        settings.rounds
    );
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut bench = Bench::new(tools.clone(), settings.clone(), base.map(|b| b.ecsmesh))?;
    bench.latency_rounds()?;
    if !bench.s.latency_only {
        bench.bulk_rounds()?;
        bench.sweep()?;
    }
    let raw = Raw {
        settings,
        cells: std::mem::take(&mut bench.cells),
        bulk: std::mem::take(&mut bench.bulk),
        sweep: std::mem::take(&mut bench.sweep_cells),
        started: date,
        elapsed_s: started.elapsed().as_secs_f64(),
        machine: machine_facts(),
    };
    drop(bench);
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    report::write(&raw, &dir)?;
    println!(
        "xtask bench: done in {:.0} s; {}",
        started.elapsed().as_secs_f64(),
        dir.join("report.md").display()
    );
    Ok(())
}

pub fn machine_facts() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let nproc = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .unwrap_or(0);
    m.insert("nproc".into(), nproc.to_string());
    m.insert(
        "kernel".into(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    m.insert(
        "cpu_model".into(),
        cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
            .unwrap_or("?")
            .trim()
            .to_owned(),
    );
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    m.insert(
        "memory".into(),
        mem.lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("MemTotal:")
            .trim()
            .to_owned(),
    );
    m
}

/// Smoke check for `cargo xtask test`: the report parses and every mode carried traffic
/// without errors.
pub fn smoke() -> Result<()> {
    let path = out_dir().join("report.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let mut checked = 0;
    // A focused run measured fewer modes than it set up.
    let measured = &v["settings"]["measured"];
    let listed = if measured.as_array().is_some_and(|m| !m.is_empty()) {
        measured
    } else {
        &v["settings"]["modes"]
    };
    let modes: Vec<&str> = listed
        .as_array()
        .context("report.json: no settings.modes")?
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    for mode in modes {
        let rates = v["modes"][mode]
            .as_object()
            .with_context(|| format!("report.json: no results for mode {mode}"))?;
        if rates.is_empty() {
            bail!("report.json: mode {mode} has no rates");
        }
        for (rate, r) in rates {
            let ok = r["ok"].as_u64().unwrap_or(0);
            let errors = r["errors"].as_u64().unwrap_or(u64::MAX);
            if ok == 0 || errors != 0 {
                bail!("report.json: {mode} at {rate} req/s: ok {ok}, errors {errors}");
            }
            for key in ["p50_us", "p99_us", "added_p99_us", "cpu_cores", "rss_bytes"] {
                if !r[key].is_number() {
                    bail!("report.json: {mode} at {rate} req/s: {key} missing");
                }
            }
            checked += 1;
        }
        let t = &v["throughput"][mode];
        if t["bytes_per_sec"].as_f64().unwrap_or(0.0) <= 0.0
            || t["errors"].as_u64().is_none_or(|e| e != 0)
        {
            bail!("report.json: {mode} single-connection throughput failed: {t}");
        }
    }
    let sweep = v["sweep"].as_array().context("report.json: no sweep")?;
    if sweep.is_empty() {
        bail!("report.json: empty sweep");
    }
    for s in sweep {
        if s["ok"].as_u64().unwrap_or(0) == 0 || s["errors"].as_u64() != Some(0) {
            bail!("report.json: sweep point failed: {s}");
        }
    }
    println!(
        "xtask bench smoke: report.json well formed; {checked} mode/rate cells and {} sweep points carried traffic with 0 errors",
        sweep.len()
    );
    Ok(())
}

/// One pair of tasks per mode: client on instance 0, server on instance 1 (`node-base`:
/// on instances 2 and 3, which run the baseline binary).
struct Pair {
    client_inst: usize,
    client: usize,
    server_inst: usize,
    server: usize,
}

struct Bench {
    w: World,
    s: Settings,
    pairs: Vec<Pair>,
    /// The stunnel pair (server side, client side), killed on drop.
    peers: Vec<process::Proc>,
    peer_cgroups: Vec<PathBuf>,
    /// Sweep tasks by index on each instance (same index on both).
    sweep_tasks: Vec<usize>,
    cells: Vec<Cell>,
    bulk: Vec<BulkCell>,
    sweep_cells: Vec<SweepCell>,
    marker: String,
    started: Instant,
    /// The modes of this run, in `MODES` order.
    modes: Vec<&'static str>,
    /// The baseline `ecsmesh` of `node-base`.
    baseline: Option<PathBuf>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.peers.clear();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl Bench {
    fn new(tools: Tools, s: Settings, baseline: Option<PathBuf>) -> Result<Self> {
        let modes: Vec<&'static str> = MODES
            .iter()
            .copied()
            .filter(|m| s.modes.iter().any(|x| x == m))
            .collect();
        let mut w = World::new(tools, if baseline.is_some() { 4 } else { 2 });
        for i in 0..w.instances.len() {
            w.pin(i, i % 2);
        }
        w.enable_mesh(TRUST_DOMAIN);
        let marker = format!("ecsmesh-test/{}", w.id);
        let mut pairs = Vec::new();
        for mode in MODES {
            // Every mode keeps its index; a mode not in this run gets no tasks.
            let (ci, si) = if mode == "node-base" { (2, 3) } else { (0, 1) };
            if !modes.contains(&mode) {
                pairs.push(Pair {
                    client_inst: ci,
                    client: usize::MAX,
                    server_inst: si,
                    server: usize::MAX,
                });
                continue;
            }
            let client = w.add_task(ci, NetworkMode::Bridge, 1);
            let server = w.add_task(si, NetworkMode::Bridge, 1);
            w.instances[si].tasks[server].server(0, &http_server_args(&s));
            pairs.push(Pair {
                client_inst: ci,
                client,
                server_inst: si,
                server,
            });
        }
        let mut b = Self {
            w,
            s,
            pairs,
            peers: Vec::new(),
            peer_cgroups: Vec::new(),
            sweep_tasks: Vec::new(),
            cells: Vec::new(),
            bulk: Vec::new(),
            sweep_cells: Vec::new(),
            marker,
            started: Instant::now(),
            modes,
            baseline,
        };
        b.write_discovery(false);
        b.restart_node_proxies()?;
        let opts = b.proxy_opts();
        let sc = &b.pairs[mode_index("sidecar")];
        let (c, sv) = (sc.client, sc.server);
        b.w.instances[1].start_sidecar(sv, &opts);
        b.w.instances[0].start_sidecar(c, &opts);
        b.start_peer()?;
        // Every mode answers before anything is measured.
        for mode in b.modes.clone() {
            let r = b.run_load(mode, 50.0, 2, 200, 300, false)?;
            if r.ok == 0 || r.errors != 0 {
                bail!("bench: {mode} does not carry traffic: {r:?}");
            }
        }
        Ok(b)
    }

    /// Whether a cell whose neighbours were busy is measured again.
    fn retry(&self, neighbours: f64, attempts: usize, busiest: Option<String>) -> bool {
        let again = neighbours > NEIGHBOUR_LIMIT
            && attempts <= self.s.max_retries
            && self.started.elapsed() < Duration::from_secs(self.s.retry_budget_s);
        if again {
            println!(
                "    neighbours used {neighbours:.2} cores (busiest: {}): measuring again",
                busiest.unwrap_or_default()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        again
    }

    fn proxy_opts(&self) -> ProxyOptions {
        ProxyOptions {
            workers: Some(self.s.workers),
            ..Default::default()
        }
    }

    /// Discovery: the node pair's server through node proxy B, the sidecar pair's server
    /// through its own sidecar, and the sweep's servers through whichever mode is measured.
    fn write_discovery(&self, sweep_via_sidecar: bool) {
        let b = &self.w.instances[1];
        let mut eps: Vec<(String, SocketAddr, String, Option<SocketAddr>)> = Vec::new();
        let node = &b.tasks[self.pairs[mode_index("node")].server];
        eps.push((
            "bench-node".into(),
            node.addr(SERVER_PORT),
            node.family.clone(),
            Some(b.tunnel_addr()),
        ));
        let http = &b.tasks[self.pairs[mode_index("node-http")].server];
        eps.push((
            "bench-node-http".into(),
            http.addr(HTTP_PORT),
            http.family.clone(),
            Some(b.tunnel_addr()),
        ));
        if self.modes.contains(&"node-base") {
            let p = &self.pairs[mode_index("node-base")];
            let base = &self.w.instances[p.server_inst];
            let server = &base.tasks[p.server];
            eps.push((
                "bench-node-base".into(),
                server.addr(SERVER_PORT),
                server.family.clone(),
                Some(base.tunnel_addr()),
            ));
        }
        let sc = &b.tasks[self.pairs[mode_index("sidecar")].server];
        eps.push((
            "bench-sidecar".into(),
            sc.addr(SERVER_PORT),
            sc.family.clone(),
            Some(sc.sidecar_tunnel_addr()),
        ));
        for (i, &t) in self.sweep_tasks.iter().enumerate() {
            let task = &b.tasks[t];
            let tunnel = if sweep_via_sidecar {
                task.sidecar_tunnel_addr()
            } else {
                b.tunnel_addr()
            };
            eps.push((
                format!("sweep-{i}"),
                task.addr(SERVER_PORT),
                task.family.clone(),
                Some(tunnel),
            ));
        }
        let refs: Vec<(&str, SocketAddr, &str, Option<SocketAddr>)> = eps
            .iter()
            .map(|(s, a, f, t)| (s.as_str(), *a, f.as_str(), *t))
            .collect();
        self.w.write_discovery_with_tunnels(&refs);
    }

    /// (Re)start both node proxies, enrolling the node pair and, with `sweep`, the
    /// current sweep tasks.
    fn restart_node_proxies_with(&mut self, sweep: bool) -> Result<()> {
        for i in 0..2 {
            if self.w.instances[i].proxy.is_some() {
                self.w.instances[i].stop_proxy();
            }
        }
        for i in [1, 0] {
            let enrol_pair = |mode| {
                let p = &self.pairs[mode_index(mode)];
                if i == 0 { p.client } else { p.server }
            };
            let mut enrol = vec![enrol_pair("node"), enrol_pair("node-http")];
            if sweep {
                enrol.extend(self.sweep_tasks.iter().copied());
            }
            let opts = ProxyOptions {
                enrol: Some(enrol),
                ..self.proxy_opts()
            };
            self.w.instances[i].start_proxy(&opts);
        }
        // The baseline's node proxies (instances 2 and 3) start once and keep running.
        if let Some(bin) = &self.baseline
            && self.w.instances[3].proxy.is_none()
        {
            let p = &self.pairs[mode_index("node-base")];
            for (inst, task) in [(p.server_inst, p.server), (p.client_inst, p.client)] {
                let opts = ProxyOptions {
                    enrol: Some(vec![task]),
                    binary: Some(bin.clone()),
                    ..self.proxy_opts()
                };
                self.w.instances[inst].start_proxy(&opts);
            }
        }
        Ok(())
    }

    fn restart_node_proxies(&mut self) -> Result<()> {
        self.restart_node_proxies_with(false)
    }

    fn start_peer(&mut self) -> Result<()> {
        let p = &self.pairs[mode_index("peer")];
        let (ci, si) = (p.client, p.server);
        let ca = self.w.ca_dir().display().to_string();
        let mut files = Vec::new();
        for (inst, t) in [(0usize, ci), (1usize, si)] {
            let task = &self.w.instances[inst].tasks[t];
            let mesh = self.w.instances[inst].mesh.as_ref().unwrap();
            let cert = self.w.workdir.join(format!("peer-{inst}.pem"));
            let key = self.w.workdir.join(format!("peer-{inst}.key"));
            self.w.ca(&[
                "issue",
                "--ca",
                &ca,
                "--issuer",
                &mesh.issuer_dir.display().to_string(),
                "--uri",
                &self.w.identity(&task.family),
                "--out-cert",
                &cert.display().to_string(),
                "--out-key",
                &key.display().to_string(),
            ]);
            files.push((cert, key, mesh.issuer_dir.join("bundle.pem")));
        }
        let server_addr = self.w.instances[1].tasks[si].addr(PEER_PORT);
        let common = |(cert, key, bundle): &(PathBuf, PathBuf, PathBuf)| {
            format!(
                "cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n\
                 sslVersionMin = TLSv1.3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
                cert.display(),
                key.display(),
                bundle.display()
            )
        };
        let head = "foreground = yes\npid =\nsyslog = no\ndebug = 4\n";
        let server_conf = format!(
            "{head}[mesh]\naccept = 0.0.0.0:{PEER_PORT}\nconnect = 127.0.0.1:{SERVER_PORT}\n{}",
            common(&files[1])
        );
        let client_conf = format!(
            "{head}[mesh]\nclient = yes\naccept = {PEER_LOCAL}\nconnect = {server_addr}\n{}",
            common(&files[0])
        );
        for (inst, t, conf) in [(1usize, si, server_conf), (0usize, ci, client_conf)] {
            let path = self.w.workdir.join(format!("stunnel-{inst}.conf"));
            std::fs::write(&path, conf)?;
            let task = &self.w.instances[inst].tasks[t];
            let at = task.side_placement("peer");
            let mut cmd = Command::new(setup::STUNNEL);
            cmd.arg(&path);
            process::place(&mut cmd, &at);
            let log = self.w.workdir.join(format!("stunnel-{inst}.log"));
            let mut proc = process::spawn_logged(cmd, "stunnel", &log);
            // Ready when its port accepts.
            let addr: SocketAddr = if inst == 0 {
                PEER_LOCAL.parse()?
            } else {
                SocketAddr::new(task.ipv4.into(), PEER_PORT)
            };
            let ns = task.netns().expect("bridge task");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let up = ns.run(move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                });
                if up {
                    break;
                }
                if let Ok(Some(st)) = proc.child.try_wait() {
                    bail!(
                        "stunnel exited ({st}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                if Instant::now() > deadline {
                    bail!("stunnel not listening on {addr} in 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.peer_cgroups.push(at.cgroup);
            self.peers.push(proc);
        }
        Ok(())
    }

    /// Mesh processes of a mode (pids) and their cgroups.
    fn mesh_of(&self, mode: &str) -> (Vec<i32>, Vec<PathBuf>) {
        let (a, b) = (&self.w.instances[0], &self.w.instances[1]);
        match mode {
            "node-base" => {
                let (a, b) = (&self.w.instances[2], &self.w.instances[3]);
                (
                    a.proxy_pid().into_iter().chain(b.proxy_pid()).collect(),
                    vec![a.proxy_cgroup(), b.proxy_cgroup()],
                )
            }
            "node" | "node-http" => (
                a.proxy_pid().into_iter().chain(b.proxy_pid()).collect(),
                vec![a.proxy_cgroup(), b.proxy_cgroup()],
            ),
            "sidecar" => {
                let p = &self.pairs[mode_index("sidecar")];
                let (c, s) = (&a.tasks[p.client], &b.tasks[p.server]);
                (
                    c.sidecar_pid().into_iter().chain(s.sidecar_pid()).collect(),
                    [c, s]
                        .iter()
                        .filter_map(|t| t.sidecar.as_ref().map(|x| x.cgroup.clone()))
                        .collect(),
                )
            }
            "peer" => (
                self.peers.iter().map(|p| p.pid()).collect(),
                self.peer_cgroups.clone(),
            ),
            _ => (Vec::new(), Vec::new()),
        }
    }

    /// The client task of a mode's pair.
    fn client(&self, mode: &str) -> &harness::Task {
        let p = &self.pairs[mode_index(mode)];
        &self.w.instances[p.client_inst].tasks[p.client]
    }

    /// The load generator's target for a mode: the server task, or the local stunnel.
    fn target(&self, mode: &str) -> SocketAddr {
        let p = &self.pairs[mode_index(mode)];
        let server = &self.w.instances[p.server_inst].tasks[p.server];
        match mode {
            "peer" => PEER_LOCAL.parse().unwrap(),
            "node-http" => server.addr(HTTP_PORT),
            _ => server.addr(SERVER_PORT),
        }
    }

    fn load_args(
        &self,
        target: SocketAddr,
        rate: f64,
        conns: usize,
        warm: u64,
        dur: u64,
    ) -> Vec<String> {
        strings(&[
            "load",
            &target.to_string(),
            "--rate",
            &rate.to_string(),
            "--connections",
            &conns.to_string(),
            "--warmup-ms",
            &warm.to_string(),
            "--duration-ms",
            &dur.to_string(),
            "--body-bytes",
            &self.s.body_bytes.to_string(),
            "--spin-us",
            &self.s.spin_us.to_string(),
        ])
    }

    fn run_load(
        &self,
        mode: &str,
        rate: f64,
        conns: usize,
        warm: u64,
        dur: u64,
        new_connection: bool,
    ) -> Result<Load> {
        let mut args = self.load_args(self.target(mode), rate, conns, warm, dur);
        if new_connection {
            args.push("--new-connection".into());
        }
        let task = self.client(mode);
        parse_load(process::run(task.meshtool(0, &args)))
    }

    /// One latency cell, measured again (bounded) when the neighbours were busy.
    fn cell(&mut self, kind: &str, mode: &str, round: usize, rate: f64) -> Result<()> {
        let (pids, cgroups) = self.mesh_of(mode);
        let new_connection = kind == "new_connection";
        let conns = if new_connection {
            self.s.new_connection_connections
        } else {
            self.s.connections
        };
        let (warm, dur) = (self.s.warmup_ms, self.s.duration_ms);
        let mut attempts = 0;
        loop {
            attempts += 1;
            measure::reset_peak(&pids);
            let neighbours = measure::Neighbours::start(&self.marker);
            let cpu0 = measure::cgroups_cpu_usec(&cgroups);
            let t0 = Instant::now();
            let mut args = self.load_args(self.target(mode), rate, conns, warm, dur);
            if new_connection {
                args.push("--new-connection".into());
            }
            let task = self.client(mode);
            let mut cmd = task.meshtool(0, &args);
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            // Steady memory: sampled with the connections open, late in the window.
            std::thread::sleep(Duration::from_millis(warm + dur * 4 / 5));
            let mut memory = measure::memory(&pids);
            let load = parse_load(child.wait_with_output()?)?;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = (measure::cgroups_cpu_usec(&cgroups) - cpu0) as f64 / 1e6 / wall;
            memory.peak_rss_bytes = measure::memory(&pids).peak_rss_bytes;
            let (nb, busiest) = neighbours.cores();
            println!(
                "  {kind:<14} {mode:<8} r{round} {rate:>5} rps: p50 {:>5} p90 {:>5} p99 {:>5} p99.9 {:>5} max {:>6} us, ok {} err {}, mesh cpu {:.3} cores, rss {:.1} MiB, neighbours {:.2} cores",
                load.p50_us,
                load.p90_us,
                load.p99_us,
                load.p999_us,
                load.max_us,
                load.ok,
                load.errors,
                cpu,
                memory.rss_bytes as f64 / 1048576.0,
                nb
            );
            if self.retry(nb, attempts, busiest.clone()) {
                continue;
            }
            self.cells.push(Cell {
                kind: kind.into(),
                mode: mode.into(),
                round,
                rate,
                load,
                cpu_cores: cpu,
                memory,
                neighbour_cores: nb,
                busiest_neighbour: busiest,
                attempts,
                wall_s: wall,
            });
            return Ok(());
        }
    }

    fn latency_rounds(&mut self) -> Result<()> {
        let rates = self.s.rates.clone();
        for round in 0..self.s.rounds {
            println!("round {}/{}", round + 1, self.s.rounds);
            // Rotate the order so no mode always runs right after another.
            let measured: Vec<&'static str> = self
                .modes
                .iter()
                .copied()
                .filter(|m| self.s.measured.iter().any(|x| x == m))
                .collect();
            let n = measured.len();
            let order: Vec<&str> = (0..n).map(|i| measured[(i + round) % n]).collect();
            for &rate in &rates {
                for mode in &order {
                    self.cell("keepalive", mode, round, rate)?;
                }
            }
            if self.s.latency_only {
                continue;
            }
            for mode in &order {
                self.cell("new_connection", mode, round, self.s.new_connection_rate)?;
            }
        }
        Ok(())
    }

    fn bulk_rounds(&mut self) -> Result<()> {
        println!("single-connection throughput");
        for round in 0..self.s.rounds {
            for i in 0..self.modes.len() {
                let mode = self.modes[(i + round) % self.modes.len()];
                let (_, cgroups) = self.mesh_of(mode);
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let neighbours = measure::Neighbours::start(&self.marker);
                    let cpu0 = measure::cgroups_cpu_usec(&cgroups);
                    let t0 = Instant::now();
                    let args = strings(&[
                        "bulk",
                        &self.target(mode).to_string(),
                        "--seconds",
                        &self.s.bulk_secs.to_string(),
                    ]);
                    let task = self.client(mode);
                    let out = process::run(task.meshtool(0, &args));
                    let wall = t0.elapsed().as_secs_f64();
                    let cpu = (measure::cgroups_cpu_usec(&cgroups) - cpu0) as f64 / 1e6 / wall;
                    let v: serde_json::Value =
                        serde_json::from_slice(&out.stdout).with_context(|| {
                            format!("bulk output: {}", String::from_utf8_lossy(&out.stderr))
                        })?;
                    let (nb, busiest) = neighbours.cores();
                    let bps = v["bytes_per_sec"].as_f64().unwrap_or(0.0);
                    println!(
                        "  bulk {mode:<8} r{round}: {:.0} MB/s, mesh cpu {cpu:.2} cores, neighbours {nb:.2}",
                        bps / 1e6
                    );
                    if self.retry(nb, attempts, busiest.clone()) {
                        continue;
                    }
                    self.bulk.push(BulkCell {
                        mode: mode.into(),
                        round,
                        bytes_per_sec: bps,
                        error: v["error"].as_str().map(str::to_owned),
                        cpu_cores: cpu,
                        neighbour_cores: nb,
                        attempts,
                    });
                    break;
                }
            }
        }
        Ok(())
    }

    /// Make sure `n` sweep task pairs exist (client on instance 0, server on instance 1,
    /// same index on both).
    fn grow_sweep(&mut self, n: usize) {
        while self.sweep_tasks.len() < n {
            let c = self.w.add_task(0, NetworkMode::Bridge, 1);
            let s = self.w.add_task(1, NetworkMode::Bridge, 1);
            assert_eq!(c, s, "sweep tasks share their index on both instances");
            let args = http_server_args(&self.s);
            self.w.instances[1].tasks[s].server(0, &args);
            self.sweep_tasks.push(c);
        }
    }

    fn sweep(&mut self) -> Result<()> {
        let max = *self.s.sweep_tasks.iter().max().unwrap_or(&1);
        println!("tasks-per-host sweep {:?}", self.s.sweep_tasks);
        let t0 = Instant::now();
        self.grow_sweep(max);
        println!(
            "  {} sweep task pairs ready in {:.1} s",
            max,
            t0.elapsed().as_secs_f64()
        );
        let points = self.s.sweep_tasks.clone();
        // Node mode: the node proxies enrol the first n sweep tasks of each instance.
        for &n in &points {
            let all = std::mem::take(&mut self.sweep_tasks);
            self.sweep_tasks = all[..n].to_vec();
            self.write_discovery(false);
            self.restart_node_proxies_with(true)?;
            self.sweep_tasks = all;
            self.sweep_cell("node", n)?;
        }
        self.write_discovery(true);
        self.restart_node_proxies()?;
        // Sidecar mode: one sidecar per sweep task, started as n grows.
        let mut running = 0;
        for &n in &points {
            let opts = self.proxy_opts();
            let t = Instant::now();
            for &task in &self.sweep_tasks[running..n] {
                self.w.instances[1].spawn_sidecar(task, &opts);
                self.w.instances[0].spawn_sidecar(task, &opts);
            }
            for &task in &self.sweep_tasks[running..n] {
                self.w.instances[1].wait_sidecar_ready(task);
                self.w.instances[0].wait_sidecar_ready(task);
            }
            if n > running {
                println!(
                    "  started {} sidecars in {:.1} s",
                    2 * (n - running),
                    t.elapsed().as_secs_f64()
                );
            }
            running = n;
            self.sweep_cell("sidecar", n)?;
        }
        for &task in &self.sweep_tasks {
            self.w.instances[0].stop_sidecar(task);
            self.w.instances[1].stop_sidecar(task);
        }
        Ok(())
    }

    fn sweep_mesh(&self, mode: &str, n: usize) -> (Vec<i32>, Vec<PathBuf>) {
        if mode == "node" {
            return self.mesh_of("node");
        }
        let mut pids = Vec::new();
        let mut cgroups = Vec::new();
        // Sweep tasks live on instances 0 and 1 (2 and 3 hold only the baseline pair).
        for inst in &self.w.instances[..2] {
            for &t in &self.sweep_tasks[..n] {
                if let Some(sc) = &inst.tasks[t].sidecar {
                    pids.push(sc.proc.pid());
                    cgroups.push(sc.cgroup.clone());
                }
            }
        }
        (pids, cgroups)
    }

    /// n client tasks send concurrently, each to its own server task at a light rate over
    /// one keep-alive connection.
    fn sweep_cell(&mut self, mode: &str, n: usize) -> Result<()> {
        let (pids, cgroups) = self.sweep_mesh(mode, n);
        let (warm, dur) = (1000, self.s.sweep_duration_ms);
        let mut attempts = 0;
        loop {
            attempts += 1;
            measure::reset_peak(&pids);
            let neighbours = measure::Neighbours::start(&self.marker);
            let cpu0 = measure::cgroups_cpu_usec(&cgroups);
            let t0 = Instant::now();
            let mut children = Vec::new();
            for &t in &self.sweep_tasks[..n] {
                let target = self.w.instances[1].tasks[t].addr(SERVER_PORT);
                let mut args = self.load_args(target, self.s.sweep_rate_per_task, 1, warm, dur);
                args.push("--dump".into());
                let mut cmd = self.w.instances[0].tasks[t].meshtool(0, &args);
                children.push(
                    cmd.stdin(Stdio::null())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()?,
                );
            }
            std::thread::sleep(Duration::from_millis(warm + dur * 4 / 5));
            let mut memory = measure::memory(&pids);
            let max_process = pids
                .iter()
                .map(|p| measure::memory(&[*p]).rss_bytes)
                .max()
                .unwrap_or(0);
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
            let (mut ok, mut errors) = (0, 0);
            let mut first_error = None;
            for c in children {
                let l = parse_load(c.wait_with_output()?)?;
                ok += l.ok;
                errors += l.errors;
                first_error = first_error.or(l.first_error);
                for us in l.latencies_us.unwrap_or_default() {
                    let _ = hist.record(u64::from(us.max(1)));
                }
            }
            let wall = t0.elapsed().as_secs_f64();
            let cpu = (measure::cgroups_cpu_usec(&cgroups) - cpu0) as f64 / 1e6 / wall;
            memory.peak_rss_bytes = measure::memory(&pids).peak_rss_bytes;
            let (nb, busiest) = neighbours.cores();
            println!(
                "  sweep {mode:<8} {n:>3} tasks/host: p50 {:>5} p99 {:>5} us, ok {ok} err {errors}, mesh cpu {cpu:.3} cores, rss {:.1} MiB ({} processes), neighbours {nb:.2}",
                hist.value_at_quantile(0.5),
                hist.value_at_quantile(0.99),
                memory.rss_bytes as f64 / 1048576.0,
                pids.len()
            );
            if self.retry(nb, attempts, busiest.clone()) {
                continue;
            }
            self.sweep_cells.push(SweepCell {
                mode: mode.into(),
                tasks_per_host: n,
                ok,
                errors,
                first_error,
                p50_us: hist.value_at_quantile(0.5),
                p99_us: hist.value_at_quantile(0.99),
                max_us: hist.max(),
                cpu_cores: cpu,
                memory,
                max_process_rss_bytes: max_process,
                processes: pids.len(),
                open_connections_per_host: n,
                neighbour_cores: nb,
                attempts,
            });
            return Ok(());
        }
    }
}

fn http_server_args(s: &Settings) -> Vec<String> {
    strings(&[
        "http-server",
        "--listen",
        &format!("0.0.0.0:{SERVER_PORT}"),
        "--listen",
        &format!("0.0.0.0:{HTTP_PORT}"),
        "--body-bytes",
        &s.body_bytes.to_string(),
        "--max-secs",
        "3600",
    ])
}

pub fn mode_index(mode: &str) -> usize {
    MODES.iter().position(|m| *m == mode).expect("known mode")
}

fn parse_load(out: std::process::Output) -> Result<Load> {
    if !out.status.success() {
        bail!(
            "meshtool load failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "meshtool load output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
