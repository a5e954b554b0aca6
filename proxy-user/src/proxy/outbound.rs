//! The outbound listener: accepts connections the kernel redirected, recovers where each
//! was going and for which task, then either sends them through the mTLS tunnel to the
//! destination's node proxy (meshed endpoint: HTTP request by request, anything else as
//! an opaque stream — see `detect`), forwards them as plain TCP (unknown destination,
//! permissive mode), or closes them (unknown destination, strict mode).
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::Mesh;
use crate::{
    accept::Acceptor,
    config::Mode,
    copy,
    discovery::Endpoint,
    ebpf::OrigDstSource,
    identity::SpiffeId,
    metrics::{Metrics, istio::TcpLabels},
    tasks::{TaskRef, TaskTable},
    types::{OrigDst, normalise},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an opaque stream goes: the identities the task presents and the endpoint must
/// present, the destination proxy, and the address the task dialled.
#[derive(Clone, Copy)]
struct TunnelStream<'a> {
    source: &'a SpiffeId,
    expected: &'a SpiffeId,
    tunnel: SocketAddr,
    target: SocketAddr,
}

/// One task connection's telemetry: its Istio labels and, once copied, its bytes.
pub(crate) struct ConnTelemetry {
    labels: TcpLabels,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
}

impl ConnTelemetry {
    fn new(labels: TcpLabels) -> Self {
        Self {
            labels,
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
        }
    }

    fn copied(&self, c: copy::Copied) {
        self.request_bytes.store(c.a_to_b, Ordering::Relaxed);
        self.response_bytes.store(c.b_to_a, Ordering::Relaxed);
    }

    /// The access log line of a finished connection.
    fn entry(
        &self,
        task: &TaskRef,
        dst: OrigDst,
        duration: Duration,
        error: Option<&io::Error>,
    ) -> serde_json::Value {
        let l = &self.labels;
        serde_json::json!({
            "time": crate::access_log::now(),
            "kind": "tcp",
            "reporter": "source",
            "duration_ms": duration.as_secs_f64() * 1000.0,
            "request_bytes": self.request_bytes.load(Ordering::Relaxed),
            "response_bytes": self.response_bytes.load(Ordering::Relaxed),
            "error": error.map(|e| e.to_string()),
            "source_task": task.id.as_str(),
            "source_workload": l.source_workload,
            "source_principal": l.source_principal,
            "destination_service": l.destination_service,
            "destination_workload": l.destination_workload,
            "destination_principal": l.destination_principal,
            "original_destination": dst.0.to_string(),
        })
    }
}

pub struct Outbound {
    pub orig_dst: Arc<dyn OrigDstSource>,
    pub tasks: Arc<TaskTable>,
    pub metrics: Arc<Metrics>,
    /// SO_MARK for upstream sockets, so the redirect never loops them back to us.
    pub socket_mark: u32,
    pub mode: Mode,
    pub mesh: Option<Arc<Mesh>>,
    /// Meshed destination ports carried opaque without detection.
    pub opaque_ports: Vec<u16>,
    pub detect_timeout: Duration,
    /// Open connections per source task; beyond it a connection is closed at once.
    pub max_connections_per_task: usize,
    /// Opaque TCP connections idle this long are closed (`None`: never).
    pub tcp_idle_timeout: Option<Duration>,
    /// The ECS cluster (the namespace of workloads in telemetry).
    pub cluster: String,
}

