//! Processes placed in a netns and a cgroup, killed on drop.
use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    os::{fd::AsFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Where a process runs: the netns file (`/run/netns/..`) and the cgroup directory.
#[derive(Clone, Debug)]
pub struct Placement {
    pub netns: std::path::PathBuf,
    pub cgroup: std::path::PathBuf,
    /// Pin the process (and every thread it starts) to this CPU (benchmarks: one CPU per
    /// simulated host). None: the inherited affinity.
    pub cpu: Option<usize>,
}

/// Prepare `cmd` to join the cgroup first, then the netns, between fork and exec. The
/// cgroup is joined by writing to `cgroup.procs` (the cgroup v2 mount is still visible
/// then); setns(2) does not remount /sys the way `ip netns exec` does.
pub fn place(cmd: &mut Command, at: &Placement) {
    let ns = File::open(&at.netns).unwrap_or_else(|e| panic!("{}: {e}", at.netns.display()));
    let mut procs = OpenOptions::new()
        .write(true)
        .open(at.cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("{}: {e}", at.cgroup.display()));
    let cpus = at.cpu.map(|cpu| {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).unwrap_or_else(|e| panic!("cpu {cpu}: {e}"));
        set
    });
    // SAFETY: only async-signal-safe syscalls (write, setns, sched_setaffinity) on fds and
    // a CPU set prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            procs.write_all(b"0")?;
            if let Some(set) = &cpus {
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set)
                    .map_err(std::io::Error::from)?;
            }
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// Start `cmd` with soft `RLIMIT_NOFILE` = `soft` (like `ulimit -n`), the hard limit
/// unchanged.
pub fn set_nofile_soft(cmd: &mut Command, soft: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // SAFETY: getrlimit/setrlimit are plain syscalls, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
            setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard)
                .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// The hard `RLIMIT_NOFILE` of this process (what children may raise their soft limit to).
pub fn nofile_hard() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit")
        .1
}

/// A stopped (SIGSTOP) process, continued (SIGCONT) when dropped, also when a test fails.
pub struct Frozen(pub i32);

impl Frozen {
    pub fn stop(pid: i32) -> Self {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

/// A background process; SIGKILLed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Wait for exit up to `timeout`; None if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start a server-like process and wait until it prints `READY` on stdout.
pub fn spawn_ready(mut cmd: Command, name: &str) -> Proc {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read READY");
    assert_eq!(line.trim(), "READY", "{name} did not start: {line:?}");
    Proc {
        child,
        name: name.to_owned(),
    }
}

pub fn spawn_logged(mut cmd: Command, name: &str, log: &Path) -> Proc {
    let f = File::create(log).expect("log file");
    cmd.stdout(Stdio::null()).stderr(f);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    Proc {
        child,
        name: name.to_owned(),
    }
}

/// Run to completion (the tools bound their own run time) and return the output.
pub fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output().expect("run")
}
