//! `meshtool tls-server`: a TLS 1.3 server (ALPN h2, no client auth) that only completes
//! handshakes and holds connections; a fake destination proxy presenting a chosen identity.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::tls;

/// The server accepts for this long, then exits.
const LIFETIME: Duration = Duration::from_secs(60);
const MAX_CONNECTIONS: usize = 1000;
/// Each connection is held at most this long.
const HOLD: Duration = Duration::from_secs(30);

/// Usage errors (bad files, bind failure) come back as Err before READY.
pub fn run(listen: SocketAddr, cert: &Path, key: &Path) -> Result<(), String> {
    let config = Arc::new(tls::server_config(cert, key)?);
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    let start = Instant::now();
    let end = start + LIFETIME;
    println!("READY");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        for conn in listener.incoming().take(MAX_CONNECTIONS) {
            if Instant::now() >= end {
                break;
            }
            let Ok(conn) = conn else { continue };
            let config = config.clone();
            let until = end.min(Instant::now() + HOLD);
            thread::spawn(move || serve(conn, config, until));
        }
        let _ = done_tx.send(());
    });
    // Bounded lifetime: exit when the deadline passes even if accept() is still blocked.
    let _ = done_rx.recv_timeout(end.saturating_duration_since(Instant::now()));
    Ok(())
}

fn serve(tcp: TcpStream, config: Arc<ServerConfig>, until: Instant) {
    let peer = tcp.peer_addr().ok();
    let conn = match ServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tls-server: {e}");
            return;
        }
    };
    let mut s = StreamOwned::new(conn, tcp);
    let _ = s.sock.set_read_timeout(Some(Duration::from_millis(500)));
    while s.conn.is_handshaking() {
        if Instant::now() >= until {
            eprintln!("tls-server: {peer:?}: handshake not finished in time");
            return;
        }
        match s.conn.complete_io(&mut s.sock) {
            Ok((0, 0)) => {
                eprintln!("tls-server: {peer:?}: closed during handshake");
                return;
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                eprintln!("tls-server: {peer:?}: handshake: {e}");
                return;
            }
        }
    }
    eprintln!(
        "tls-server: {peer:?}: handshake ok, SNI {:?}, ALPN {:?}",
        s.conn.server_name(),
        s.conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    );
    // Hold the connection (reading and discarding) until the peer closes or time is up.
    let mut buf = [0u8; 16 * 1024];
    while Instant::now() < until {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
