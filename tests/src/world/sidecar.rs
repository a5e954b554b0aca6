//! Per-task sidecars: the comparison mode of the benchmark.
use super::*;

/// Admin and inbound addresses of a sidecar, inside its task's netns.
pub const SIDECAR_ADMIN: &str = "127.0.0.1:15000";
pub const SIDECAR_INBOUND: &str = "0.0.0.0:15008";
pub const TUNNEL_PORT: u16 = 15008;

/// `ecsmesh sidecar` of one bridge-mode task. Drop: SIGTERM, wait, uninstall its pins.
pub struct Sidecar {
    pub proc: Proc,
    pub config: PathBuf,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
    /// `<task dir>/sidecar`: a sibling of the task's container cgroups, not enrolled.
    pub cgroup: PathBuf,
    ecsmesh: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.proc.wait_timeout(Duration::from_secs(10));
        let _ = Command::new(&self.ecsmesh)
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output();
    }
}

impl Instance {
    /// Config of the sidecar of bridge-mode task `task`: exactly that task, in `host` mode
    /// (the sidecar shares its netns), attached to the task's cgroup directory, with its own
    /// pin directory and this instance's identity material.
    pub fn sidecar_config_text(&self, task: usize, opts: &ProxyOptions) -> String {
        let tk = &self.tasks[task];
        let mut t = format!(
            "instance = \"{}-{}\"\npin_dir = \"{}\"\ncgroup_root = \"{}\"\nadmin_addr = \"{SIDECAR_ADMIN}\"\n\
             outbound_port = {OUTBOUND_PORT}\ninbound_addr = \"{SIDECAR_INBOUND}\"\n",
            self.name,
            tk.id,
            self.sidecar_pin_dir(task).display(),
            tk.dir().display(),
        );
        let cidrs: Vec<String> = opts
            .exclude_cidrs
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect();
        t += &format!("exclude_cidrs = [{}]\n", cidrs.join(", "));
        t += &format!(
            "admin_socket = \"{}\"\nstate_dir = \"{}\"\n",
            self.workdir
                .join(format!("{}-sc{task}-admin.sock", self.name))
                .display(),
            self.workdir
                .join(format!("{}-sc{task}-state", self.name))
                .display(),
        );
        t += &common_text(opts);
        t += &self.mesh_text(opts);
        t += &task_text(tk, "host");
        t
    }

    fn sidecar_pin_dir(&self, task: usize) -> PathBuf {
        PathBuf::from(format!("{}-sc{task}", self.pin_dir.display()))
    }

    /// Start `ecsmesh sidecar` for bridge-mode task `task` and wait until it is ready.
    pub fn start_sidecar(&mut self, task: usize, opts: &ProxyOptions) {
        self.spawn_sidecar(task, opts);
        self.wait_sidecar_ready(task);
    }

    /// Start the sidecar without waiting (start many, then `wait_sidecar_ready` each).
    pub fn spawn_sidecar(&mut self, task: usize, opts: &ProxyOptions) {
        assert!(
            self.tasks[task].own_netns.is_some(),
            "sidecars serve bridge-mode tasks (own netns)"
        );
        assert!(
            self.tasks[task].sidecar.is_none(),
            "sidecar already running"
        );
        let text = self.sidecar_config_text(task, opts);
        let tk = &self.tasks[task];
        let config = self
            .workdir
            .join(format!("{}-{}-sidecar.toml", self.name, tk.id));
        std::fs::write(&config, text).expect("write sidecar config");
        let log = self
            .workdir
            .join(format!("{}-{}-sidecar.log", self.name, tk.id));
        let mut cmd = Command::new(&self.tools.ecsmesh);
        cmd.arg("sidecar")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info");
        if let Some(n) = opts.workers {
            cmd.arg("--workers").arg(n.to_string());
        }
        let at = tk.side_placement("sidecar");
        process::place(&mut cmd, &at);
        let proc = process::spawn_logged(cmd, "ecsmesh-sidecar", &log);
        let sidecar = Sidecar {
            proc,
            config,
            log,
            pin_dir: self.sidecar_pin_dir(task),
            cgroup: at.cgroup,
            ecsmesh: self.tools.ecsmesh.clone(),
        };
        self.tasks[task].sidecar = Some(sidecar);
    }

    pub fn wait_sidecar_ready(&mut self, task: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin: SocketAddr = SIDECAR_ADMIN.parse().unwrap();
        let tk = &mut self.tasks[task];
        loop {
            let ns = tk.own_netns.as_ref().unwrap();
            if let Ok((200, _)) = ns.http_get(admin, "/ready") {
                return;
            }
            let sc = tk.sidecar.as_mut().expect("sidecar spawned");
            if let Ok(Some(st)) = sc.proc.child.try_wait() {
                panic!(
                    "ecsmesh sidecar exited ({st}) before ready:\n{}",
                    tk.sidecar_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ecsmesh sidecar not ready in 30 s:\n{}",
                tk.sidecar_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM the sidecar of `task`, wait for it and remove its pins.
    pub fn stop_sidecar(&mut self, task: usize) {
        drop(self.tasks[task].sidecar.take());
    }
}
