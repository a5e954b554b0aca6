//! Named network namespaces (`ip netns add`), removed on drop.
use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    time::Duration,
};

use crate::{sh, sh_quiet};

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        sh("ip", &["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["-n", &self.name];
        v.extend_from_slice(args);
        sh("ip", &v);
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Run `f` on a thread that has joined this netns (setns affects only that thread),
    /// so the test process can talk to addresses that exist only in here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_at(&self.path(), f)
    }

    /// Minimal HTTP/1.0 GET from inside the netns: (status, body).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        let path = path.to_owned();
        self.run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
            let body = text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            Ok((status, body))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        sh_quiet("ip", &["netns", "del", &self.name]);
    }
}

/// [`Netns::run`] for the netns at `path` (for holders that do not own the netns).
pub fn run_at<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let file = File::open(path).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}
