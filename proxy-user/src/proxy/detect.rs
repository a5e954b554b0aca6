//! Protocol detection on a task's outbound connection, from the first bytes the client
//! sends (linkerd2-proxy's approach): the HTTP/2 connection preface means HTTP/2 with
//! prior knowledge (h2c), an HTTP/1 method followed by a space means HTTP/1.x, anything
//! else — a TLS ClientHello included — is opaque TCP. A client that sends nothing within
//! the detection timeout is opaque too (a server-speaks-first protocol on a port nobody
//! listed); ports configured as opaque are never read before forwarding.
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods recognised as the start of an HTTP/1 request line.
const METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

/// Verdict on a (possibly partial) prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Is(Protocol),
    /// Still a prefix of something recognisable: read more.
    NeedMore,
}

/// Classifies the bytes read so far; pure, for unit tests.
pub fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    // HTTP/2 preface, or a prefix of it.
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // "METHOD " or a prefix of one.
    for m in METHODS {
        if buf.len() > m.len() {
            if buf.starts_with(m) && buf[m.len()] == b' ' {
                return Verdict::Is(Protocol::Http1);
            }
        } else if m.starts_with(buf) {
            return Verdict::NeedMore;
        }
    }
    Verdict::Is(Protocol::Opaque)
}

/// Longest prefix that can still be undecided ("OPTIONS " and the preface are shorter).
const MAX_PEEK: usize = 32;

/// Reads from `client` until the protocol is known, EOF, or `timeout`; returns the verdict
/// and every byte read (to be replayed to whoever handles the connection).
pub async fn detect<S: AsyncRead + Unpin>(
    client: &mut S,
    timeout: Duration,
) -> std::io::Result<(Protocol, Vec<u8>)> {
    let mut buf = Vec::with_capacity(MAX_PEEK);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify(&buf) {
            Verdict::Is(p) => return Ok((p, buf)),
            Verdict::NeedMore if buf.len() >= MAX_PEEK => return Ok((Protocol::Opaque, buf)),
            Verdict::NeedMore => {}
        }
        let mut chunk = [0u8; MAX_PEEK];
        let want = MAX_PEEK - buf.len();
        match tokio::time::timeout_at(deadline, client.read(&mut chunk[..want])).await {
            Err(_) => return Ok((Protocol::Opaque, buf)), // sent nothing (enough) in time
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http1_h2_and_everything_else() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(
            classify(b"OPTIONS * HTTP/1.1"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(classify(H2_PREFACE), Verdict::Is(Protocol::Http2));
        // TLS ClientHello, a database greeting reply, binary garbage.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02]),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(classify(b"\x00\x00\x00\x08"), Verdict::Is(Protocol::Opaque));
        assert_eq!(classify(b"GETX / HTTP/1.1"), Verdict::Is(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Verdict::Is(Protocol::Opaque));
    }

    #[test]
    fn truncated_prefixes_ask_for_more_and_wrong_turns_are_opaque() {
        assert_eq!(classify(b""), Verdict::NeedMore);
        assert_eq!(classify(b"G"), Verdict::NeedMore);
        assert_eq!(classify(b"POS"), Verdict::NeedMore);
        assert_eq!(classify(b"PRI * HTTP/2"), Verdict::NeedMore);
        // A garbled preface is not HTTP/2 (and "PRI" is no HTTP/1 method).
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Verdict::Is(Protocol::Opaque)
        );
        // "P" is a prefix of the preface and of POST/PUT/PATCH alike.
        assert_eq!(classify(b"P"), Verdict::NeedMore);
        assert_eq!(classify(b"PUT "), Verdict::Is(Protocol::Http1));
    }

    #[tokio::test]
    async fn detection_reads_across_fragments_and_gives_up_at_the_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        let writer = tokio::spawn(async move {
            client.write_all(b"PO").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"ST /x HTTP/1.1\r\n").await.unwrap();
            client
        });
        let (p, bytes) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert!(bytes.starts_with(b"POST "));
        let _client = writer.await.unwrap();

        // Nothing sent: opaque after the timeout, not before.
        let (_quiet, mut server) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let (p, bytes) = detect(&mut server, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!((p, bytes.len()), (Protocol::Opaque, 0));
        assert!(started.elapsed() >= Duration::from_millis(190));
    }
}
