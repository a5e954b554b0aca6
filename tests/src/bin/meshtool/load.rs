//! The benchmark's workload: a small HTTP/1.1 server, an open-loop load generator and a
//! single-connection bulk sender. Blocking std networking and one thread per connection,
//! like the rest of meshtool; nothing here depends on the code under test.
//!
//! The load generator is open loop: request `i` is due at `start + i / rate`, whatever
//! happened to the requests before it, and its latency is measured from that due time
//! (coordinated-omission corrected: a slow response delays the requests queued behind it
//! on the same connection, and that delay is counted). Requests are spread round-robin
//! over `connections` connections. The timer sleeps (with 1 ns timer slack) until
//! `spin_us` before the due time, then spins with `yield_now`.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

const MAX_HEADER: usize = 16 * 1024;
const MAX_BODY: usize = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Marker that turns a server connection into a bulk sink.
const BULK: &[u8; 4] = b"BULK";

// ---------------------------------------------------------------------------------------
// Server

/// Serve HTTP/1.1 on every address: each request's body is read and discarded, the
/// response carries `body_bytes` bytes; keep-alive unless the request says
/// `Connection: close`. A connection that starts with `BULK` is a bulk sink instead: it
/// counts bytes until EOF and answers with the count. Exits after `max_secs`.
pub fn http_server(listen: Vec<SocketAddr>, body_bytes: usize, max_secs: u64) {
    let listeners: Vec<TcpListener> = listen
        .iter()
        .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
        .collect();
    println!("READY");
    std::io::stdout().flush().unwrap();
    let body = vec![b'x'; body_bytes.min(MAX_BODY)];
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    for l in listeners {
        thread::spawn(move || {
            for conn in l.incoming().flatten() {
                thread::spawn(move || {
                    let _ = serve_http(conn, body);
                });
            }
        });
    }
    thread::sleep(Duration::from_secs(max_secs));
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// (header length including the blank line, content length, connection: close)
fn parse_head(buf: &[u8]) -> std::io::Result<Option<(usize, usize, bool)>> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEADER {
            return Err(std::io::Error::other("header too large"));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut len = 0;
    let mut close = false;
    for line in head.split("\r\n").skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            len = v
                .parse()
                .map_err(|_| std::io::Error::other("bad content-length"))?;
        } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    if len > MAX_BODY {
        return Err(std::io::Error::other("body too large"));
    }
    Ok(Some((end + 4, len, close)))
}

