//! `meshtool tunnel`: a raw HBONE-style client (TLS 1.3 + HTTP/2 CONNECT) that probes a node
//! proxy's inbound port and reports what happened at each step instead of failing.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{HeaderValue, Method, Request, Uri};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::{
    net::TcpStream,
    task::JoinHandle,
    time::{Instant, timeout_at},
};

use crate::tls;

/// Everything the tool does finishes within this.
const OVERALL: Duration = Duration::from_secs(55);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A PING right after the h2 handshake proves the server speaks HTTP/2 over this TLS.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
const STREAMS_TIMEOUT: Duration = Duration::from_secs(20);
const ECHO_TIMEOUT: Duration = Duration::from_secs(25);
/// `:authority` when `--target` is not given (discard port on loopback).
pub const DEFAULT_TARGET: &str = "127.0.0.1:9";

pub struct Args {
    pub connect: SocketAddr,
    pub sni: String,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub target: String,
    pub streams: usize,
    pub payload_bytes: usize,
    pub header_bytes: usize,
    pub bundle: Option<PathBuf>,
    pub expect_identity: Option<String>,
}

#[derive(Serialize)]
pub struct Report {
    tls: String,
    h2: String,
    statuses: Vec<u16>,
    stream_errors: Vec<String>,
    echo_ok: Option<bool>,
}

struct Prepared {
    config: Arc<ClientConfig>,
    sni: ServerName<'static>,
    target: Uri,
}

/// Validate the arguments and load the files: any error here is a usage error.
fn prepare(a: &Args) -> Result<Prepared, String> {
    let sni = tls::dns_name(&a.sni)?;
    let target: Uri = a
        .target
        .parse()
        .map_err(|e| format!("--target {:?}: {e}", a.target))?;
    if target.scheme().is_some() || target.authority().is_none() {
        return Err(format!("--target {:?}: expected HOST:PORT", a.target));
    }
    let provider = tls::provider();
    let check = match (&a.bundle, &a.expect_identity) {
        (Some(bundle), Some(id)) => tls::ServerCheck::spiffe(&provider, bundle, id.clone())?,
        (None, None) => tls::ServerCheck::any(&provider),
        _ => return Err("--bundle and --expect-identity go together".into()),
    };
    let client_cert = match (&a.cert, &a.key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => return Err("--cert and --key go together".into()),
    };
    Ok(Prepared {
        config: Arc::new(tls::client_config(check, client_cert)?),
        sni,
        target,
    })
}

pub fn run(a: Args) -> Result<Report, String> {
    let p = prepare(&a)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    Ok(rt.block_on(probe(&a, p)))
}

fn stage_deadline(overall: Instant, stage: Duration) -> Instant {
    overall.min(Instant::now() + stage)
}

async fn probe(a: &Args, p: Prepared) -> Report {
    let deadline = Instant::now() + OVERALL;
    let mut r = Report {
        tls: String::new(),
        h2: "not attempted (TLS failed)".into(),
        statuses: Vec::new(),
        stream_errors: Vec::new(),
        echo_ok: None,
    };

    let tcp = match timeout_at(
        stage_deadline(deadline, CONNECT_TIMEOUT),
        TcpStream::connect(a.connect),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            r.tls = format!("tcp connect: {e}");
            return r;
        }
        Err(_) => {
            r.tls = "tcp connect: timed out".into();
            return r;
        }
    };
    let _ = tcp.set_nodelay(true);

    let connector = tokio_rustls::TlsConnector::from(p.config);
    let stream = match timeout_at(
        stage_deadline(deadline, HANDSHAKE_TIMEOUT),
        connector.connect(p.sni, tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            r.tls = e.to_string();
            return r;
        }
        Err(_) => {
            r.tls = "TLS handshake timed out".into();
            return r;
        }
    };
    r.tls = "ok".into();
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    eprintln!(
        "tunnel: TLS ok with {}, ALPN {:?}",
        a.connect,
        alpn.as_deref().map(String::from_utf8_lossy)
    );

    let (send_request, mut conn) = match timeout_at(
        stage_deadline(deadline, HANDSHAKE_TIMEOUT),
        h2::client::Builder::new().handshake::<_, Bytes>(stream),
    )
    .await
    {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            r.h2 = format!("handshake: {e}");
            return r;
        }
        Err(_) => {
            r.h2 = "handshake timed out".into();
            return r;
        }
    };
    let mut ping_pong = conn.ping_pong();
    let mut conn_task: JoinHandle<Result<(), h2::Error>> = tokio::spawn(conn);

    // The h2 client handshake only writes; a PING round trip shows whether the server
    // really answers (a TLS 1.3 server that rejected our certificate answers with an alert).
    let ping = async {
        match ping_pong.as_mut() {
            Some(pp) => pp.ping(h2::Ping::opaque()).await.map(|_| ()),
            None => Ok(()),
        }
    };
    let ping_result = match timeout_at(stage_deadline(deadline, PING_TIMEOUT), ping).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("ping: {e}")),
        Err(_) => Err(format!(
            "no HTTP/2 answer (PING) within {} s",
            PING_TIMEOUT.as_secs()
        )),
    };
    if let Err(ping_err) = ping_result {
        // Prefer the connection's own error (e.g. the TLS alert) when it has one.
        r.h2 = match timeout_at(
            stage_deadline(deadline, Duration::from_millis(500)),
            &mut conn_task,
        )
        .await
        {
            Ok(Ok(Err(e))) => e.to_string(),
            _ => ping_err,
        };
        conn_task.abort();
        return r;
    }
    r.h2 = "ok".into();

    let results = open_streams(a, &p.target, &send_request, deadline).await;
    let mut echo_stream = None;
    for res in results {
        match res {
            Ok((status, send, recv)) => {
                r.statuses.push(status);
                if status == 200 && echo_stream.is_none() {
                    echo_stream = Some((send, recv));
                }
            }
            Err(e) => r.stream_errors.push(e),
        }
    }

    if a.payload_bytes > 0
        && let Some((send, recv)) = echo_stream.take()
    {
        let payload = crate::payload(1, a.payload_bytes);
        let result = match timeout_at(
            stage_deadline(deadline, ECHO_TIMEOUT),
            echo(send, recv, payload),
        )
        .await
        {
            Ok(res) => res,
            Err(_) => Err("echo timed out".into()),
        };
        if let Err(e) = &result {
            eprintln!("tunnel: echo failed: {e}");
        }
        r.echo_ok = Some(result.is_ok());
    }
    // A connection that failed while we used it makes "h2" say why.
    if conn_task.is_finished() {
        if let Ok(Err(e)) = (&mut conn_task).await {
            r.h2 = e.to_string();
        }
        return r;
    }
    drop(echo_stream);
    drop(send_request);

    // All handles gone: the connection shuts down gracefully (GOAWAY); how the peer takes
    // that is only logged.
    match timeout_at(
        stage_deadline(deadline, Duration::from_secs(2)),
        &mut conn_task,
    )
    .await
    {
        Ok(Ok(Err(e))) => eprintln!("tunnel: connection ended with: {e}"),
        Ok(_) => {}
        Err(_) => conn_task.abort(),
    }
    r
}

