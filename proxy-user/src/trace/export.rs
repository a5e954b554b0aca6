//! Export without touching the data path: a finished span is offered to a bounded queue
//! (`try_send`: a full queue drops the span and counts it); one exporter thread, with its
//! own single-threaded runtime so nothing the exporter does can stall the proxy's
//! workers, gathers batches (`max_batch` spans, or what came within `export_interval`)
//! and posts each as OTLP/HTTP protobuf. A batch that fails or outlives `export_timeout`
//! is dropped and counted: no retries, so a collector that is down costs one refused
//! connection per batch and never a growing backlog.
//!
//! The OTLP exporter (opentelemetry-otlp) encodes and posts; the HTTP client under it is
//! hyper on rustls with the ring provider the mesh uses (reqwest would bring a second
//! TLS stack).
use std::{
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client as Hyper, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry::Context;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, RetryPolicy, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{TraceCounters, TraceSettings};

/// Largest collector response read (an `ExportTraceServiceResponse` is a few bytes).
const MAX_RESPONSE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("traces.ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("no trust roots for the https collector: {0}")]
    NativeRoots(String),
    #[error("TLS client for the collector: {0}")]
    Tls(#[from] rustls::Error),
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("trace exporter thread: {0}")]
    Thread(std::io::Error),
}

/// The span processor the tracer hands finished spans to.
#[derive(Debug)]
pub(super) struct Queue {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
    stop: CancellationToken,
    /// Signalled when the exporter thread has exported what was queued at `stop`.
    done: Mutex<std_mpsc::Receiver<()>>,
}

impl Queue {
    /// Builds the exporter and starts the exporter thread.
    pub(super) fn start(
        settings: &TraceSettings,
        resource: &Resource,
        counters: TraceCounters,
    ) -> Result<Self, ExportError> {
        let client = Client::new(settings)?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(settings.otlp_endpoint.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(settings.export_timeout)
            .with_retry_policy(RetryPolicy::disabled())
            .build()?;
        exporter.set_resource(resource);
        let (tx, rx) = mpsc::channel(settings.max_queue);
        let stop = CancellationToken::new();
        let (done_tx, done) = std_mpsc::channel();
        let batching = Batching {
            max_batch: settings.max_batch,
            interval: settings.export_interval,
            timeout: settings.export_timeout,
        };
        let (thread_stop, thread_counters) = (stop.clone(), counters.clone());
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        rt.block_on(run(rx, exporter, batching, thread_counters, thread_stop))
                    }
                    Err(e) => tracing::error!(error = %e, "trace exporter runtime did not start"),
                }
                let _ = done_tx.send(());
            })
            .map_err(ExportError::Thread)?;
        Ok(Self {
            tx,
            dropped: counters.dropped,
            stop,
            done: Mutex::new(done),
        })
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    /// Never blocks: a full queue (or a stopped exporter) drops the span.
    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Batches leave on their own within `export_interval`; nothing waits for them.
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.stop.cancel();
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        match done.recv_timeout(timeout) {
            Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => Ok(()),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                Err(opentelemetry_sdk::error::OTelSdkError::Timeout(timeout))
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Batching {
    max_batch: usize,
    interval: Duration,
    timeout: Duration,
}

/// The exporter thread: batches until `stop`, then exports what is queued and returns.
async fn run(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    batching: Batching,
    counters: TraceCounters,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        let mut batch = Vec::with_capacity(batching.max_batch);
        // The batch's first span, then up to `interval` for the rest.
        let got = tokio::select! {
            n = rx.recv_many(&mut batch, batching.max_batch) => n,
            () = stop.cancelled() => 0,
        };
        if got == 0 {
            break;
        }
        let deadline = tokio::time::Instant::now() + batching.interval;
        while batch.len() < batching.max_batch {
            let room = batching.max_batch - batch.len();
            let more = tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)) => r.unwrap_or(0),
                () = stop.cancelled() => 0,
            };
            if more == 0 {
                break;
            }
        }
        export(&exporter, batch, batching.timeout, &counters, &mut failing).await;
    }
    // Stopping: what is still queued goes out in batches, each within the timeout.
    rx.close();
    let mut rest = Vec::new();
    while let Ok(span) = rx.try_recv() {
        rest.push(span);
    }
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().saturating_sub(batching.max_batch));
        export(&exporter, tail, batching.timeout, &counters, &mut failing).await;
    }
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    timeout: Duration,
    counters: &TraceCounters,
    failing: &mut bool,
) {
    let n = batch.len() as u64;
    let error = match tokio::time::timeout(timeout, exporter.export(batch)).await {
        Ok(Ok(())) => {
            counters.exported.inc_by(n);
            if std::mem::take(failing) {
                tracing::info!("trace export recovered");
            }
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {timeout:?}"),
    };
    counters.dropped.inc_by(n);
    // Once per outage at warn; every failed batch at debug.
    if std::mem::replace(failing, true) {
        tracing::debug!(spans = n, error, "trace export failed; spans dropped");
    } else {
        tracing::warn!(
            spans = n,
            error,
            "trace export failed; spans dropped (counted in ecsmesh_trace_spans_dropped_total)"
        );
    }
}

/// The exporter's HTTP client: hyper over rustls (ring), plain HTTP for `http://`.
#[derive(Debug, Clone)]
struct Client {
    inner: Hyper<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl Client {
    fn new(settings: &TraceSettings) -> Result<Self, ExportError> {
        let mut roots = rustls::RootCertStore::empty();
        if settings.otlp_endpoint.starts_with("https://") {
            match &settings.ca_file {
                Some(path) => {
                    let fail = |message: String| ExportError::CaFile {
                        path: path.display().to_string(),
                        message,
                    };
                    use rustls_pki_types::{CertificateDer, pem::PemObject};
                    for cert in
                        CertificateDer::pem_file_iter(path).map_err(|e| fail(e.to_string()))?
                    {
                        let cert = cert.map_err(|e| fail(e.to_string()))?;
                        roots.add(cert).map_err(|e| fail(e.to_string()))?;
                    }
                    if roots.is_empty() {
                        return Err(fail("no certificates".into()));
                    }
                }
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    let (added, _) = roots.add_parsable_certificates(found.certs);
                    if added == 0 {
                        return Err(ExportError::NativeRoots(format!("{:?}", found.errors)));
                    }
                }
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            inner: Hyper::builder(TokioExecutor::new()).build(connector),
            timeout: settings.export_timeout,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let work = async {
            let resp = self
                .inner
                .request(Request::from_parts(parts, Full::new(body)))
                .await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| HttpError::from("collector did not answer in time"))?
    }
}
