//! Newtypes for the values that identify flows and workloads, so a task id can never be
//! passed where a family is expected and a kernel key is always built the same way.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use proxy_common::{AF_INET, AF_INET6, SockKey};

/// An ECS task id (the last segment of the task ARN).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct TaskId(String);

impl TaskId {
    pub fn new(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 128 {
            return Err(format!("{s:?}: task id must be 1..=128 characters"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!("{s:?}: task id may contain only [A-Za-z0-9_-]"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The destination a task's connect() asked for, before the kernel redirected it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDst(pub SocketAddr);

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// v4-mapped IPv6 is the same IPv4 flow; the kernel side normalises it the same way.
pub fn normalise(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Kernel words are in network byte order: the in-memory bytes are the address octets.
fn words_of(ip: IpAddr) -> ([u32; 4], u16) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], AF_INET6)
        }
    }
}

pub fn ipv4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    words_of(IpAddr::V6(ip)).0
}

/// The `ORIG_DST` key for a peer address as the proxy sees it on an accepted socket.
pub fn sock_key(peer: SocketAddr) -> SockKey {
    let peer = normalise(peer);
    let (addr, family) = words_of(peer.ip());
    SockKey {
        addr,
        port: peer.port(),
        family,
    }
}

/// Decode an address the kernel recorded.
pub fn socket_addr(addr: [u32; 4], port: u16, family: u16) -> Option<SocketAddr> {
    let bytes = |w: u32| w.to_ne_bytes();
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(bytes(addr[0]))),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&bytes(*w));
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_peer_uses_the_ipv4_key() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4000".parse().unwrap();
        let plain: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        assert_eq!(sock_key(mapped), sock_key(plain));
        assert_eq!(sock_key(plain).family, AF_INET);
        // Network byte order in memory: first octet first.
        assert_eq!(sock_key(plain).addr[0].to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn kernel_words_round_trip() {
        for s in ["10.0.0.1:80", "[fd00::2]:8080", "[::1]:1"] {
            let a: SocketAddr = s.parse().unwrap();
            let k = sock_key(a);
            assert_eq!(socket_addr(k.addr, k.port, k.family), Some(a));
        }
    }

    #[test]
    fn task_ids_are_checked() {
        assert!(TaskId::new("0123abcd-ef").is_ok());
        assert!(TaskId::new("").is_err());
        assert!(TaskId::new("a b").is_err());
    }
}

/// The parts of an ARN, `arn:<partition>:<service>:<region>:<account>:<resource>` (the
/// resource keeps its own `:` and `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arn<'a> {
    pub partition: &'a str,
    pub service: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    pub resource: &'a str,
}

impl<'a> Arn<'a> {
    pub fn parse(s: &'a str) -> Option<Self> {
        let mut parts = s.splitn(6, ':');
        let (
            Some("arn"),
            Some(partition),
            Some(service),
            Some(region),
            Some(account),
            Some(resource),
        ) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        )
        else {
            return None;
        };
        Some(Arn {
            partition,
            service,
            region,
            account,
            resource,
        })
    }
}
