//! Many connections at once: `flood` holds N echo connections open together and does one
//! round trip on each; `half-open` opens connections to a TLS port that send nothing,
//! half a ClientHello, or a whole one and then stall. Both raise their own soft open-files
//! limit to the hard one first.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde::Serialize;

/// Whole run, however many connections.
const FLOOD_DEADLINE: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many error messages in a report.
const KEEP_ERRORS: usize = 5;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

#[derive(Serialize)]
pub struct FloodReport {
    count: usize,
    nofile: u64,
    /// Connections open at once after the connect phase.
    connected: usize,
    /// Connections that completed one echo round trip (while all were open).
    echoed: usize,
    connect_ms: u128,
    echo_ms: u128,
    errors: Vec<String>,
}

/// Open `count` connections to an `echo` server, keep them all open, then one round trip
/// of `bytes` on each.
pub fn flood(target: SocketAddr, count: usize, bytes: usize) -> FloodReport {
    let nofile = raise_nofile();
    let deadline = Instant::now() + FLOOD_DEADLINE;
    let mut errors = Vec::new();
    let mut note = |e: String| {
        if errors.len() < KEEP_ERRORS {
            errors.push(e);
        }
    };
    let started = Instant::now();
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        if Instant::now() > deadline {
            note("deadline during connect".into());
            break;
        }
        match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
            Ok(s) => conns.push(s),
            Err(e) => note(format!("connect: {e}")),
        }
    }
    let connected = conns.len();
    let connect_ms = started.elapsed().as_millis();
    let started = Instant::now();
    let mut echoed = 0;
    for (i, s) in conns.iter_mut().enumerate() {
        if Instant::now() > deadline {
            note("deadline during echo".into());
            break;
        }
        match round_trip(s, i as u64, bytes) {
            Ok(()) => echoed += 1,
            Err(e) => note(format!("connection {i}: {e}")),
        }
    }
    let echo_ms = started.elapsed().as_millis();
    drop(conns);
    FloodReport {
        count,
        nofile,
        connected,
        echoed,
        connect_ms,
        echo_ms,
        errors,
    }
}

fn round_trip(s: &mut TcpStream, seed: u64, bytes: usize) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let sent = crate::payload(seed, bytes);
    s.write_all(&sent)?;
    let mut reader = BufReader::new(&mut *s);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut back = vec![0u8; bytes];
    reader.read_exact(&mut back)?;
    if back != sent {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// Open the half-open connections, print `READY`, hold them for `hold` (at most a minute),
/// then report how many the peer had closed.
pub fn half_open(
    target: SocketAddr,
    silent: usize,
    partial: usize,
    full: usize,
    sni: &str,
    hold: Duration,
) -> serde_json::Value {
    raise_nofile();
    let hello = crate::raw::client_hello_for(sni).unwrap_or_else(|e| crate::usage_error(&e));
    let mut conns = Vec::new();
    let mut failed = 0;
    let kinds = std::iter::repeat_n(0, silent)
        .chain(std::iter::repeat_n(1, partial))
        .chain(std::iter::repeat_n(2, full));
    for kind in kinds {
        let Ok(mut s) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
            failed += 1;
            continue;
        };
        let sent = match kind {
            0 => Ok(()),
            1 => s.write_all(&hello[..hello.len() / 2]),
            _ => s.write_all(&hello),
        };
        if sent.is_err() {
            failed += 1;
        }
        conns.push(s);
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(hold.min(Duration::from_secs(60)));
    let mut closed = 0;
    let mut buf = [0u8; 4096];
    for s in &mut conns {
        let _ = s.set_nonblocking(true);
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    serde_json::json!({ "opened": conns.len(), "failed": failed, "closed_by_peer": closed })
}