impl Outbound {
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let mut acceptor = Acceptor::new("outbound", self.metrics.clone());
        loop {
            let (stream, peer) = tokio::select! {
                conn = acceptor.accept(&listener) => conn,
                () = shutdown.cancelled() => return,
            };
            let this = self.clone();
            tracker.spawn(async move { this.handle(stream, normalise(peer)).await });
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let Some((dst, task_index)) = self.orig_dst.claim(peer) else {
            self.metrics.fail("no_original_destination");
            tracing::warn!(%peer, "no original destination recorded; closing");
            return;
        };
        let Some(task) = self.tasks.get(task_index) else {
            self.metrics.fail("unknown_task");
            tracing::warn!(%peer, task_index, "connection from an unknown task index; closing");
            return;
        };
        // One noisy task cannot take every socket of the node: beyond its cap a connection
        // is closed at once (the client sees EOF before any byte).
        let Some(_slot) = task.try_open(self.max_connections_per_task) else {
            self.metrics.fail("task_connection_limit");
            tracing::debug!(task = %task.id, %dst, cap = self.max_connections_per_task, "task at its connection cap; closing");
            return;
        };
        if dst.0.ip().is_unspecified() {
            // The kernel refuses these for tasks with their own netns; never dial one from
            // the host netns, where it means the host's loopback.
            self.metrics.fail("unspecified_destination");
            tracing::warn!(task = %task.id, %dst, "unspecified destination; closing");
            return;
        }
        let meshed = self.mesh.as_ref().and_then(|m| {
            m.discovery
                .load()
                .endpoint(dst.0)
                .cloned()
                // The identity it must prove, rendered once for telemetry and the tunnel.
                .map(|ep| {
                    let expected = m.expected.for_endpoint(&ep);
                    (m, ep, expected)
                })
        });
        if meshed.is_none() && self.mode == Mode::Strict {
            self.metrics.fail("unknown_destination");
            tracing::warn!(task = %task.id, %dst, "strict mode: destination is not a meshed endpoint; closing");
            return;
        }
        let conn = ConnTelemetry::new(
            self.tcp_labels(&task, meshed.as_ref().map(|(_, ep, id)| (ep, id.as_ref()))),
        );
        self.metrics
            .istio
            .tcp_opened
            .get_or_create(&conn.labels)
            .inc();
        let started = std::time::Instant::now();
        let _ = client.set_nodelay(true);
        let result = match meshed {
            Some((mesh, ep, expected)) => {
                self.meshed(client, mesh, &task, (&ep, expected), dst, &conn)
                    .await
            }
            None => self.forward(client, &task, dst, &conn).await,
        };
        self.metrics
            .istio
            .tcp_closed
            .get_or_create(&conn.labels)
            .inc();
        self.metrics
            .tcp_duration
            .get_or_create(&conn.labels)
            .observe(started.elapsed().as_secs_f64());
        if let Some(log) = self.metrics.access_log().filter(|l| l.tcp_on()) {
            log.write(&conn.entry(&task, dst, started.elapsed(), result.as_ref().err()));
        }
        match result {
            Ok(()) => tracing::debug!(%peer, %dst, task = %task.id, "connection closed"),
            Err(e) => {
                tracing::debug!(%peer, %dst, task = %task.id, error = %e, "connection ended with error")
            }
        }
    }

    /// Istio's TCP labels of a connection from `task`: to a meshed endpoint, or (`None`)
    /// to a destination outside the mesh.
    fn tcp_labels(
        &self,
        task: &TaskRef,
        meshed: Option<(&Endpoint, Option<&SpiffeId>)>,
    ) -> TcpLabels {
        let unknown = || "unknown".to_owned();
        let (destination_workload, destination_service, destination_principal) = match meshed {
            Some((ep, expected)) => (
                ep.family.clone(),
                ep.service.clone(),
                expected.map_or_else(unknown, |id| id.to_string()),
            ),
            None => (unknown(), unknown(), unknown()),
        };
        TcpLabels {
            reporter: "source",
            source_workload: task.family.clone(),
            source_workload_namespace: self.cluster.clone(),
            source_principal: task
                .identity
                .as_ref()
                .map_or_else(unknown, |id| id.to_string()),
            destination_workload,
            destination_workload_namespace: self.cluster.clone(),
            destination_principal,
            destination_service,
            request_protocol: "tcp",
            connection_security_policy: "unknown",
        }
    }

