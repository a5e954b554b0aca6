//! Kernel half of ecsmesh's outbound redirect.
//!
//! How the proxy learns the original destination (the choice the design asks us to explain):
//! `connect4`/`connect6` run before the socket has a local port, so they park the original
//! destination in `PENDING`, keyed by socket cookie. `sockops` sees the same socket at
//! ACTIVE_ESTABLISHED — on the client, before its final ACK is sent, so before the proxy can
//! `accept()` — and re-publishes it in `ORIG_DST` under the client's local (address, port):
//! exactly the peer address the proxy reads from its accepted socket. Every instance loads
//! its own copy of these maps (one aya load per proxy process) and attaches to its own
//! cgroup subtree, so two simulated instances that both use 127.0.0.1 never see each other's
//! keys; within one instance, host-mode tasks share one netns (ports are unique there) and
//! bridge-mode tasks have distinct bridge addresses.
//!
//! Nothing leaks: `TCP_CONNECT_CB` arms the state callback for redirected sockets, and the
//! transition to TCP_CLOSE removes the socket's `PENDING` entry and — when refused, timed
//! out or reset — its `ORIG_DST` entry. A client that closes gracefully may do so before the
//! proxy has accepted (fire-and-forget senders); its entry is only stamped `closed_ns`, the
//! proxy deletes every entry it claims and sweeps stamped ones it never claimed. `PENDING`
//! is an LRU so the one path that never reaches `tcp_connect()` (a route lookup failing
//! after our hook) cannot fill it either.
#![no_std]
#![no_main]

mod addr;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1,
        BPF_TCP_FIN_WAIT2, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use proxy_common::{
    AF_INET, AF_INET6, DNS_PORT, IPPROTO_TCP, MAX_CGROUP_DEPTH, MAX_CONNECTIONS,
    MAX_EXCLUDED_CIDRS, MAX_RESOLVERS, MAX_TASK_CGROUPS, OrigDst, SETTINGS_STRICT, SOCK_STREAM,
    Settings, SockKey, TASK_HOST_NETWORK, TaskEntry, stats,
};

/// `true`: let the syscall proceed (possibly with a rewritten address). `false`: fail it
/// with EPERM, used when bookkeeping is full so that an enrolled task never silently
/// bypasses the mesh.
type Allow = bool;

/// The verifier wants a provable 0/1 return, so the mapping is spelled out here.
#[inline(always)]
fn verdict(allow: Allow) -> i32 {
    if allow { 1 } else { 0 }
}

#[map]
static ENROLLED: HashMap<u64, TaskEntry> = HashMap::with_max_entries(MAX_TASK_CGROUPS, 0);
/// Keys are 16-byte addresses (IPv4 as v4-mapped IPv6) so one trie serves both families.
#[map]
static EXCLUDED: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_EXCLUDED_CIDRS, 0);
/// DNS resolvers tasks may reach on port 53 without the mesh (same key form as EXCLUDED).
#[map]
static RESOLVERS: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_RESOLVERS, 0);
#[map]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map]
static ORIG_DST: HashMap<SockKey, OrigDst> = HashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

#[cgroup_sock_addr(connect4)]
pub fn ecsmesh_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_connect::<false>(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn ecsmesh_connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_connect::<true>(&ctx))
}

#[sock_ops]
pub fn ecsmesh_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    1
}

fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *counter += 1 };
    }
}

/// The destination in `sa`, normalised (v4-mapped IPv6 becomes IPv4).
fn destination(sa: &bpf_sock_addr, v6: bool) -> SockKey {
    let port = u16::from_be(sa.user_port as u16);
    if !v6 {
        return SockKey {
            addr: [sa.user_ip4, 0, 0, 0],
            port,
            family: AF_INET,
        };
    }
    let ip6 = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    addr::normalise(ip6, port)
}

