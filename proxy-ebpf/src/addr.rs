//! Address normalisation shared by the connect and sockops hooks, so that the key published
//! at ACTIVE_ESTABLISHED is computed exactly as the proxy computes it from its peer address.
use proxy_common::{AF_INET, AF_INET6, SockKey};

/// Third word of `::ffff:0:0/96` as the kernel stores it (bytes 00 00 ff ff, little-endian load).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
pub fn normalise(ip6: [u32; 4], port: u16) -> SockKey {
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD {
        SockKey {
            addr: [ip6[3], 0, 0, 0],
            port,
            family: AF_INET,
        }
    } else {
        SockKey {
            addr: ip6,
            port,
            family: AF_INET6,
        }
    }
}

/// Full-length LPM lookup key; IPv4 is looked up as `::ffff:a.b.c.d/128`.
#[inline(always)]
pub fn lpm_key(dst: &SockKey) -> aya_ebpf::maps::lpm_trie::Key<[u8; 16]> {
    let words = if dst.family == AF_INET {
        [0, 0, V4_MAPPED_WORD, dst.addr[0]]
    } else {
        dst.addr
    };
    let mut data = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        data[i * 4] = b[0];
        data[i * 4 + 1] = b[1];
        data[i * 4 + 2] = b[2];
        data[i * 4 + 3] = b[3];
        i += 1;
    }
    aya_ebpf::maps::lpm_trie::Key::new(128, data)
}
