//! The simulated ECS cluster: instances, tasks, servers and node proxies.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde::Deserialize;

mod mesh;
mod sidecar;

pub use sidecar::{SIDECAR_ADMIN, SIDECAR_INBOUND, Sidecar, TUNNEL_PORT};

use crate::{
    Tools,
    cgroup::CgroupTree,
    netns::Netns,
    process::{self, Placement, Proc},
    uid,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    Host,
    Bridge,
}

/// What one client connection saw (meshtool's report).
#[derive(Debug, Deserialize)]
pub struct ConnReport {
    pub target: SocketAddr,
    pub peer: Option<SocketAddr>,
    pub served_by: Option<String>,
    pub ok: bool,
    pub error: Option<String>,
}

pub struct Task {
    pub id: String,
    pub family: String,
    pub mode: NetworkMode,
    /// One cgroup per container.
    pub cgroups: Vec<PathBuf>,
    /// The task's own address (bridge mode) or the instance address (host mode).
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// CPU every process of this task is pinned to (see `World::pin`).
    pub cpu: Option<usize>,
    netns_path: PathBuf,
    // Dropped before the netns (field order): servers, then the sidecar.
    servers: Vec<Proc>,
    pub sidecar: Option<Sidecar>,
    own_netns: Option<Netns>,
    tools: Tools,
}

impl Task {
    pub fn placement(&self, container: usize) -> Placement {
        Placement {
            netns: self.netns_path.clone(),
            cgroup: self.cgroups[container].clone(),
            cpu: self.cpu,
        }
    }

    /// The task's cgroup directory: the parent of its container cgroups.
    pub fn dir(&self) -> PathBuf {
        self.cgroups[0]
            .parent()
            .expect("container cgroups sit in a task directory")
            .to_path_buf()
    }

    /// A place for a helper process beside the containers (a sidecar-like "container"):
    /// the task's netns, a new cgroup `<task dir>/<name>` that no proxy enrols, the task's CPU.
    pub fn side_placement(&self, name: &str) -> Placement {
        let cgroup = self.dir().join(name);
        std::fs::create_dir_all(&cgroup).expect("mkdir cgroup");
        Placement {
            netns: self.netns_path.clone(),
            cgroup,
            cpu: self.cpu,
        }
    }

    /// A meshtool server (prints READY when listening) in container `container`, kept
    /// until the task is dropped.
    pub fn server(&mut self, container: usize, args: &[String]) {
        let mut cmd = Command::new(&self.tools.meshtool);
        cmd.args(args);
        process::place(&mut cmd, &self.placement(container));
        self.servers.push(process::spawn_ready(cmd, &args[0]));
    }

    /// Kills server `i` (in start order) of this task, as a crashed application.
    pub fn kill_server(&mut self, i: usize) {
        drop(self.servers.remove(i));
    }

    /// The sidecar's /metrics, read inside the task netns.
    pub fn sidecar_metrics(&self) -> prometheus_parse::Scrape {
        let ns = self
            .own_netns
            .as_ref()
            .expect("sidecars serve bridge tasks");
        let (status, body) = ns
            .http_get(SIDECAR_ADMIN.parse().unwrap(), "/metrics")
            .expect("GET sidecar /metrics");
        assert_eq!(status, 200);
        crate::metrics::parse(&body)
    }