    async fn forward(
        &self,
        client: TcpStream,
        task: &TaskRef,
        dst: OrigDst,
        conn: &ConnTelemetry,
    ) -> io::Result<()> {
        let upstream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            copy::connect_marked(dst.0, self.socket_mark),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.fail("upstream_connect");
                return Err(e);
            }
            Err(_) => {
                self.metrics.fail("upstream_connect_timeout");
                return Err(io::ErrorKind::TimedOut.into());
            }
        };
        self.copy(client, upstream, task, conn).await
    }

    /// A meshed destination: detect the protocol (unless the port is opaque), then HTTP
    /// request by request or one opaque tunnel stream.
    async fn meshed(
        &self,
        mut client: TcpStream,
        mesh: &Arc<Mesh>,
        task: &Arc<TaskRef>,
        (ep, expected): (&Endpoint, Option<SpiffeId>),
        dst: OrigDst,
        conn: &ConnTelemetry,
    ) -> io::Result<()> {
        let (Some(source), Some(expected)) = (task.identity.clone(), expected) else {
            self.metrics.fail("no_identity");
            return Err(io::Error::other(
                "no identity for the source task or the endpoint",
            ));
        };
        let stream = TunnelStream {
            source: &source,
            expected: &expected,
            tunnel: ep.tunnel,
            target: dst.0,
        };
        if mesh.traffic.policy(&ep.service).balance {
            // Opaque TCP balanced per connection (the service opted in): detection would
            // change nothing, the bytes go to whichever endpoint answers.
            return self.balanced(client, mesh, task, &source, ep, conn).await;
        }
        if self.opaque_ports.contains(&dst.0.port()) {
            return self.tunnel(client, mesh, task, stream, conn).await;
        }
        let (protocol, read) = super::detect::detect(&mut client, self.detect_timeout).await?;
        let client = super::prefixed::Prefixed::new(read, client);
        if protocol == super::detect::Protocol::Opaque {
            return self.tunnel(client, mesh, task, stream, conn).await;
        }
        let flow = Arc::new(super::http::HttpFlow {
            mesh: mesh.clone(),
            metrics: self.metrics.clone(),
            source,
            source_task: task.id.clone(),
            source_family: task.family.clone(),
            expected,
            tunnel: ep.tunnel,
            target: dst.0,
            target_family: ep.family.clone(),
            service: ep.service.clone(),
        });
        // The connection's bytes, as opaque ones are counted (Istio counts every TCP
        // connection's bytes, HTTP included).
        let client = copy::Counted::new(
            client,
            self.metrics
                .istio
                .tcp_received
                .get_or_create(&conn.labels)
                .clone(),
            self.metrics
                .istio
                .tcp_sent
                .get_or_create(&conn.labels)
                .clone(),
        );
        let totals = client.totals.clone();
        flow.serve(client, protocol, task.drain.clone()).await;
        conn.request_bytes
            .store(totals.0.load(Ordering::Relaxed), Ordering::Relaxed);
        conn.response_bytes
            .store(totals.1.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok(())
    }

    /// One opaque stream through the tunnel.
    async fn tunnel<C>(
        &self,
        client: C,
        mesh: &Mesh,
        task: &TaskRef,
        stream: TunnelStream<'_>,
        conn: &ConnTelemetry,
    ) -> io::Result<()>
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let TunnelStream {
            source,
            expected,
            tunnel,
            target: dst,
        } = stream;
        let opened = tokio::time::timeout(
            CONNECT_TIMEOUT,
            mesh.pool.open(source, expected, tunnel, dst),
        )
        .await;
        let (stream, lease) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                self.metrics.fail(e.reason());
                tracing::warn!(task = %task.id, source_identity = %source, expected = %expected, %dst, error = %e, "tunnel failed");
                return Err(io::Error::other(e));
            }
            Err(_) => {
                self.metrics.fail("tunnel_timeout");
                return Err(io::ErrorKind::TimedOut.into());
            }
        };
        let result = self.copy(client, stream, task, conn).await;
        drop(lease);
        result
    }

    /// An opaque connection of a service with `balance = true`: each attempt goes to an
    /// endpoint the balancer picks, a failed stream open (refused, timed out, health gate)
    /// is retried on another one within the service's budget; nothing was sent yet, so
    /// the task never notices.
    async fn balanced(
        &self,
        client: TcpStream,
        mesh: &Mesh,
        task: &TaskRef,
        source: &SpiffeId,
        dialled: &Endpoint,
        conn: &ConnTelemetry,
    ) -> io::Result<()> {
        let service = dialled.service.as_str();
        let policy = mesh.traffic.policy(service);
        let state = mesh.balancer.service(service, policy.budget);
        state.budget.deposit(std::time::Instant::now());
        let mut rng = fastrand::Rng::new();
        let mut tried = Vec::new();
        for attempt in 1..=policy.max_attempts {
            let discovery = mesh.discovery.load();
            let endpoints = discovery.service(service);
            let Some(flight) = state.pick(endpoints, &tried, std::time::Instant::now(), &mut rng)
            else {
                self.metrics.fail("no_endpoints");
                return Err(io::Error::other("no endpoint with a weight above 0"));
            };
            let ep = endpoints
                .iter()
                .find(|e| e.addr == flight.addr())
                .cloned()
                .expect("the balancer picks among these endpoints");
            drop(discovery);
            tried.push(ep.addr);
            let opened = match mesh.expected.for_endpoint(&ep) {
                None => Err("no_identity"),
                Some(expected) => match tokio::time::timeout(
                    policy.connect_timeout,
                    mesh.pool.open(source, &expected, ep.tunnel, ep.addr),
                )
                .await
                {
                    Ok(Ok(x)) => Ok(x),
                    Ok(Err(e)) => {
                        tracing::debug!(task = %task.id, endpoint = %ep.addr, error = %e, "tunnel stream failed");
                        Err(e.reason())
                    }
                    Err(_) => Err("connect_timeout"),
                },
            };
            let now = std::time::Instant::now();
            let rtt = now.saturating_duration_since(flight.started());
            match opened {
                Ok((stream, lease)) => {
                    let result = self.copy(client, stream, task, conn).await;
                    drop(lease);
                    flight.finish(crate::balance::Outcome::Success(rtt), now);
                    return result;
                }
                Err(reason) => {
                    flight.finish(crate::balance::Outcome::Failure(rtt), now);
                    self.metrics.fail(reason);
                    let labels = crate::metrics::ServiceReasonLabels {
                        service: service.to_owned(),
                        reason,
                    };
                    if attempt == policy.max_attempts {
                        break;
                    }
                    if !state.budget.try_withdraw(std::time::Instant::now()) {
                        self.metrics
                            .retry_budget_exhausted
                            .get_or_create(&labels)
                            .inc();
                        break;
                    }
                    self.metrics.retries.get_or_create(&labels).inc();
                    tokio::time::sleep(crate::balance::backoff(attempt, &mut rng)).await;
                }
            }
        }
        Err(io::Error::other(
            "no endpoint of the service accepted the connection",
        ))
    }

    /// Copy until both directions end, or until the task is unenrolled (drained).
    async fn copy<C, U>(
        &self,
        client: C,
        upstream: U,
        task: &TaskRef,
        conn: &ConnTelemetry,
    ) -> io::Result<()>
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        // Istio's directions: "received" is the request (task → destination), "sent" the
        // response (destination → task).
        let labels = &conn.labels;
        let sent = self
            .metrics
            .istio
            .tcp_received
            .get_or_create(labels)
            .clone();
        let received = self.metrics.istio.tcp_sent.get_or_create(labels).clone();
        let copy = copy::bidirectional(client, upstream, &sent, &received, self.tcp_idle_timeout);
        tokio::select! {
            r = copy => match r? {
                c if c.ended == copy::Ended::Done => {
                    conn.copied(c);
                    Ok(())
                }
                c => {
                    conn.copied(c);
                    self.metrics.tcp_idle_timeouts.inc();
                    Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"))
                }
            },
            () = task.drain.cancelled() => Err(io::Error::other("task stopped: connection drained")),
        }
    }
}

#[cfg(test)]
mod tests;
