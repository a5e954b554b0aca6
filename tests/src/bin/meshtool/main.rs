//! The workload inside harness "tasks": echo servers and clients that report, as JSON on
//! stdout, what each connection saw (peer address, which server answered, whether the echo
//! was byte-exact). Blocking std networking on purpose: nothing here should depend on the
//! code under test. Every loop is bounded by a count and a deadline.
//!
//! The mTLS probes (`tunnel`, `tls-server`, `raw`) use rustls/h2 directly, independent of
//! the proxy's own TLS code.
mod flood;
mod http;
mod load;
mod raw;
mod requests;
mod tls;
mod tls_server;
mod tunnel;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve on every ADDR: first line sent is the server's own address, then an echo.
    Echo {
        #[arg(required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Connect to each TARGET `--repeat` times (all at once), send a payload, check the echo.
    Client {
        #[arg(required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Run connections one after another instead of concurrently.
        #[arg(long)]
        sequential: bool,
        /// Payload is this string repeated/truncated to `--bytes` (for packet captures).
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        marker: Option<String>,
        /// Set this SO_MARK on every socket before connecting (needs CAP_NET_RAW or
        /// CAP_NET_ADMIN); a refused setsockopt fails the connection.
        #[arg(long, value_parser = parse_u32)]
        mark: Option<u32>,
    },
    /// Try to connect `count` times; report how many succeeded (for refused-port tests).
    Attempts {
        target: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Keep every connection open this long before closing them all.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Open `count` connections to an `echo` server and keep them all open, then one echo
    /// round trip of `bytes` on each: {"connected","echoed","errors",...}.
    Flood {
        target: SocketAddr,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=20_000))]
        count: u64,
        #[arg(long, default_value_t = 64)]
        bytes: usize,
    },
    /// Connections to a TLS port that stall: `--silent` send nothing, `--partial` half a
    /// ClientHello, `--full` a whole one (SNI `--sni`) and nothing more. Prints READY once
    /// all are open, holds them `--hold-ms`, then {"opened","failed","closed_by_peer"}.
    HalfOpen {
        target: SocketAddr,
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=5_000))]
        silent: u64,
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=5_000))]
        partial: u64,
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=5_000))]
        full: u64,
        #[arg(long, default_value = "probe.invalid")]
        sni: String,
        #[arg(long, default_value_t = 30_000)]
        hold_ms: u64,
    },
    /// Fire-and-forget: connect, write `bytes`, close without reading; `count` times.
    Send {
        target: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
    },
    /// Receive on every ADDR and append "<bytes> <checksum>" per connection to `out`.
    Sink {
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(required = true)]
        listen: Vec<SocketAddr>,
    },
    /// connect() a UDP socket and report its peer address (sends one datagram).
    Udp { target: SocketAddr },
    /// HTTP application for the data-path tests: HTTP/1.1 (with upgrades) on each
    /// `--h1` address, h2c on each `--h2` one; reports what it received as JSON.
    HttpEcho {
        #[arg(long)]
        h1: Vec<SocketAddr>,
        #[arg(long)]
        h2: Vec<SocketAddr>,
        /// Answer this share of requests (in %, spread evenly) with 503.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        fail_percent: u8,
        /// Wait this long before each answer.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// COUNT HTTP/1.1 requests at RATE per second over keep-alive connections, each with
    /// `Host: HOST`; one JSON report: statuses, proxy errors, which server answered,
    /// latency percentiles. Bounded: stops after `--max-secs`.
    HttpRequests {
        target: SocketAddr,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        count: u64,
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "app")]
        host: String,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
        /// An extra request header, `name: value` (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(::http::HeaderName, ::http::HeaderValue)>,
        /// Report every response body (JSON) under `bodies`.
        #[arg(long)]
        keep_bodies: bool,
    },
    /// One HTTP case against TARGET (keepalive, h2c, big-body, chunked, upgrade, trailers,
    /// server-first); one JSON report.
    HttpProbe {
        target: SocketAddr,
        #[arg(long)]
        case: String,
        #[arg(long, default_value = "app")]
        host: String,
    },
    /// Round trips of `size` bytes on one connection; latency percentiles in microseconds.
    Pingpong {
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Pause between round trips: a long-lived, mostly idle connection.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// HBONE-style probe: TLS 1.3 (ALPN h2) to ADDR, then HTTP/2 CONNECT streams.
    /// One JSON line: {"tls","h2","statuses","stream_errors","echo_ok"}.
    Tunnel {
        #[arg(long)]
        connect: SocketAddr,
        /// SNI (a DNS name).
        #[arg(long)]
        sni: String,
        /// Client certificate chain (PEM, leaf first); no client certificate without it.
        #[arg(long, requires = "key")]
        cert: Option<std::path::PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<std::path::PathBuf>,
        /// `:authority` of the CONNECT requests.
        #[arg(long, default_value = tunnel::DEFAULT_TARGET)]
        target: String,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Echo this many bytes through the first stream answered 200 (target: `echo`).
        #[arg(long, default_value_t = 0)]
        payload_bytes: usize,
        /// Add an `x-pad` header of this many bytes to each CONNECT.
        #[arg(long, default_value_t = 0)]
        header_bytes: usize,
        /// Trust bundle (PEM) for the server's chain; requires --expect-identity.
        #[arg(long, requires = "expect_identity")]
        bundle: Option<std::path::PathBuf>,
        /// The server leaf's single URI SAN must be this SPIFFE id; requires --bundle.
        #[arg(long, requires = "bundle")]
        expect_identity: Option<String>,
    },
    /// TLS 1.3 server (ALPN h2, no client auth) that completes handshakes and holds each
    /// connection until the peer closes or 30 s pass. Prints READY; exits after 60 s.
    TlsServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long)]
        key: std::path::PathBuf,
    },
    /// Send a plaintext probe (`--text`) or a TLS ClientHello plus 4 KiB of garbage, then
    /// read until the peer closes or 5 s pass: {"sent","received","closed_by_peer"}.
    Raw {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(
            long,
            conflicts_with = "hello_then_garbage",
            required_unless_present = "hello_then_garbage"
        )]
        text: Option<String>,
        #[arg(long)]
        hello_then_garbage: bool,
        /// Shut down the write half after sending (a client that gives up mid-request).
        #[arg(long)]
        half_close: bool,
    },
    /// HTTP/1.1 server for the benchmark: reads each request, answers `--body-bytes`;
    /// keep-alive. A connection starting with `BULK` is a byte sink that answers its count.
    /// Prints READY; exits after `--max-secs`.
    HttpServer {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        #[arg(long, default_value_t = 3600)]
        max_secs: u64,
    },
    /// Open-loop HTTP/1.1 load at a constant rate, latency from each request's due time
    /// (coordinated-omission corrected). One JSON object on stdout.
    Load {
        target: SocketAddr,
        /// Requests per second (all connections together).
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Measured window (after the warm-up), at most 10 minutes.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
        duration_ms: u64,
        #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
        warmup_ms: u64,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// A new connection per request (`Connection: close`) instead of keep-alive.
        #[arg(long)]
        new_connection: bool,
        /// Spin (yielding) this long before each due time instead of sleeping.
        #[arg(long, default_value_t = 100)]
        spin_us: u64,
        /// Include every measured latency in the report.
        #[arg(long)]
        dump: bool,
    },
    /// Single-connection throughput: write for `--seconds` to an `http-server`, report the
    /// bytes it counted per second.
    Bulk {
        target: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 65_536)]
        chunk: usize,
    },
}

