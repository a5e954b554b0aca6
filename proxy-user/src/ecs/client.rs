//! One HTTP/1.1 GET per connection, over whatever stream the caller opened (TCP to the
//! agent, a Unix socket to Docker). Both peers are local daemons polled every few seconds,
//! so a connection pool would buy nothing and a fresh connection never inherits a wedged
//! one. The whole exchange — connect, request, body — shares one deadline.
use std::{future::Future, time::Duration};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use super::EcsError;

/// GET `path_and_query` with `Host: host` over the stream `connect` opens, and decode the
/// JSON body. `endpoint` names the request in every error ("ECS agent GET http://…/v1/tasks").
pub(crate) async fn get_json<T, S, C>(
    endpoint: &str,
    connect: C,
    host: &str,
    path_and_query: &str,
    timeout: Duration,
    body_limit: usize,
) -> Result<T, EcsError>
where
    T: DeserializeOwned,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Future<Output = std::io::Result<S>>,
{
    let exchange = async {
        let stream = connect.await.map_err(|source| EcsError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })?;
        let http = |source| EcsError::Http {
            endpoint: endpoint.to_owned(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection task ends when the response is read or the sender is dropped
        // (timeout); its error, if any, surfaces through `send_request` as well.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "local HTTP connection ended with error");
            }
        });
        let req = hyper::Request::get(path_and_query)
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| EcsError::Unexpected {
                endpoint: endpoint.to_owned(),
                message: format!("cannot build request: {e}"),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), body_limit)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => http(*e),
                Err(_) => EcsError::TooLarge {
                    endpoint: endpoint.to_owned(),
                    limit: body_limit,
                },
            })?
            .to_bytes();
        Ok::<_, EcsError>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| EcsError::Timeout {
            endpoint: endpoint.to_owned(),
            timeout,
        })??;
    if !status.is_success() {
        const SHOWN: usize = 200;
        let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN)]);
        return Err(EcsError::Status {
            endpoint: endpoint.to_owned(),
            status,
            body: text.trim().to_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| EcsError::Json {
        endpoint: endpoint.to_owned(),
        source,
    })
}

/// Go's `encoding/json` writes a nil slice as `null`; treat it as empty.
pub(super) fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}
