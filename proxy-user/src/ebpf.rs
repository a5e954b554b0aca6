//! Loads, configures, attaches and pins the kernel programs of one node-proxy instance.
//!
//! Everything lives under the instance's pin directory, so several instances on one kernel
//! (the test harness, or a blue/green restart) never share or remove each other's state.
//! Links are pinned too: after SIGTERM or `kill -9` the redirect stays attached and points
//! at a dead listener, so enrolled tasks' connections fail (fail-closed) until the next
//! proxy takes over (see `install`) or `ecsmesh uninstall` runs; nothing else detaches.
mod install;
mod pins;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
};
use ipnet::IpNet;
use proxy_common::{
    OrigDst as KernelOrigDst, SETTINGS_STRICT, Settings, SockKey, TASK_HOST_NETWORK, TaskEntry,
    maps, stats,
};

pub use install::Prepared;
pub use pins::{PinError, attached, uninstall};

use crate::{
    cgroup,
    config::NetworkMode,
    types::{self, OrigDst},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("ECSMESH_EBPF_OBJECT"));

/// Always excluded, whatever the config says: loopback, the ECS agent's credential and
/// metadata endpoints, and the EC2 instance metadata service.
pub const BUILTIN_EXCLUDES: [&str; 4] = [
    "127.0.0.0/8",
    "::1/128",
    "169.254.170.2/32",
    "169.254.169.254/32",
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{what}: {source}")]
    Program {
        what: String,
        source: aya::programs::ProgramError,
    },
    #[error("{what}: link: {source}")]
    Link {
        what: String,
        source: aya::programs::links::LinkError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(
        "refusing to enrol {cgroup}: it is the proxy's own cgroup {proxy}; the kernel exempts the proxy by its cgroup, so the task's processes there would be exempt too"
    )]
    ProxyOwnCgroup { cgroup: PathBuf, proxy: PathBuf },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Program { what, source }
}

/// Where the proxy recovers the original destination of an accepted connection.
/// A trait so that the proxy can be tested on loopback without root.
pub trait OrigDstSource: Send + Sync + 'static {
    /// `peer` is the accepted socket's peer address. Returns the original destination and
    /// the index of the task that made the connection, and forgets it: each entry is
    /// claimed exactly once.
    fn claim(&self, peer: SocketAddr) -> Option<(OrigDst, u32)>;
}

/// The proxy's handle on the `ORIG_DST` map. Lookups and deletes are single syscalls; the
/// mutex only exists because aya's `remove` takes `&mut self`, and is never held across
/// more than one lookup and one delete: the sweep walks the map through a second handle
/// without it, so a claim on the hot path never waits for a walk of 64k entries.
pub struct OrigDstMap {
    map: Mutex<HashMap<MapData, SockKey, KernelOrigDst>>,
    walker: HashMap<MapData, SockKey, KernelOrigDst>,
}

impl OrigDstSource for OrigDstMap {
    fn claim(&self, peer: SocketAddr) -> Option<(OrigDst, u32)> {
        let key = types::sock_key(peer);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        let addr = types::socket_addr(v.addr, v.port, v.family)?;
        Some((OrigDst(addr), v.task_index))
    }
}

impl OrigDstMap {
    /// Delete entries whose client closed more than `grace` ago without the proxy ever
    /// accepting the connection (it was reset or the accept queue overflowed).
    pub fn sweep(&self, grace: Duration) -> usize {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| Duration::from(t).as_nanos() as u64)
            .unwrap_or(0);
        let grace = grace.as_nanos() as u64;
        let stale: Vec<(SockKey, u64)> = self
            .walker
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.closed_ns != 0 && now.saturating_sub(v.closed_ns) > grace)
            .map(|(k, v)| (k, v.cookie))
            .collect();
        let mut swept = 0;
        for (key, cookie) in &stale {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            // Still the same stale entry (not claimed, not replaced by a new connection
            // from the same local address meanwhile)?
            if map
                .get(key, 0)
                .is_ok_and(|v| v.cookie == *cookie && v.closed_ns != 0)
            {
                let _ = map.remove(key);
                swept += 1;
            }
        }
        swept
    }
}

/// The installed programs of one instance. Dropping it without `uninstall` leaves the pins.
pub struct Redirect {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    stats: Arc<KernelStats>,
}

impl Redirect {
    /// Kernel-side counters (see `proxy_common::stats`), summed over CPUs.
    pub fn kernel_stats(&self) -> Vec<(&'static str, u64)> {
        self.stats.read()
    }

    /// A shared handle on the kernel counters, for the metrics scrape.
    pub fn stats_handle(&self) -> Arc<KernelStats> {
        self.stats.clone()
    }

    /// Close this process's handles and leave everything pinned: the programs stay
    /// attached and keep redirecting enrolled tasks to this instance's listener, so
    /// until the next proxy takes over their connections are refused (fail-closed).
    pub fn release(self) {
        drop(self);
    }

    /// Detach every program and remove every pin of this instance.
    pub fn uninstall(self) -> Result<(), PinError> {
        let Self {
            ebpf,
            pin_dir,
            stats,
        } = self;
        let result = pins::uninstall(&pin_dir);
        // Closing our program and map fds unloads them now that no pin holds them.
        drop((ebpf, stats));
        result
    }
}

/// The kernel programs' counters, read at each scrape.
pub struct KernelStats(PerCpuArray<MapData, u64>);

impl std::fmt::Debug for KernelStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.read()).finish()
    }
}