type Opened = Result<(u16, SendStream<Bytes>, RecvStream), String>;

/// Open `--streams` CONNECT streams at once; one result per stream, in order.
async fn open_streams(
    a: &Args,
    target: &Uri,
    send_request: &SendRequest<Bytes>,
    deadline: Instant,
) -> Vec<Opened> {
    let pad = (a.header_bytes > 0)
        .then(|| HeaderValue::from_str(&"a".repeat(a.header_bytes)).expect("ASCII header value"));
    let until = stage_deadline(deadline, STREAMS_TIMEOUT);
    // Known after the PING: the h2 client queues streams beyond this locally.
    let peer_max = send_request.current_max_send_streams();
    eprintln!("tunnel: peer allows {peer_max} concurrent streams");
    let tasks: Vec<JoinHandle<Opened>> = (0..a.streams)
        .map(|_| {
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .uri(target.clone())
                .body(())
                .expect("CONNECT request");
            if let Some(pad) = &pad {
                req.headers_mut().insert("x-pad", pad.clone());
            }
            let sr = send_request.clone();
            tokio::spawn(async move {
                match timeout_at(until, open_one(sr, req)).await {
                    Ok(res) => res,
                    Err(_) => Err(format!(
                        "timed out waiting for the response (peer allows {peer_max} \
                         concurrent streams; beyond that the client queues the CONNECT)"
                    )),
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(format!("stream task: {e}"))));
    }
    out
}

async fn open_one(sr: SendRequest<Bytes>, req: Request<()>) -> Opened {
    let mut sr = sr.ready().await.map_err(|e| format!("ready: {e}"))?;
    let (response, send) = sr
        .send_request(req, false)
        .map_err(|e| format!("send_request: {e}"))?;
    let response = response.await.map_err(|e| e.to_string())?;
    Ok((response.status().as_u16(), send, response.into_body()))
}

/// Send the payload (respecting flow control), end the stream, and check the response
/// body is the echo server's greeting line followed by exactly the payload.
async fn echo(
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    payload: Vec<u8>,
) -> Result<(), String> {
    let limit = payload.len() + 256;
    let sending = async {
        let mut rest = &payload[..];
        while !rest.is_empty() {
            send.reserve_capacity(rest.len());
            let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(format!("send capacity: {e}")),
                None => return Err("stream closed while sending".to_owned()),
            };
            let n = cap.min(rest.len());
            if n == 0 {
                continue;
            }
            send.send_data(Bytes::copy_from_slice(&rest[..n]), n == rest.len())
                .map_err(|e| format!("send_data: {e}"))?;
            rest = &rest[n..];
        }
        Ok(())
    };
    let receiving = async {
        let mut got = Vec::with_capacity(limit);
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(|e| format!("receive: {e}"))?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
            if got.len() > limit {
                return Err(format!("received more than {limit} bytes"));
            }
        }
        Ok(got)
    };
    let (sent, got) = tokio::join!(sending, receiving);
    let got = match (sent, got) {
        (Ok(()), Ok(got)) => got,
        (Err(e), Ok(_)) | (Ok(()), Err(e)) => return Err(e),
        (Err(s), Err(g)) => return Err(format!("{s}; {g}")),
    };
    let Some(nl) = got.iter().position(|b| *b == b'\n') else {
        return Err(format!("no greeting line in {} bytes", got.len()));
    };
    let greeting = String::from_utf8_lossy(&got[..nl]).into_owned();
    if greeting.parse::<SocketAddr>().is_err() {
        return Err(format!("greeting is not an address: {greeting:?}"));
    }
    eprintln!("tunnel: served by {greeting}");
    let echoed = &got[nl + 1..];
    if echoed != payload.as_slice() {
        return Err(format!(
            "echo mismatch: sent {} bytes, got {} back",
            payload.len(),
            echoed.len()
        ));
    }
    Ok(())
}
