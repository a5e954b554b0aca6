//! One bounded HTTP/1.1 exchange per call, over TLS to the issuer or plain to IMDS. Issuer
//! and IMDS calls are rare: no pooling.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls_pki_types::ServerName;

/// One connect to the issuer or IMDS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One whole request (connect, handshake, response).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response read from the issuer or IMDS.
const MAX_RESPONSE: usize = 256 * 1024;

/// host:port of an http(s) URL (default port by scheme).
pub(crate) fn authority(url: &http::Uri) -> Result<(String, u16), String> {
    let host = url.host().ok_or_else(|| format!("{url}: no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(match url.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Ok((host, port))
}

fn ok_body((status, text): (u16, String)) -> Result<String, String> {
    if status == 200 {
        Ok(text)
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// One HTTP/1.1 request on a new connection (TLS when `tls` is given), bounded in time
/// and response size. Issuer and IMDS calls are rare: no pooling.
pub(crate) async fn http_call(
    (host, port): &(String, u16),
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, String), String> {
    let work = async {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host.as_str(), *port)),
        )
        .await
        .map_err(|_| format!("connect to {host}:{port} timed out"))?
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        let mut req = http::Request::builder().method(method).uri(path);
        // A caller-given host wins (a signed request must go out with the host it signed).
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", format!("{host}:{port}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = match tls {
            Some((cfg, sni)) => {
                let name = ServerName::try_from(sni).map_err(|e| e.to_string())?;
                let stream = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
                send(stream, req).await?
            }
            None => send(tcp, req).await?,
        };
        Ok(resp)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| format!("{host}:{port}: no answer within {REQUEST_TIMEOUT:?}"))?
}

async fn send<S>(stream: S, req: http::Request<Full<Bytes>>) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// IMDSv2 (`imds_url`, e.g. `http://169.254.169.254`): a session token, then each of
/// `paths` with it; their bodies in order.
pub(crate) async fn imds_get(imds_url: &http::Uri, paths: &[&str]) -> Result<Vec<String>, String> {
    let target = authority(imds_url)?;
    let token = http_call(
        &target,
        None,
        http::Method::PUT,
        "/latest/api/token",
        &[("x-aws-ec2-metadata-token-ttl-seconds", "60")],
        Bytes::new(),
    )
    .await
    .and_then(ok_body)?;
    let mut out = Vec::new();
    for path in paths {
        let r = http_call(
            &target,
            None,
            http::Method::GET,
            path,
            &[("x-aws-ec2-metadata-token", token.trim())],
            Bytes::new(),
        )
        .await
        .and_then(ok_body)
        .map_err(|e| format!("{path}: {e}"))?;
        out.push(r);
    }
    Ok(out)
}