/// Usage errors found after parsing (bad files, bad names): message and exit code 2.
fn usage_error(msg: &str) -> ! {
    eprintln!("meshtool: {msg}");
    std::process::exit(2)
}

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Serialize)]
struct ConnReport {
    target: SocketAddr,
    peer: Option<SocketAddr>,
    served_by: Option<String>,
    ok: bool,
    error: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Echo { listen } => {
            // Thousands of held connections in the limits tests.
            flood::raise_nofile();
            echo(listen)
        }
        Cmd::Flood {
            target,
            count,
            bytes,
        } => println!(
            "{}",
            serde_json::to_string(&flood::flood(target, count as usize, bytes)).unwrap()
        ),
        Cmd::HalfOpen {
            target,
            silent,
            partial,
            full,
            sni,
            hold_ms,
        } => println!(
            "{}",
            flood::half_open(
                target,
                silent as usize,
                partial as usize,
                full as usize,
                &sni,
                Duration::from_millis(hold_ms)
            )
        ),
        Cmd::Client {
            targets,
            repeat,
            bytes,
            sequential,
            marker,
            mark,
        } => {
            let jobs: Vec<(usize, SocketAddr)> = targets
                .iter()
                .flat_map(|t| std::iter::repeat_n(*t, repeat))
                .enumerate()
                .collect();
            let reports: Vec<ConnReport> = if sequential {
                jobs.into_iter()
                    .map(|(i, t)| one_connection(t, bytes, i as u64, marker.as_deref(), mark))
                    .collect()
            } else {
                let handles: Vec<_> = jobs
                    .into_iter()
                    .map(|(i, t)| {
                        let marker = marker.clone();
                        thread::spawn(move || {
                            one_connection(t, bytes, i as u64, marker.as_deref(), mark)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("client thread"))
                    .collect()
            };
            println!("{}", serde_json::to_string(&reports).unwrap());
        }
        Cmd::Attempts {
            target,
            count,
            hold_ms,
        } => {
            let held: Vec<TcpStream> = (0..count)
                .filter_map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok())
                .collect();
            let ok = held.len();
            thread::sleep(Duration::from_millis(hold_ms.min(30_000)));
            drop(held);
            println!(
                "{}",
                serde_json::json!({ "attempts": count, "connected": ok })
            );
        }
        Cmd::Send {
            target,
            count,
            bytes,
        } => {
            let mut sent = 0;
            for _ in 0..count {
                if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                    && s.write_all(&payload(0, bytes)).is_ok()
                {
                    sent += 1;
                }
            }
            println!(
                "{}",
                serde_json::json!({ "sent": sent, "checksum": checksum(&payload(0, bytes)) })
            );
        }
        Cmd::Sink { out, listen } => sink(out, listen),
        Cmd::Udp { target } => {
            let bind: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .unwrap();
            let sock = UdpSocket::bind(bind).expect("udp bind");
            sock.connect(target).expect("udp connect");
            let _ = sock.send(b"ping");
            println!("{}", serde_json::json!({ "peer": sock.peer_addr().ok() }));
        }
        Cmd::Pingpong {
            target,
            count,
            size,
            interval_ms,
        } => pingpong(target, count, size, Duration::from_millis(interval_ms)),
        Cmd::Tunnel {
            connect,
            sni,
            cert,
            key,
            target,
            streams,
            payload_bytes,
            header_bytes,
            bundle,
            expect_identity,
        } => {
            let report = tunnel::run(tunnel::Args {
                connect,
                sni,
                cert,
                key,
                target,
                streams,
                payload_bytes,
                header_bytes,
                bundle,
                expect_identity,
            })
            .unwrap_or_else(|e| usage_error(&e));
            println!("{}", serde_json::to_string(&report).unwrap());
        }
        Cmd::TlsServer { listen, cert, key } => {
            tls_server::run(listen, &cert, &key).unwrap_or_else(|e| usage_error(&e));
        }
        Cmd::HttpEcho {
            h1,
            h2,
            fail_percent,
            delay_ms,
        } => {
            let faults = http::Faults {
                fail_percent,
                delay: Duration::from_millis(delay_ms),
            };
            if let Err(e) = http::serve(h1, h2, faults) {
                eprintln!("meshtool http-echo: {e}");
                std::process::exit(1);
            }
        }
        Cmd::HttpRequests {
            target,
            count,
            rate,
            method,
            host,
            connections,
            max_secs,
            headers,
            keep_bodies,
        } => match requests::run(requests::Plan {
            target,
            count,
            rate,
            method,
            host,
            connections,
            max: Duration::from_secs(max_secs),
            headers,
            keep_bodies,
        }) {
            Ok(report) => println!("{report}"),
            Err(e) => {
                eprintln!("meshtool http-requests: {e:#}");
                std::process::exit(1);
            }
        },
        Cmd::HttpProbe { target, case, host } => match http::probe(target, &host, &case) {
            Ok(report) => println!("{report}"),
            Err(e) => {
                eprintln!("meshtool http-probe: {e:#}");
                std::process::exit(1);
            }
        },
        Cmd::Raw {
            connect,
            text,
            hello_then_garbage: _,
            half_close,
        } => {
            let probe = match text {
                Some(t) => raw::Probe::Text(t),
                None => raw::Probe::HelloThenGarbage,
            };
            match raw::run(connect, probe, half_close) {
                Ok(report) => println!("{}", serde_json::to_string(&report).unwrap()),
                Err(e) => {
                    eprintln!("meshtool raw: {e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::HttpServer {
            listen,
            body_bytes,
            max_secs,
        } => load::http_server(listen, body_bytes, max_secs),
        Cmd::Load {
            target,
            rate,
            connections,
            duration_ms,
            warmup_ms,
            body_bytes,
            new_connection,
            spin_us,
            dump,
        } => {
            if !(rate > 0.0 && rate <= 1_000_000.0 && (1..=4096).contains(&connections)) {
                usage_error("--rate must be in (0, 1e6] and --connections in 1..=4096");
            }
            let report = load::load(load::LoadArgs {
                target,
                rate,
                connections,
                duration: Duration::from_millis(duration_ms),
                warmup: Duration::from_millis(warmup_ms),
                body_bytes: body_bytes.min(1 << 20),
                new_connection,
                spin: Duration::from_micros(spin_us.min(10_000)),
                dump,
            });
            println!("{}", serde_json::to_string(&report).unwrap());
        }
        Cmd::Bulk {
            target,
            seconds,
            chunk,
        } => println!(
            "{}",
            serde_json::to_string(&load::bulk(target, seconds, chunk)).unwrap()
        ),
    }
}

fn echo(listen: Vec<SocketAddr>) {
    let listeners: Vec<TcpListener> = listen
        .iter()
        .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
        .collect();
    println!("READY");
    std::io::stdout().flush().unwrap();
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            thread::spawn(move || {
                let me = l.local_addr().unwrap();
                for conn in l.incoming().flatten() {
                    thread::spawn(move || serve(conn, me));
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

/// FNV-1a, to compare payloads without shipping them around.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn sink(out: std::path::PathBuf, listen: Vec<SocketAddr>) {
    let file = std::sync::Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .expect("sink output"),
    ));
    let listeners: Vec<TcpListener> = listen
        .iter()
        .map(|a| TcpListener::bind(a).expect("bind"))
        .collect();
    println!("READY");
    std::io::stdout().flush().unwrap();
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let file = file.clone();
            thread::spawn(move || {
                for mut conn in l.incoming().flatten() {
                    let file = file.clone();
                    thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(DEADLINE));
                        let mut data = Vec::new();
                        let _ = conn.read_to_end(&mut data);
                        let line = format!("{} {}\n", data.len(), checksum(&data));
                        let _ = file.lock().unwrap().write_all(line.as_bytes());
                    });
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

fn serve(mut conn: TcpStream, me: SocketAddr) {
    let _ = conn.set_read_timeout(Some(DEADLINE));
    let _ = conn.set_nodelay(true);
    if conn.write_all(format!("{me}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// `marker` repeated and truncated to `len` bytes (`marker` is not empty).
fn marker_payload(marker: &str, len: usize) -> Vec<u8> {
    marker.bytes().cycle().take(len).collect()
}

/// Deterministic per-connection payload, so a mixed-up stream cannot echo correctly.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `0x45434d53` or `1162038611`.
fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

fn connect(target: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let timeout = Duration::from_secs(10);
    let Some(mark) = mark else {
        return TcpStream::connect_timeout(&target, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket
        .set_mark(mark)
        .map_err(|e| std::io::Error::new(e.kind(), format!("SO_MARK {mark:#x}: {e}")))?;
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

fn one_connection(
    target: SocketAddr,
    bytes: usize,
    seed: u64,
    marker: Option<&str>,
    mark: Option<u32>,
) -> ConnReport {
    let mut report = ConnReport {
        target,
        peer: None,
        served_by: None,
        ok: false,
        error: None,
    };
    let result = (|| -> std::io::Result<()> {
        let mut s = connect(target, mark)?;
        s.set_read_timeout(Some(DEADLINE))?;
        report.peer = s.peer_addr().ok();
        let sent = match marker {
            Some(m) => marker_payload(m, bytes),
            None => payload(seed, bytes),
        };
        let writer = {
            let mut w = s.try_clone()?;
            let sent = sent.clone();
            thread::spawn(move || -> std::io::Result<()> {
                w.write_all(&sent)?;
                // Half-close: the echo server only finishes after seeing our FIN.
                w.shutdown(Shutdown::Write)
            })
        };
        let mut reader = BufReader::new(&mut s);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        report.served_by = Some(line.trim().to_owned());
        let mut echoed = Vec::with_capacity(bytes);
        reader.read_to_end(&mut echoed)?;
        writer.join().expect("writer thread")?;
        if echoed != sent {
            return Err(std::io::Error::other(format!(
                "echo mismatch: sent {} bytes, got {}",
                sent.len(),
                echoed.len()
            )));
        }
        Ok(())
    })();
    match result {
        Ok(()) => report.ok = true,
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

fn pingpong(target: SocketAddr, count: usize, size: usize, interval: Duration) {
    // Bounded: the paced variant gets its schedule plus the usual deadline, at most 2 min.
    let deadline = (DEADLINE + interval * count as u32).min(Duration::from_secs(120));
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(10)).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("server greeting");
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let start = Instant::now();
    for i in 0..count {
        if start.elapsed() > deadline {
            break;
        }
        if i > 0 && !interval.is_zero() {
            std::thread::sleep(interval);
        }
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        reader.read_exact(&mut back).unwrap();
        hist.record(t.elapsed().as_micros() as u64).unwrap();
    }
    println!(
        "{}",
        serde_json::json!({
            "count": hist.len(),
            "p50_us": hist.value_at_quantile(0.50),
            "p99_us": hist.value_at_quantile(0.99),
            "max_us": hist.max(),
        })
    );
}

/// `name: value` → a request header.
fn parse_header(s: &str) -> Result<(::http::HeaderName, ::http::HeaderValue), String> {
    let (name, value) = s.split_once(':').ok_or("expected `name: value`")?;
    Ok((
        name.trim().parse().map_err(|e| format!("{e}"))?,
        value.trim().parse().map_err(|e| format!("{e}"))?,
    ))
}