impl KernelStats {
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        (0..stats::COUNT)
            .map(|i| {
                let sum = self.0.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
                (stats::NAMES[i as usize], sum)
            })
            .collect()
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| prog_err(name)(aya::programs::ProgramError::NotLoaded))?
        .try_into()
        .map_err(prog_err(name))
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the AsyncFd owns the logger and with it the ring buffer fd it registers.
    let Ok(mut fd) = (unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) })
    else {
        return;
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

fn write_settings(ebpf: &mut Ebpf, proxy_cgroup_id: u64, strict: bool) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(maps::SETTINGS)
        .ok_or(EbpfError::MissingMap(maps::SETTINGS))?;
    let mut settings: Array<_, Settings> = Array::try_from(map).map_err(map_err(maps::SETTINGS))?;
    let value = Settings {
        proxy_cgroup_id,
        flags: if strict { SETTINGS_STRICT } else { 0 },
        _pad: 0,
    };
    settings.set(0, value, 0).map_err(map_err(maps::SETTINGS))
}

/// LPM key: IPv4 networks are stored as `::ffff:a.b.c.d/(96+len)`, the form the eBPF
/// side looks up.
pub fn lpm_key(net: &IpNet) -> Key<[u8; 16]> {
    match net {
        IpNet::V4(v4) => Key::new(
            96 + u32::from(v4.prefix_len()),
            v4.network().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(v6) => Key::new(u32::from(v6.prefix_len()), v6.network().octets()),
    }
}

fn write_excludes(ebpf: &mut Ebpf, extra: &[IpNet]) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(maps::EXCLUDED)
        .ok_or(EbpfError::MissingMap(maps::EXCLUDED))?;
    let mut trie: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(map).map_err(map_err(maps::EXCLUDED))?;
    let builtin = BUILTIN_EXCLUDES
        .iter()
        .map(|s| s.parse::<IpNet>().expect("valid builtin"));
    for net in builtin.chain(extra.iter().copied()) {
        trie.insert(&lpm_key(&net), 1, 0)
            .map_err(map_err(maps::EXCLUDED))?;
    }
    Ok(())
}

fn write_resolvers(ebpf: &mut Ebpf, resolvers: &[std::net::IpAddr]) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(maps::RESOLVERS)
        .ok_or(EbpfError::MissingMap(maps::RESOLVERS))?;
    let mut trie: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(map).map_err(map_err(maps::RESOLVERS))?;
    for addr in resolvers {
        trie.insert(&lpm_key(&IpNet::from(*addr)), 1, 0)
            .map_err(map_err(maps::RESOLVERS))?;
    }
    Ok(())
}

/// Writes the `ENROLLED` map: which cgroups belong to which task, and where that task
/// reaches the proxy. Shared by the static config and ECS discovery.
pub struct Enroller {
    map: Mutex<HashMap<MapData, u64, TaskEntry>>,
    /// Cgroup ids this process enrolled; at a takeover, every other entry of the carried
    /// map belongs to a task of the previous proxy that nobody claimed, and is pruned.
    written: Mutex<std::collections::HashSet<u64>>,
    outbound_port: u16,
    bridge_ipv4: Option<Ipv4Addr>,
    bridge_ipv6: Option<Ipv6Addr>,
    /// Never itself enrolled: the programs exempt the proxy by its exact cgroup (checked
    /// before any enrolled ancestor), so a task sharing it would be exempt too. Below an
    /// enrolled cgroup is fine: a sidecar's container cgroup sits below its task's.
    proxy_cgroup: PathBuf,
}

impl Enroller {
    /// Enrol every container cgroup of one task; returns their cgroup ids.
    pub fn enrol(
        &self,
        task_index: u32,
        mode: NetworkMode,
        cgroups: &[PathBuf],
    ) -> Result<Vec<u64>, EbpfError> {
        let (v4, v6) = match mode {
            NetworkMode::Host => (Some(Ipv4Addr::LOCALHOST), Some(Ipv6Addr::LOCALHOST)),
            NetworkMode::Bridge => (self.bridge_ipv4, self.bridge_ipv6),
        };
        if let Some(dir) = cgroups.iter().find(|d| **d == self.proxy_cgroup) {
            return Err(EbpfError::ProxyOwnCgroup {
                cgroup: dir.clone(),
                proxy: self.proxy_cgroup.clone(),
            });
        }
        let entry = TaskEntry {
            task_index,
            proxy_port: self.outbound_port,
            flags: if mode == NetworkMode::Host {
                TASK_HOST_NETWORK
            } else {
                0
            },
            proxy_v4: v4.map_or(0, types::ipv4_word),
            proxy_v6: v6.map_or([0; 4], types::ipv6_words),
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids = Vec::with_capacity(cgroups.len());
        for dir in cgroups {
            let id = cgroup::cgroup_id(dir)?;
            map.insert(id, entry, 0).map_err(map_err(maps::ENROLLED))?;
            self.written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
            tracing::debug!(cgroup = %dir.display(), cgroup_id = id, task_index, "cgroup enrolled");
            ids.push(id);
        }
        Ok(ids)
    }

    /// Stop redirecting these cgroups (the task stopped).
    pub fn unenrol(&self, cgroup_ids: &[u64]) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        for id in cgroup_ids {
            let _ = map.remove(id);
            written.remove(id);
        }
    }

    /// Removes every entry this process did not write; returns how many went.
    pub fn prune(&self) -> usize {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<u64> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !written.contains(id))
            .collect();
        for id in &stale {
            let _ = map.remove(id);
        }
        stale.len()
    }

    /// Number of enrolled cgroups (tests, metrics).
    pub fn len(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
