//! `meshtool raw`: send a plaintext probe or a real TLS ClientHello followed by garbage,
//! then see whether the peer closes the connection.
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::tls;

const READ_FOR: Duration = Duration::from_secs(5);
const GARBAGE: usize = 4096;
/// Stop counting received bytes beyond this (a misbehaving peer could stream forever).
const MAX_RECEIVE: usize = 16 * 1024 * 1024;

#[derive(Serialize)]
pub struct Report {
    sent: usize,
    received: usize,
    closed_by_peer: bool,
}

pub enum Probe {
    Text(String),
    HelloThenGarbage,
}

/// A TLS 1.3 ClientHello (SNI `probe.invalid`, ALPN h2) as produced by rustls.
fn client_hello() -> Result<Vec<u8>, String> {
    client_hello_for("probe.invalid")
}

/// A TLS 1.3 ClientHello with SNI `sni` (ALPN h2) as produced by rustls.
pub fn client_hello_for(sni: &str) -> Result<Vec<u8>, String> {
    let provider = tls::provider();
    let config = tls::client_config(tls::ServerCheck::any(&provider), None)?;
    let name = tls::dns_name(sni)?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| format!("ClientConnection: {e}"))?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)
            .map_err(|e| format!("write_tls: {e}"))?;
    }
    Ok(hello)
}

/// Err only for things that are not the peer's doing (connect failure, local errors).
pub fn run(connect: SocketAddr, probe: Probe, half_close: bool) -> Result<Report, String> {
    let bytes = match probe {
        Probe::Text(t) => t.into_bytes(),
        Probe::HelloThenGarbage => {
            let mut b = client_hello()?;
            b.extend(crate::payload(7, GARBAGE));
            b
        }
    };
    let mut s = TcpStream::connect_timeout(&connect, Duration::from_secs(10))
        .map_err(|e| format!("connect {connect}: {e}"))?;
    let _ = s.set_nodelay(true);
    // A peer that closes early may make part of the write fail; count what went out.
    let mut sent = 0;
    while sent < bytes.len() {
        match s.write(&bytes[sent..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n,
        }
    }
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let deadline = Instant::now() + READ_FOR;
    let mut received = 0;
    let mut closed_by_peer = false;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || received >= MAX_RECEIVE {
            break;
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => {
                closed_by_peer = true;
                break;
            }
            Ok(n) => received += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // Reset (RST) counts as the peer closing; anything else is reported too.
                closed_by_peer = matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                );
                eprintln!("raw: read: {e}");
                break;
            }
        }
    }
    Ok(Report {
        sent,
        received,
        closed_by_peer,
    })
}
