//! The only place that defines what crosses the kernel boundary. Both the eBPF programs and
//! userspace compile these exact layouts, so a field added on one side cannot silently
//! misalign the other; the size assertions below turn such a drift into a build error.
#![no_std]

/// Linux address-family numbers, as the kernel reports them in `bpf_sock_addr`/`bpf_sock_ops`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u32 = 6;
pub const SOCK_STREAM: u32 = 1;

/// DNS over TCP to a configured resolver (`RESOLVERS`) is never redirected; port 53 of any
/// other address is redirected like every other port, so it is no way around the mesh.
pub const DNS_PORT: u16 = 53;

/// How deep below the cgroup root an enrolled task's processes may sit: the connect hooks
/// look up the caller's cgroup and each of its ancestors (a process in a child cgroup of
/// an enrolled container is that container's). Real layouts are 3-4 levels deep.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// Map names as they appear in the object file and under the pin directory.
pub mod maps {
    pub const ENROLLED: &str = "ENROLLED";
    pub const EXCLUDED: &str = "EXCLUDED";
    pub const PENDING: &str = "PENDING";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const SETTINGS: &str = "SETTINGS";
    pub const STATS: &str = "STATS";
    pub const RESOLVERS: &str = "RESOLVERS";
    /// Every map of one instance; `uninstall` removes exactly these pins.
    pub const ALL: [&str; 7] = [
        ENROLLED, EXCLUDED, PENDING, ORIG_DST, SETTINGS, STATS, RESOLVERS,
    ];
}

/// Program (function) names in the object file.
pub mod progs {
    pub const CONNECT4: &str = "ecsmesh_connect4";
    pub const CONNECT6: &str = "ecsmesh_connect6";
    pub const SOCKOPS: &str = "ecsmesh_sockops";
    pub const ALL: [&str; 3] = [CONNECT4, CONNECT6, SOCKOPS];
}

/// Capacity of the per-connection maps. An insert into a full map makes connect() fail
/// (EPERM) rather than letting an enrolled task bypass the mesh.
pub const MAX_CONNECTIONS: u32 = 65_536;
pub const MAX_TASK_CGROUPS: u32 = 16_384;
pub const MAX_EXCLUDED_CIDRS: u32 = 1_024;
pub const MAX_RESOLVERS: u32 = 64;

/// Value of `ENROLLED`, keyed by cgroup id (u64). One task with several containers has one
/// entry per container cgroup, all with the same `task_index`. The redirect target lives
/// here, not in a global setting, because host-mode and bridge-mode tasks reach the node
/// proxy at different addresses (loopback vs the bridge address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TaskEntry {
    /// Index into the proxy's task table; labels metrics without strings in the kernel.
    pub task_index: u32,
    /// Outbound listener port, host byte order.
    pub proxy_port: u16,
    /// `TASK_HOST_NETWORK` when the task shares the host's network namespace.
    pub flags: u16,
    /// Outbound listener IPv4 address, network byte order (as `bpf_sock_addr.user_ip4`).
    pub proxy_v4: u32,
    /// Outbound listener IPv6 address, network byte order words (as `user_ip6`).
    pub proxy_v6: [u32; 4],
}

/// `TaskEntry::flags`: the task uses the host's netns, where the unspecified address is
/// the host's own (and the task's own) loopback.
pub const TASK_HOST_NETWORK: u16 = 1;

/// An address as the proxy computes it from an accepted socket's peer: IPv4 is kept in
/// `addr[0]` (network byte order) with `family = AF_INET`, including v4-mapped IPv6 peers,
/// which are normalised to IPv4 on both sides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct SockKey {
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
}

/// The destination a task asked for, and who asked. Stored in `PENDING` (keyed by socket
/// cookie, from connect() until the handshake completes) and `ORIG_DST` (keyed by the
/// client's local address, while the connection lives).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub task_index: u32,
    /// Socket cookie of the client socket: lets the close hook delete only its own entry.
    pub cookie: u64,
    /// CLOCK_MONOTONIC ns when the client closed gracefully before the proxy claimed the
    /// entry (0 while open). Such an entry is kept: the connection's data may still sit in
    /// the proxy's accept queue. The proxy deletes entries it claims and sweeps old ones.
    pub closed_ns: u64,
}

/// Single-entry `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// cgroup id of the proxy itself: never redirected, wherever it sits in the tree. This
    /// is the only exemption by caller: a socket mark would not do, since a task with
    /// CAP_NET_RAW (Docker's default) can set any mark.
    pub proxy_cgroup_id: u64,
    /// `SETTINGS_STRICT`, ...
    pub flags: u32,
    pub _pad: u32,
}

/// `Settings::flags`: strict mode — a connect the mesh cannot carry (no listener of the
/// destination's family for that task, or a cgroup below the attach point that is not
/// enrolled) is refused instead of going out directly.
pub const SETTINGS_STRICT: u32 = 1;

/// Indexes into the per-CPU `STATS` array.
pub mod stats {
    pub const REDIRECTED: u32 = 0;
    pub const EXCLUDED: u32 = 1;
    pub const PENDING_FULL: u32 = 2;
    pub const PUBLISH_FAILED: u32 = 3;
    /// Refused: the unspecified address (0.0.0.0, ::) from a task with its own netns,
    /// which the proxy in the host netns would dial as the host's loopback.
    pub const UNSPECIFIED_DENIED: u32 = 4;
    /// Refused in strict mode: no proxy listener of the destination's family.
    pub const NO_LISTENER_DENIED: u32 = 5;
    /// Let through unmeshed in permissive mode: no proxy listener of that family.
    pub const NO_LISTENER_PASSED: u32 = 6;
    /// Refused in strict mode: a cgroup below the attach point that is not enrolled.
    pub const UNENROLLED_DENIED: u32 = 7;
    /// Let through in permissive mode: a cgroup below the attach point, not enrolled.
    pub const UNENROLLED_PASSED: u32 = 8;
    pub const COUNT: u32 = 9;
    /// Label of each counter, by index (metrics).
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "excluded",
        "pending_full",
        "publish_failed",
        "unspecified_denied",
        "no_listener_denied",
        "no_listener_passed",
        "unenrolled_denied",
        "unenrolled_passed",
    ];
}

const _: () = assert!(core::mem::size_of::<TaskEntry>() == 28);
const _: () = assert!(core::mem::size_of::<SockKey>() == 20);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 40);
const _: () = assert!(core::mem::size_of::<Settings>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), contain only integers, and have no padding the kernel
    // could leave uninitialised (explicit `_pad` fields, sizes asserted above).
    unsafe impl aya::Pod for super::TaskEntry {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::Settings {}
}