/// `V6` is a const parameter so each program gets its own copy: with a runtime flag the
/// compiler merges the IPv4 and IPv6 address stores into pointer arithmetic on the
/// context, which the verifier rejects.
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Allow {
    let v6 = V6;
    // SAFETY: the kernel hands every cgroup/connect program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return true;
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let settings = SETTINGS.get(0).copied().unwrap_or_default();
    if cgroup == settings.proxy_cgroup_id {
        return true;
    }
    let Some(task) = enrolled_task(cgroup) else {
        // Below the attach point but not (yet) enrolled: a task the agent has not
        // reported, or anything else placed there. Strict mode refuses it until it is
        // enrolled; permissive mode lets it go direct and counts it.
        if settings.flags & SETTINGS_STRICT != 0 {
            bump(stats::UNENROLLED_DENIED);
            return false;
        }
        bump(stats::UNENROLLED_PASSED);
        return true;
    };
    let dst = destination(sa, v6);
    if dst.addr == [0; 4] {
        // 0.0.0.0 / ::. In the host's netns that is the host itself, like loopback: local.
        // From a task with its own netns, the proxy would dial it from the host netns and
        // reach the host's loopback-only services: refused.
        if task.flags & TASK_HOST_NETWORK != 0 {
            bump(stats::EXCLUDED);
            return true;
        }
        bump(stats::UNSPECIFIED_DENIED);
        return false;
    }
    let is_proxy = if dst.family == AF_INET {
        dst.addr[0] == task.proxy_v4
    } else {
        dst.addr == task.proxy_v6
    };
    if (is_proxy && dst.port == task.proxy_port)
        || EXCLUDED.get(addr::lpm_key(&dst)).is_some()
        || (dst.port == DNS_PORT && RESOLVERS.get(addr::lpm_key(&dst)).is_some())
    {
        bump(stats::EXCLUDED);
        return true;
    }
    // No listener of that family for this task: the mesh cannot carry the flow.
    if (dst.family == AF_INET && task.proxy_v4 == 0)
        || (dst.family == AF_INET6 && task.proxy_v6 == [0; 4])
    {
        if settings.flags & SETTINGS_STRICT != 0 {
            bump(stats::NO_LISTENER_DENIED);
            return false;
        }
        bump(stats::NO_LISTENER_PASSED);
        return true;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dst.addr,
        port: dst.port,
        family: dst.family,
        task_index: task.task_index,
        cookie,
        closed_ns: 0,
    };
    if PENDING.insert(cookie, orig, 0).is_err() {
        bump(stats::PENDING_FULL);
        warn!(ctx, "ecsmesh: PENDING insert failed, connect denied");
        return false;
    }
    sa.user_port = u32::from(task.proxy_port.to_be());
    if !v6 {
        sa.user_ip4 = task.proxy_v4;
    } else if dst.family == AF_INET {
        // A dual-stack socket asked for ::ffff:a.b.c.d; keep it v4-mapped.
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = addr::V4_MAPPED_WORD;
        sa.user_ip6[3] = task.proxy_v4;
    } else {
        sa.user_ip6[0] = task.proxy_v6[0];
        sa.user_ip6[1] = task.proxy_v6[1];
        sa.user_ip6[2] = task.proxy_v6[2];
        sa.user_ip6[3] = task.proxy_v6[3];
    }
    bump(stats::REDIRECTED);
    true
}

/// The task that owns the calling process: its own cgroup is enrolled, or one of its
/// ancestors is (a process that moved into a child cgroup of its container is still that
/// container's).
#[inline(always)]
fn enrolled_task(cgroup: u64) -> Option<TaskEntry> {
    if let Some(task) = unsafe { ENROLLED.get(cgroup) } {
        return Some(*task);
    }
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        // 0: past the caller's own depth; the caller itself was checked above.
        if id == 0 || id == cgroup {
            return None;
        }
        if let Some(task) = unsafe { ENROLLED.get(id) } {
            return Some(*task);
        }
        level += 1;
    }
    None
}

/// The client's local address: what the proxy sees as the peer of the accepted socket.
fn local_key(ctx: &SockOpsContext) -> SockKey {
    let port = ctx.local_port() as u16;
    if ctx.family() == u32::from(AF_INET6) {
        addr::normalise(ctx.local_ip6(), port)
    } else {
        SockKey {
            addr: [ctx.local_ip4(), 0, 0, 0],
            port,
            family: AF_INET,
        }
    }
}

fn try_sockops(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if PENDING.get_ptr(cookie).is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let Some(orig) = PENDING.get_ptr(cookie) else {
                return;
            };
            // SAFETY: pointer from a successful lookup, read once.
            let orig = unsafe { *orig };
            if ORIG_DST.insert(local_key(ctx), orig, 0).is_err() {
                bump(stats::PUBLISH_FAILED);
            }
            let _ = PENDING.remove(cookie);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = PENDING.remove(cookie);
            let key = local_key(ctx);
            let Some(orig) = ORIG_DST.get_ptr_mut(key) else {
                return;
            };
            // SAFETY: pointer from a successful lookup; only this socket's entry is touched.
            if unsafe { (*orig).cookie } != cookie {
                return;
            }
            let old = ctx.arg(0);
            if old == BPF_TCP_FIN_WAIT1 || old == BPF_TCP_FIN_WAIT2 || old == BPF_TCP_CLOSING {
                // The client sent everything and closed: its bytes may still wait in the
                // proxy's accept queue, so the proxy must still be able to find where they go.
                unsafe { (*orig).closed_ns = bpf_ktime_get_ns() };
            } else {
                // Reset, refused, or closed after the proxy hung up: nothing left to route.
                let _ = ORIG_DST.remove(key);
            }
        }
        _ => {}
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