/// Read one message (head + body) into `buf` (which may hold bytes already); returns
/// (message length, head length, connection: close), or None on a clean EOF before any byte.
fn read_message(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(usize, usize, bool)>> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((head, len, close)) = parse_head(buf)? {
            while buf.len() < head + len {
                let n = conn.read(&mut chunk)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(Some((head + len, head, close)));
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn serve_http(mut conn: TcpStream, body: &[u8]) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    conn.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 64 * 1024];
    while buf.len() < BULK.len() {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.starts_with(BULK) {
        let mut total = (buf.len() - BULK.len()) as u64;
        loop {
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        conn.write_all(format!("{total}\n").as_bytes())?;
        return conn.shutdown(Shutdown::Write);
    }
    let ok_keep = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        body.len()
    );
    let ok_close = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(ok_close.len() + body.len());
    loop {
        let Some((msg, _, close)) = read_message(&mut conn, &mut buf)? else {
            return Ok(());
        };
        buf.drain(..msg);
        out.clear();
        out.extend_from_slice(if close { &ok_close } else { &ok_keep }.as_bytes());
        out.extend_from_slice(body);
        conn.write_all(&out)?;
        if close {
            return conn.shutdown(Shutdown::Write);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Open-loop load generator

pub struct LoadArgs {
    pub target: SocketAddr,
    pub rate: f64,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub body_bytes: usize,
    pub new_connection: bool,
    pub spin: Duration,
    pub dump: bool,
}

#[derive(Serialize)]
pub struct LoadReport {
    pub target: SocketAddr,
    pub rate: f64,
    pub connections: usize,
    pub new_connection: bool,
    pub duration_s: f64,
    /// Requests due in the measured window (after warm-up).
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    /// Requests of the whole run (warm-up included) that failed.
    pub errors_total: u64,
    pub first_error: Option<String>,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    pub achieved_rps: f64,
    /// How late the generator itself started requests (p99, µs): its own timer error.
    pub start_lag_p99_us: u64,
    /// Every measured latency (µs), with `--dump`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latencies_us: Option<Vec<u32>>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

struct ConnResult {
    lat: Histogram<u64>,
    lag: Histogram<u64>,
    ok: u64,
    errors: u64,
    errors_total: u64,
    first_error: Option<String>,
    dump: Vec<u32>,
}

fn set_timer_slack_1ns() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) with a plain integer argument.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

fn wait_until(t: Instant, spin: Duration) {
    let now = Instant::now();
    if t <= now {
        return;
    }
    let d = t - now;
    if d > spin {
        thread::sleep(d - spin);
    }
    while Instant::now() < t {
        std::hint::spin_loop();
        thread::yield_now();
    }
}

fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Send `req` and read one response (status 200 and the full body).
fn exchange(s: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<()> {
    s.write_all(req)?;
    buf.clear();
    let Some((_, _, _)) = read_message(s, buf)? else {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    };
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "status: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        )));
    }
    Ok(())
}

pub fn load(a: LoadArgs) -> LoadReport {
    assert!(a.rate > 0.0 && a.connections > 0);
    set_timer_slack_1ns();
    let total_secs = (a.warmup + a.duration).as_secs_f64();
    let n_total = (a.rate * total_secs).round() as u64;
    let interval = 1.0 / a.rate;
    let head = format!(
        "POST /bench HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n{}\r\n",
        a.body_bytes,
        if a.new_connection {
            "Connection: close\r\n"
        } else {
            ""
        }
    );
    let mut req = head.into_bytes();
    req.extend(std::iter::repeat_n(b'r', a.body_bytes));
    // Keep-alive connections are opened before the clock starts.
    let mut conns: Vec<Option<TcpStream>> = (0..a.connections)
        .map(|_| {
            if a.new_connection {
                None
            } else {
                connect(a.target).ok()
            }
        })
        .collect();
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + a.warmup;
    // Bounded: nothing is started after the schedule plus a grace period.
    let give_up = start + a.warmup + a.duration + Duration::from_secs(10);
    let handles: Vec<_> = conns
        .drain(..)
        .enumerate()
        .map(|(c, mut conn)| {
            let req = req.clone();
            let (target, spin, new_connection, dump, connections) =
                (a.target, a.spin, a.new_connection, a.dump, a.connections);
            thread::spawn(move || {
                let mut r = ConnResult {
                    lat: hist(),
                    lag: hist(),
                    ok: 0,
                    errors: 0,
                    errors_total: 0,
                    first_error: None,
                    dump: Vec::new(),
                };
                let mut buf = Vec::with_capacity(4096);
                let mut i = c as u64;
                while i < n_total {
                    let due = start + Duration::from_secs_f64(i as f64 * interval);
                    let measured = due >= measure_from;
                    i += connections as u64;
                    if Instant::now() > give_up {
                        r.errors_total += 1;
                        if measured {
                            r.errors += 1;
                        }
                        continue;
                    }
                    wait_until(due, spin);
                    let lag = Instant::now().saturating_duration_since(due);
                    let result = (|| -> std::io::Result<()> {
                        if new_connection {
                            let mut s = connect(target)?;
                            exchange(&mut s, &req, &mut buf)?;
                            Ok(())
                        } else {
                            if conn.is_none() {
                                conn = Some(connect(target)?);
                            }
                            exchange(conn.as_mut().unwrap(), &req, &mut buf)
                        }
                    })();
                    let done = Instant::now();
                    match result {
                        Ok(()) => {
                            if measured {
                                let us = (done - due).as_micros().max(1) as u64;
                                let _ = r.lat.record(us);
                                let _ = r.lag.record(lag.as_micros().max(1) as u64);
                                r.ok += 1;
                                if dump {
                                    r.dump.push(us.min(u64::from(u32::MAX)) as u32);
                                }
                            }
                        }
                        Err(e) => {
                            conn = None;
                            r.errors_total += 1;
                            if measured {
                                r.errors += 1;
                            }
                            if r.first_error.is_none() {
                                r.first_error = Some(e.to_string());
                            }
                        }
                    }
                }
                r
            })
        })
        .collect();
    let mut lat = hist();
    let mut lag = hist();
    let (mut ok, mut errors, mut errors_total) = (0, 0, 0);
    let mut first_error = None;
    let mut dump = Vec::new();
    for h in handles {
        let r = h.join().expect("load thread");
        lat.add(&r.lat).unwrap();
        lag.add(&r.lag).unwrap();
        ok += r.ok;
        errors += r.errors;
        errors_total += r.errors_total;
        first_error = first_error.or(r.first_error);
        dump.extend(r.dump);
    }
    let secs = a.duration.as_secs_f64();
    LoadReport {
        target: a.target,
        rate: a.rate,
        connections: a.connections,
        new_connection: a.new_connection,
        duration_s: secs,
        sent: ok + errors,
        ok,
        errors,
        errors_total,
        first_error,
        p50_us: lat.value_at_quantile(0.50),
        p90_us: lat.value_at_quantile(0.90),
        p99_us: lat.value_at_quantile(0.99),
        p999_us: lat.value_at_quantile(0.999),
        max_us: lat.max(),
        mean_us: lat.mean(),
        achieved_rps: ok as f64 / secs,
        start_lag_p99_us: lag.value_at_quantile(0.99),
        latencies_us: a.dump.then_some(dump),
    }
}

// ---------------------------------------------------------------------------------------
// Single-connection bulk throughput

#[derive(Serialize)]
pub struct BulkReport {
    pub target: SocketAddr,
    /// Bytes the server counted.
    pub bytes: u64,
    pub seconds: f64,
    pub bytes_per_sec: f64,
    pub error: Option<String>,
}

/// Write as fast as possible on one connection for `seconds`, half-close, and wait for the
/// server's count: throughput = counted bytes / time until the count arrived.
pub fn bulk(target: SocketAddr, seconds: f64, chunk: usize) -> BulkReport {
    let seconds = seconds.clamp(0.1, 120.0);
    let mut report = BulkReport {
        target,
        bytes: 0,
        seconds: 0.0,
        bytes_per_sec: 0.0,
        error: None,
    };
    let result = (|| -> std::io::Result<()> {
        let mut s = connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let data = vec![b'b'; chunk.clamp(1, 1 << 20)];
        let start = Instant::now();
        s.write_all(BULK)?;
        let stop = Duration::from_secs_f64(seconds);
        while start.elapsed() < stop {
            s.write_all(&data)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut line = String::new();
        s.read_to_string(&mut line)?;
        let elapsed = start.elapsed().as_secs_f64();
        report.bytes = line
            .trim()
            .parse()
            .map_err(|_| std::io::Error::other(format!("bad count {line:?}")))?;
        report.seconds = elapsed;
        report.bytes_per_sec = report.bytes as f64 / elapsed;
        Ok(())
    })();
    if let Err(e) = result {
        report.error = Some(e.to_string());
    }
    report
}