    pub fn sidecar_log(&self) -> String {
        self.sidecar
            .as_ref()
            .map(|s| std::fs::read_to_string(&s.log).unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn netns(&self) -> Option<&Netns> {
        self.own_netns.as_ref()
    }

    /// A meshtool command placed in container `container` of this task.
    pub fn meshtool(&self, container: usize, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.tools.meshtool);
        cmd.args(args);
        process::place(&mut cmd, &self.placement(container));
        cmd
    }

    /// Connect to every target `repeat` times concurrently; one report per connection.
    pub fn client(&self, targets: &[SocketAddr], repeat: usize, bytes: usize) -> Vec<ConnReport> {
        run_client(self.meshtool(0, &client_args(targets, repeat, bytes)))
    }
}

pub fn client_args(targets: &[SocketAddr], repeat: usize, bytes: usize) -> Vec<String> {
    let mut args = vec!["client".into(), "--repeat".into(), repeat.to_string()];
    args.extend(["--bytes".into(), bytes.to_string()]);
    args.extend(targets.iter().map(|t| t.to_string()));
    args
}

/// The proxy's default server-speaks-first ports.
pub const PROXY_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Config lines node proxies and sidecars share: `opaque_ports` and `mode`.
fn common_text(opts: &ProxyOptions) -> String {
    let opaque = opts.opaque_ports.clone().unwrap_or_else(|| {
        let mut v = PROXY_OPAQUE_PORTS.to_vec();
        v.extend([8080, 9000, 9001, 9002]);
        v
    });
    let detect = opts
        .detect_timeout_ms
        .map(|ms| format!("detect_timeout_ms = {ms}\n"))
        .unwrap_or_default();
    opts.top_level_toml.clone()
        + &detect
        + &format!(
            "opaque_ports = [{}]\nmode = \"{}\"\n",
            opaque
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if opts.strict { "strict" } else { "permissive" }
        )
}

/// The config as an older `ecsmesh` accepts it: top-level fields its `check-config`
/// reports as unknown are left out (they are features the older binary does not have;
/// each is printed). Panics when the config fails for another reason.
pub fn compatible_config(bin: &Path, workdir: &Path, mut text: String) -> String {
    let path = workdir.join("compat-check.toml");
    for _ in 0..32 {
        std::fs::write(&path, &text).expect("write config");
        let out = Command::new(bin)
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run check-config");
        if out.status.success() {
            return text;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let field = err
            .split("unknown field `")
            .nth(1)
            .and_then(|rest| rest.split('`').next())
            .unwrap_or_else(|| panic!("{} rejects the config: {err}", bin.display()));
        println!("{}: leaving out `{field}` (unknown to it)", bin.display());
        text = text
            .lines()
            .filter(|l| !l.trim_start().starts_with(&format!("{field} =")))
            .map(|l| format!("{l}\n"))
            .collect();
    }
    panic!("{}: config still rejected after 32 fields", bin.display());
}

/// One `[[tasks]]` entry of a proxy config.
fn task_text(task: &Task, network_mode: &str) -> String {
    let cgroups: Vec<String> = task
        .cgroups
        .iter()
        .map(|c| format!("\"{}\"", c.display()))
        .collect();
    format!(
        "\n[[tasks]]\nid = \"{}\"\nfamily = \"{}\"\nnetwork_mode = \"{network_mode}\"\ncgroups = [{}]\n",
        task.id,
        task.family,
        cgroups.join(", ")
    )
}

pub fn run_client(cmd: Command) -> Vec<ConnReport> {
    let out = process::run(cmd);
    assert!(
        out.status.success(),
        "meshtool client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "meshtool output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Node proxy options beyond what the world derives itself.
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    pub exclude_cidrs: Vec<String>,
    /// Tasks (by index on the instance) to enrol; all when None.
    pub enrol: Option<Vec<usize>>,
    /// Run the proxy in this cgroup instead of `<instance>/proxy`.
    pub cgroup: Option<PathBuf>,
    /// Strict mode: unknown destinations are closed instead of passed through, and what
    /// the redirect cannot carry is refused in the kernel.
    pub strict: bool,
    pub svid_lifetime_secs: Option<u64>,
    pub tunnel_stream_cap: Option<usize>,
    /// Authorization allow rules: (source pattern, destination family, port).
    pub allow: Vec<(String, Option<String>, Option<u16>)>,
    /// Raw TOML appended to the generated config (e.g. an `[ecs]` table).
    pub extra_toml: String,
    /// `--workers` (tokio worker threads); the proxy's default when None.
    pub workers: Option<usize>,
    /// Admin on the instance's fabric address (port 15000) instead of its loopback, so
    /// an operator command in another instance (`ca activate --node`) can reach it.
    pub admin_on_fabric: bool,
    /// Trust bundle path instead of the one `ecsmesh ca` keeps in the issuer directory
    /// (a node whose copy of the bundle is distributed separately, and may lag).
    pub bundle: Option<PathBuf>,
    /// Attach the programs to this directory below the instance's cgroup root instead of
    /// the root itself (e.g. `ecstasks.slice`, as on a real ECS instance).
    pub attach_below: Option<PathBuf>,
    /// No `bridge_ipv6`: bridge tasks have no IPv6 listener to be redirected to.
    pub no_bridge_ipv6: bool,
    /// `opaque_ports`; by default the proxy's own list plus the ports the older tests and
    /// the benchmark's opaque rows use for raw TCP (8080, 9000–9002), so only the HTTP
    /// tests' ports see protocol detection.
    pub opaque_ports: Option<Vec<u16>>,
    /// `detect_timeout_ms` (the proxy's default when None).
    pub detect_timeout_ms: Option<u64>,
    /// `dns_resolvers` (empty by default: the harness has no resolver, and the host's
    /// resolv.conf must not leak into tests).
    pub dns_resolvers: Vec<std::net::IpAddr>,
    /// Run this `ecsmesh` binary instead of the world's (the benchmark's baseline build).
    /// Config fields it does not know are left out (see `compatible_config`).
    pub binary: Option<PathBuf>,
    /// Raw TOML placed among the top-level keys, before any table (e.g.
    /// `tunnel_keepalive_interval_secs = 1\n`); `extra_toml` goes at the end.
    pub top_level_toml: String,
    /// Start the proxy with this soft `RLIMIT_NOFILE` (`ulimit -n`); the hard limit is
    /// kept.
    pub nofile_soft: Option<u64>,
    /// `[identity] template` instead of the default.
    pub identity_template: Option<String>,
    /// `task_role` of every static task (for templates naming `{task_role}`).
    pub task_role: Option<String>,
    /// Issuer mode: `[identity] issuer_url` and how the proxy attests (TOML lines, e.g.
    /// `imds_url = "…"`) instead of `issuer_dir`.
    pub issuer: Option<(String, String)>,
}

/// Identity material of one instance, made by `World::enable_mesh`.
#[derive(Clone, Debug)]
pub struct InstanceMesh {
    pub trust_domain: String,
    pub issuer_dir: PathBuf,
    pub discovery: PathBuf,
}

/// The cluster name the harness uses in identities.
pub const CLUSTER: &str = "test";

pub struct Proxy {
    pub proc: Proc,
    pub config: PathBuf,
    pub log: PathBuf,
}

pub struct Instance {
    pub index: usize,
    pub name: String,
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub bridge_v4: Ipv4Addr,
    pub bridge_v6: Ipv6Addr,
    /// The cgroup the node proxy attaches to: every task of this instance is below it.
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub admin: SocketAddr,
    pub tasks: Vec<Task>,
    pub proxy: Option<Proxy>,
    pub mesh: Option<InstanceMesh>,
    /// CPU every process of this instance is pinned to (see `World::pin`).
    pub cpu: Option<usize>,
    servers: Vec<Proc>,
    workdir: PathBuf,
    tools: Tools,
}

pub const OUTBOUND_PORT: u16 = 15001;

impl Instance {
    fn placement(&self, rel_cgroup: &str) -> Placement {
        let cg = self.cgroup_root.join(rel_cgroup);
        std::fs::create_dir_all(&cg).expect("mkdir cgroup");
        Placement {
            netns: self.netns.path(),
            cgroup: cg,
            cpu: self.cpu,
        }
    }

    /// Echo servers in the instance netns (unenrolled cgroup `servers`).
    pub fn echo_server(&mut self, listen: &[SocketAddr]) {
        let mut args = vec!["echo".to_owned()];
        args.extend(listen.iter().map(|a| a.to_string()));
        self.server(&args);
    }

    /// Any meshtool server (prints READY when listening), unenrolled, kept until drop.
    pub fn server(&mut self, args: &[String]) {
        let mut cmd = Command::new(&self.tools.meshtool);
        cmd.args(args);
        process::place(&mut cmd, &self.placement("servers"));
        self.servers.push(process::spawn_ready(cmd, &args[0]));
    }

    /// Any other program (a Prometheus server, say) in the instance netns, unenrolled,
    /// its output in `log`; killed on drop.
    pub fn spawn_program(&mut self, program: &Path, args: &[String], log: &Path) {
        let mut cmd = Command::new(program);
        cmd.args(args);
        process::place(&mut cmd, &self.placement("servers"));
        let name = program.display().to_string();
        self.servers.push(process::spawn_logged(cmd, &name, log));
    }

    /// A meshtool command in the instance netns, in an unenrolled cgroup.
    pub fn unenrolled(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.tools.meshtool);
        cmd.args(args);
        process::place(&mut cmd, &self.placement("unenrolled"));
        cmd
    }

    pub fn config_text(&self, opts: &ProxyOptions) -> String {
        let mut t = format!(
            "instance = \"{}\"\npin_dir = \"{}\"\ncgroup_root = \"{}\"\nadmin_addr = \"{}\"\n\
             admin_socket = \"{}\"\nstate_dir = \"{}\"\noutbound_port = {OUTBOUND_PORT}\n\
             bridge_ipv4 = \"{}\"\n",
            self.name,
            self.pin_dir.display(),
            match &opts.attach_below {
                Some(below) => {
                    let dir = self.cgroup_root.join(below);
                    std::fs::create_dir_all(&dir).expect("mkdir attach cgroup");
                    dir
                }
                None => self.cgroup_root.clone(),
            }
            .display(),
            self.admin,
            self.admin_socket().display(),
            self.workdir.join(format!("{}-state", self.name)).display(),
            self.bridge_v4,
        );
        t += &common_text(opts);
        if !opts.no_bridge_ipv6 {
            t += &format!("bridge_ipv6 = \"{}\"\n", self.bridge_v6);
        }
        t += &format!(
            "dns_resolvers = [{}]\n",
            opts.dns_resolvers
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let cidrs: Vec<String> = opts
            .exclude_cidrs
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect();
        t += &format!("exclude_cidrs = [{}]\n", cidrs.join(", "));
        t += &self.mesh_text(opts);
        for (i, task) in self.tasks.iter().enumerate() {
            if opts.enrol.as_ref().is_some_and(|e| !e.contains(&i)) {
                continue;
            }
            t += &task_text(
                task,
                if task.mode == NetworkMode::Host {
                    "host"
                } else {
                    "bridge"
                },
            );
            if let Some(role) = &opts.task_role {
                t += &format!("task_role = \"{role}\"\n");
            }
        }
        t
    }

    /// The mTLS part of a proxy config (empty without `World::enable_mesh`).
    fn mesh_text(&self, opts: &ProxyOptions) -> String {
        let mut t = String::new();
        if let Some(mesh) = &self.mesh {
            t += &format!(
                "cluster = \"{CLUSTER}\"\ndiscovery_file = \"{}\"\n",
                mesh.discovery.display(),
            );
            if let Some(cap) = opts.tunnel_stream_cap {
                t += &format!("tunnel_stream_cap = {cap}\n");
            }
            t += &format!(
                "\n[identity]\ntrust_domain = \"{}\"\nbundle = \"{}\"\nsvid_lifetime_secs = {}\n",
                mesh.trust_domain,
                opts.bundle
                    .clone()
                    .unwrap_or_else(|| mesh.issuer_dir.join("bundle.pem"))
                    .display(),
                opts.svid_lifetime_secs.unwrap_or(86_400)
            );
            match &opts.issuer {
                Some((url, attest)) => t += &format!("issuer_url = \"{url}\"\n{attest}\n"),
                None => t += &format!("issuer_dir = \"{}\"\n", mesh.issuer_dir.display()),
            }
            if let Some(template) = &opts.identity_template {
                t += &format!("template = \"{template}\"\n");
            }
            for (source, family, port) in &opts.allow {
                t += &format!("\n[[authorization.allow]]\nsource = \"{source}\"\n");
                if let Some(f) = family {
                    t += &format!("destination_family = \"{f}\"\n");
                }
                if let Some(p) = port {
                    t += &format!("port = {p}\n");
                }
            }
        }
        t += &opts.extra_toml;
        t
    }

    /// Pid of the node proxy, if running.
    pub fn proxy_pid(&self) -> Option<i32> {
        self.proxy.as_ref().map(|p| p.proc.pid())
    }

    /// Pids of this instance's mesh processes: the node proxy and every task's sidecar.
    pub fn mesh_pids(&self) -> Vec<i32> {
        self.proxy_pid()
            .into_iter()
            .chain(
                self.tasks
                    .iter()
                    .filter_map(|t| t.sidecar.as_ref().map(|s| s.proc.pid())),
            )
            .collect()
    }

    /// The node proxy's cgroup when it runs in the default place.
    pub fn proxy_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("proxy")
    }

    /// Write a config file and return the `ecsmesh run` command, placed in the proxy cgroup.
    pub fn proxy_command(&self, config_text: &str, cgroup: Option<&Path>) -> (Command, PathBuf) {
        self.proxy_command_of(&self.tools.ecsmesh, config_text, cgroup)
    }

    fn proxy_command_of(
        &self,
        bin: &Path,
        config_text: &str,
        cgroup: Option<&Path>,
    ) -> (Command, PathBuf) {
        let config = self.workdir.join(format!("{}.toml", self.name));
        std::fs::write(&config, config_text).expect("write config");
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info");
        let mut at = self.placement("proxy");
        if let Some(cg) = cgroup {
            at.cgroup = cg.to_path_buf();
        }
        process::place(&mut cmd, &at);
        (cmd, config)
    }

    /// Starts the proxy without waiting for ready (which may need an ECS agent that is
    /// not answering yet).
    pub fn spawn_proxy(&mut self, opts: &ProxyOptions) {
        let text = self.config_text(opts);
        let (cmd, config) = self.proxy_command(&text, None);
        let log = self
            .workdir
            .join(format!("{}-proxy-{}.log", self.name, crate::uid()));
        let proc = process::spawn_logged(cmd, "ecsmesh", &log);
        self.proxy = Some(Proxy { proc, config, log });
    }

    pub fn start_proxy(&mut self, opts: &ProxyOptions) {
        if opts.admin_on_fabric {
            self.admin = self.addr(15000);
        }
        let mut text = self.config_text(opts);
        if let Some(bin) = &opts.binary {
            text = compatible_config(bin, &self.workdir, text);
        }
        let bin = opts.binary.as_deref().unwrap_or(&self.tools.ecsmesh);
        let (mut cmd, config) = self.proxy_command_of(bin, &text, opts.cgroup.as_deref());
        if let Some(n) = opts.workers {
            cmd.arg("--workers").arg(n.to_string());
        }
        if let Some(soft) = opts.nofile_soft {
            process::set_nofile_soft(&mut cmd, soft);
        }
        let log = self.workdir.join(format!("{}-proxy.log", self.name));
        let proc = process::spawn_logged(cmd, "ecsmesh", &log);
        self.proxy = Some(Proxy { proc, config, log });
        self.wait_ready();
    }

    pub fn proxy_log(&self) -> String {
        self.proxy
            .as_ref()
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = self.netns.http_get(self.admin, "/ready") {
                return;
            }
            let proxy = self.proxy.as_mut().unwrap();
            if let Ok(Some(st)) = proxy.proc.child.try_wait() {
                panic!("ecsmesh exited ({st}) before ready:\n{}", self.proxy_log());
            }
            assert!(
                Instant::now() < deadline,
                "ecsmesh not ready in 20 s:\n{}",
                self.proxy_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The operator's admin socket (every route, including `POST /reload`).
    pub fn admin_socket(&self) -> PathBuf {
        self.workdir.join(format!("{}-admin.sock", self.name))
    }

    /// The node's admin URL as an operator elsewhere on the fabric would give it.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// `/trust`: the fingerprints of the anchors the node trusts and of its issuer.
    pub fn trust(&self) -> serde_json::Value {
        let (status, body) = self
            .netns
            .http_get(self.admin, "/trust")
            .expect("GET /trust");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("/trust is JSON")
    }

    pub fn metrics(&self) -> prometheus_parse::Scrape {
        let (status, body) = self
            .netns
            .http_get(self.admin, "/metrics")
            .expect("GET /metrics");
        assert_eq!(status, 200);
        crate::metrics::parse(&body)
    }

    /// SIGTERM the proxy and wait for a clean exit.
    pub fn stop_proxy(&mut self) -> std::process::ExitStatus {
        let mut proxy = self.proxy.take().expect("proxy running");
        proxy.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let st = proxy
            .proc
            .wait_timeout(Duration::from_secs(15))
            .expect("proxy exits after SIGTERM");
        let log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
        assert!(st.success(), "proxy exit {st}:\n{log}");
        st
    }

    pub fn outbound_v4(&self, mode: NetworkMode) -> SocketAddr {
        match mode {
            NetworkMode::Host => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
            NetworkMode::Bridge => SocketAddr::new(self.bridge_v4.into(), OUTBOUND_PORT),
        }
    }

    pub fn outbound_v6(&self, mode: NetworkMode) -> SocketAddr {
        match mode {
            NetworkMode::Host => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT),
            NetworkMode::Bridge => SocketAddr::new(self.bridge_v6.into(), OUTBOUND_PORT),
        }
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ipv6), port)
    }

    /// The node proxy's tunnel (inbound) address.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.addr(TUNNEL_PORT)
    }
}

