//! Fixture HTTP servers standing in for the ECS agent (TCP inside an instance's netns) and
//! the Docker Engine API (a Unix socket): real HTTP/1.1 over real sockets, serving JSON
//! documents the test can swap while the proxy polls them.
use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    os::{fd::AsFd, unix::net::UnixListener},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

type Docs = Arc<Mutex<HashMap<String, (u16, String)>>>;

pub struct HttpFixture {
    docs: Docs,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Longest a fixture server runs: tests are bounded, so is this.
const MAX_LIFETIME: Duration = Duration::from_secs(300);

fn serve<S: std::io::Read + Write>(stream: S, docs: &Docs) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    // Skip the headers (the fixtures ignore them).
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let (status, body) = docs
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or((404, "{\"message\":\"no such fixture\"}".to_owned()));
    let reply = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Error" },
        body.len()
    );
    let _ = reader.get_mut().write_all(reply.as_bytes());
}

impl HttpFixture {
    /// Listen on `addr` inside `netns` (the socket lives in that netns).
    pub fn tcp_in(netns: &Netns, addr: SocketAddr) -> Self {
        let docs: Docs = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let ns = File::open(netns.path()).expect("open netns");
        let (d, s) = (docs.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let listener =
                TcpListener::bind(addr).unwrap_or_else(|e| panic!("fixture bind {addr}: {e}"));
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        serve(conn, &d);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx.recv().expect("fixture server started");
        Self {
            docs,
            stop,
            thread: Some(thread),
        }
    }

    /// Listen on a Unix socket at `path` (like `/var/run/docker.sock`).
    pub fn unix(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("fixture bind {}: {e}", path.display()));
        listener.set_nonblocking(true).unwrap();
        let docs: Docs = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (docs.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        serve(conn, &d);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            docs,
            stop,
            thread: Some(thread),
        }
    }

    /// Serve `body` with `status` at `path` from now on.
    pub fn set(&self, path: &str, status: u16, body: impl Into<String>) {
        self.docs
            .lock()
            .unwrap()
            .insert(path.to_owned(), (status, body.into()));
    }
}

impl Drop for HttpFixture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
