//! The forwarding logic on loopback, without root: a fake original-destination table
//! stands in for the kernel maps.
use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::types::TaskId;

#[derive(Default)]
struct FakeTable(Mutex<HashMap<SocketAddr, (OrigDst, u32)>>);

impl OrigDstSource for FakeTable {
    fn claim(&self, peer: SocketAddr) -> Option<(OrigDst, u32)> {
        self.0.lock().unwrap().remove(&peer)
    }
}

/// Upstream that reads until EOF, then answers with what it got, reversed, and closes:
/// only works if the proxy forwards the client's half-close.
async fn reverse_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                buf.reverse();
                s.write_all(&buf).await.unwrap();
            });
        }
    });
    addr
}

async fn start(table: Arc<FakeTable>) -> (SocketAddr, Arc<Metrics>, CancellationToken) {
    let (addr, metrics, stop, _) = start_with_tasks(table).await;
    (addr, metrics, stop)
}

async fn start_with_tasks(
    table: Arc<FakeTable>,
) -> (SocketAddr, Arc<Metrics>, CancellationToken, Arc<TaskTable>) {
    start_capped(table, 4096).await
}

async fn start_capped(
    table: Arc<FakeTable>,
    max_connections_per_task: usize,
) -> (SocketAddr, Arc<Metrics>, CancellationToken, Arc<TaskTable>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::default());
    let tasks = Arc::new(TaskTable::default());
    tasks.insert(TaskRef::new(
        TaskId::new("task-a").unwrap(),
        "web".into(),
        None,
        true,
    ));
    let proxy = Arc::new(Outbound {
        orig_dst: table,
        tasks: tasks.clone(),
        metrics: metrics.clone(),
        socket_mark: 0,
        mode: Mode::Permissive,
        mesh: None,
        opaque_ports: Vec::new(),
        detect_timeout: std::time::Duration::from_secs(10),
        max_connections_per_task,
        tcp_idle_timeout: None,
        cluster: "test".into(),
    });
    let stop = CancellationToken::new();
    tokio::spawn(proxy.serve(listener, stop.clone(), TaskTracker::new()));
    (addr, metrics, stop, tasks)
}

/// The value of `name` for the test task's workload (`web`) in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("source_workload=\"web\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn forwards_to_the_original_destination_with_half_close() {
    let upstream = reverse_server().await;
    let table = Arc::new(FakeTable::default());
    let (proxy, metrics, _stop) = start(table.clone()).await;

    let mut s = connect_as_task(&table, proxy, upstream).await;
    s.write_all(b"hello mesh").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hsem olleh");

    // Counters are updated as bytes flow; closed once both directions ended.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let text = metrics.encode();
    for (name, value) in [
        ("istio_tcp_connections_opened_total", 1.0),
        ("istio_tcp_connections_closed_total", 1.0),
        // Istio's directions: received = request bytes, sent = response bytes.
        ("istio_tcp_received_bytes_total", 10.0),
        ("istio_tcp_sent_bytes_total", 10.0),
    ] {
        assert_eq!(sample(&text, name), Some(value), "{name} in {text}");
    }
    assert!(table.0.lock().unwrap().is_empty(), "entry claimed");
}

#[tokio::test]
async fn connections_without_a_recorded_destination_are_closed_and_counted() {
    let (proxy, metrics, _stop) = start(Arc::new(FakeTable::default())).await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "closed by the proxy");
    let text = metrics.encode();
    assert!(
        text.contains("reason=\"no_original_destination\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn refused_upstream_closes_the_client_and_counts() {
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let table = Arc::new(FakeTable::default());
    let (proxy, metrics, _stop) = start(table.clone()).await;
    let mut s = connect_as_task(&table, proxy, closed).await;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(metrics.encode().contains("reason=\"upstream_connect\"} 1"));
}

#[tokio::test]
async fn unenrolling_a_task_drains_its_open_connections() {
    // An upstream that never answers: the connection stays open until someone closes it.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let held = tokio::spawn(async move { upstream.accept().await.map(|(s, _)| s) });
    let table = Arc::new(FakeTable::default());
    let (proxy, metrics, _stop, tasks) = start_with_tasks(table.clone()).await;
    let mut s = connect_as_task(&table, proxy, upstream_addr).await;
    s.write_all(b"x").await.unwrap();
    let _upstream_side = held.await.unwrap().unwrap();
    tasks.remove(0).expect("task enrolled");
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed promptly");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "connection closed by the drain"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        sample(&metrics.encode(), "istio_tcp_connections_closed_total"),
        Some(1.0)
    );
}

/// Connect to the proxy as task 0 going to `dst`.
async fn connect_as_task(table: &FakeTable, proxy: SocketAddr, dst: SocketAddr) -> TcpStream {
    let client = tokio::net::TcpSocket::new_v4().unwrap();
    client.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    table
        .0
        .lock()
        .unwrap()
        .insert(client.local_addr().unwrap(), (OrigDst(dst), 0));
    client.connect(proxy).await.unwrap()
}

async fn echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"ping"
}

#[tokio::test]
async fn connections_beyond_the_task_cap_are_closed_and_counted() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let table = Arc::new(FakeTable::default());
    let (proxy, metrics, _stop, _tasks) = start_capped(table.clone(), 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_as_task(&table, proxy, echo_addr).await;
        assert!(echoes(&mut s).await, "under the cap");
        held.push(s);
    }
    let mut over = connect_as_task(&table, proxy, echo_addr).await;
    assert!(
        !echoes(&mut over).await,
        "the 4th connection is closed at once"
    );
    assert!(
        metrics
            .encode()
            .contains("ecsmesh_tcp_connections_failed_total{reason=\"task_connection_limit\"} 1"),
        "{}",
        metrics.encode()
    );
    // A closed connection gives its slot back.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect_as_task(&table, proxy, echo_addr).await;
        if echoes(&mut s).await {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