impl Task {
    /// `port` on the task's own address (bridge mode) or the instance address (host mode).
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    /// The tunnel address of this task's sidecar.
    pub fn sidecar_tunnel_addr(&self) -> SocketAddr {
        self.addr(TUNNEL_PORT)
    }

    pub fn sidecar_pid(&self) -> Option<i32> {
        self.sidecar.as_ref().map(|s| s.proc.pid())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            p.proc.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = p.proc.wait_timeout(Duration::from_secs(10));
        }
        // Covers kill -9 tests and panics mid-test.
        let _ = Command::new(&self.tools.ecsmesh)
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output();
        self.servers.clear();
        self.tasks.clear();
    }
}

pub struct World {
    pub id: String,
    pub instances: Vec<Instance>,
    // Dropped after the instances (field order): their processes live in these cgroups.
    pub cgroups: CgroupTree,
    pub fabric: Netns,
    pub workdir: PathBuf,
    pub tools: Tools,
}

impl World {
    /// `n` container instances on one fabric: 10.0.0.(i+1)/24 and fd00::(i+1)/64 on eth0,
    /// a docker0 bridge with 172.(17+i).0.1/24 and fd17:i::1/64, routes to the others' bridges.
    pub fn new(tools: Tools, n: usize) -> Self {
        assert!((1..=8).contains(&n), "1 to 8 instances");
        let id = uid();
        let workdir = std::env::temp_dir().join(format!("ecsmesh-{id}"));
        std::fs::create_dir_all(&workdir).unwrap();
        let cgroups = CgroupTree::new(&id);
        let fabric = Netns::new(&format!("em{id}f"));
        fabric.ip(&["link", "add", "fab", "type", "bridge"]);
        fabric.ip(&["link", "set", "fab", "up"]);
        let mut instances = Vec::new();
        for i in 0..n {
            let name = format!("inst{i}");
            let netns = Netns::new(&format!("em{id}i{i}"));
            let port = format!("p{i}");
            fabric.ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns.name,
            ]);
            fabric.ip(&["link", "set", &port, "master", "fab", "up"]);
            let ipv4 = Ipv4Addr::new(10, 0, 0, i as u8 + 1);
            let ipv6: Ipv6Addr = format!("fd00::{}", i + 1).parse().unwrap();
            netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"]);
            netns.ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"]);
            netns.ip(&["link", "set", "eth0", "up"]);
            let bridge_v4 = Ipv4Addr::new(172, 17 + i as u8, 0, 1);
            let bridge_v6: Ipv6Addr = format!("fd17:{i}::1").parse().unwrap();
            netns.ip(&["link", "add", "docker0", "type", "bridge"]);
            netns.ip(&["addr", "add", &format!("{bridge_v4}/24"), "dev", "docker0"]);
            netns.ip(&[
                "addr",
                "add",
                &format!("{bridge_v6}/64"),
                "dev",
                "docker0",
                "nodad",
            ]);
            netns.ip(&["link", "set", "docker0", "up"]);
            netns.sysctl("net.ipv4.ip_forward", "1");
            netns.sysctl("net.ipv6.conf.all.forwarding", "1");
            for j in (0..n).filter(|j| *j != i) {
                netns.ip(&[
                    "route",
                    "add",
                    &format!("172.{}.0.0/24", 17 + j),
                    "via",
                    &format!("10.0.0.{}", j + 1),
                ]);
                netns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("fd17:{j}::/64"),
                    "via",
                    &format!("fd00::{}", j + 1),
                ]);
            }
            let cgroup_root = cgroups.dir(&name);
            instances.push(Instance {
                index: i,
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/ecsmesh-test-{id}-{name}")),
                admin: "127.0.0.1:15000".parse().unwrap(),
                name,
                netns,
                ipv4,
                ipv6,
                bridge_v4,
                bridge_v6,
                cgroup_root,
                tasks: Vec::new(),
                proxy: None,
                mesh: None,
                cpu: None,
                servers: Vec::new(),
                workdir: workdir.clone(),
                tools: tools.clone(),
            });
        }
        Self {
            id,
            instances,
            cgroups,
            fabric,
            workdir,
            tools,
        }
    }

    /// Add a task with `containers` containers (cgroups) on instance `inst`.
    pub fn add_task(&mut self, inst: usize, mode: NetworkMode, containers: usize) -> usize {
        let instance = &mut self.instances[inst];
        let k = instance.tasks.len();
        let id = format!("{}-t{k}", instance.name);
        let cgroups: Vec<PathBuf> = (0..containers.max(1))
            .map(|c| {
                self.cgroups
                    .dir(&format!("{}/tasks/{id}/c{c}", instance.name))
            })
            .collect();
        let (ipv4, ipv6, netns_path, own_netns) = match mode {
            NetworkMode::Host => (instance.ipv4, instance.ipv6, instance.netns.path(), None),
            NetworkMode::Bridge => {
                let ns = Netns::new(&format!("em{}i{inst}t{k}", self.id));
                let veth = format!("veth{k}");
                instance.netns.ip(&[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
                ]);
                instance
                    .netns
                    .ip(&["link", "set", &veth, "master", "docker0", "up"]);
                let v4 = Ipv4Addr::new(172, 17 + inst as u8, 0, k as u8 + 2);
                let v6: Ipv6Addr = format!("fd17:{inst}::{}", k + 2).parse().unwrap();
                ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
                ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
                ns.ip(&["link", "set", "eth0", "up"]);
                ns.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &instance.bridge_v4.to_string(),
                ]);
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &instance.bridge_v6.to_string(),
                ]);
                (v4, v6, ns.path(), Some(ns))
            }
        };
        instance.tasks.push(Task {
            family: format!("{}-app{k}", instance.name),
            id,
            mode,
            cgroups,
            ipv4,
            ipv6,
            cpu: instance.cpu,
            netns_path,
            servers: Vec::new(),
            sidecar: None,
            own_netns,
            tools: self.tools.clone(),
        });
        k
    }
}

impl World {
    /// Pin every process of instance `inst` (node proxy, servers, tasks and their sidecars,
    /// started from now on) to `cpu`: one CPU per simulated host.
    pub fn pin(&mut self, inst: usize, cpu: usize) {
        let instance = &mut self.instances[inst];
        instance.cpu = Some(cpu);
        for t in &mut instance.tasks {
            t.cpu = Some(cpu);
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Instances first: their proxies and uninstall must finish before the cgroups and
        // the fabric go (the remaining fields drop after this, in declaration order).
        self.instances.clear();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.workdir);
        }
    }
}
