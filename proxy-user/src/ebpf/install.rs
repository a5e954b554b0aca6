//! Installing one instance's programs, in two visible steps — [`Redirect::prepare`] (load,
//! configure, enrol) and [`Prepared::attach`] — and taking over from a previous proxy of
//! the same instance without a gap.
//!
//! A takeover (the pins of a stopped or crashed proxy are there) never detaches first:
//! - The per-connection maps and the enrolment (`CARRIED`) are opened from their pins and
//!   shared with the programs still attached, so a connection that the old programs
//!   redirected is found by the new proxy, and every task stays enrolled throughout.
//! - The new programs are attached beside the old ones; only then is each old link's pin
//!   removed (which detaches it) and the new link pinned in its place. While both run,
//!   the first one rewrites the destination to the proxy and the second leaves that
//!   alone (a connect to the proxy's own listener), so nothing is redirected twice.
//! - Enrolment entries no task of the new proxy claims (its static tasks, and the ECS tasks
//!   it restored from its state file) are pruned just before attaching.
//!
//! A carried map whose layout no longer matches the object (an upgrade that changed it) is
//! not carried: the new proxy gets a fresh one, and connections redirected by the old
//! programs in the moment before the swap are refused (fail-closed), never let out.
use std::{path::PathBuf, sync::Arc};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapInfo, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
};
use proxy_common::{
    MAX_CONNECTIONS, MAX_TASK_CGROUPS, OrigDst as KernelOrigDst, SockKey, TaskEntry, maps, progs,
    stats,
};

use super::{
    EbpfError, Enroller, KernelStats, OBJECT, OrigDstMap, Redirect, map_err, pins, prog_err,
    program, spawn_logger, write_excludes, write_resolvers, write_settings,
};
use crate::{
    cgroup,
    config::{Config, TaskConfig},
};

/// Maps that outlive one proxy process: (name, key size, value size, max entries).
const CARRIED: [(&str, usize, usize, u32); 4] = [
    (
        maps::ENROLLED,
        size_of::<u64>(),
        size_of::<TaskEntry>(),
        MAX_TASK_CGROUPS,
    ),
    (
        maps::PENDING,
        size_of::<u64>(),
        size_of::<KernelOrigDst>(),
        MAX_CONNECTIONS,
    ),
    (
        maps::ORIG_DST,
        size_of::<SockKey>(),
        size_of::<KernelOrigDst>(),
        MAX_CONNECTIONS,
    ),
    (
        maps::STATS,
        size_of::<u32>(),
        size_of::<u64>(),
        stats::COUNT,
    ),
];

/// Maps each proxy fills afresh from its config; the old programs keep their own copies
/// until they are detached.
const FRESH: [&str; 3] = [maps::SETTINGS, maps::EXCLUDED, maps::RESOLVERS];

/// Loaded and configured, static tasks enrolled, nothing attached yet.
pub struct Prepared {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    takeover: bool,
    enroller: Arc<Enroller>,
    proxy_cgroup_id: u64,
}

impl Redirect {
    /// Step 1: load the object (carrying the previous proxy's maps over), configure it,
    /// enrol the static tasks. Nothing of a previous proxy is touched yet, so a failure
    /// here leaves it exactly as it was.
    pub fn prepare(config: &Config, initial: &[(u32, &TaskConfig)]) -> Result<Prepared, EbpfError> {
        pins::ensure_bpffs()?;
        let dir = &config.pin_dir;
        let takeover = pins::attached(dir);
        pins::create_dir(dir)?;
        if takeover {
            tracing::info!(pin_dir = %dir.display(), "a previous proxy's programs are attached: taking over without detaching them first");
        }
        let mut loader = EbpfLoader::new();
        for (name, key, value, max) in CARRIED {
            let path = pins::map_path(dir, name);
            if path.exists() && !fits(&path, key, value, max) {
                tracing::warn!(
                    map = name,
                    "the pinned map's layout differs from this version's: starting it afresh"
                );
                pins::unpin(&path)?;
            }
            loader.map_pin_path(name, path);
        }
        let mut ebpf = loader.load(OBJECT)?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf).map(spawn_logger) {
            tracing::debug!(error = %e, "eBPF logger not started");
        }
        let proxy_cgroup = cgroup::own_cgroup()?;
        let proxy_cgroup_id = cgroup::cgroup_id(&proxy_cgroup)?;
        let strict = config.mode == crate::config::Mode::Strict;
        write_settings(&mut ebpf, proxy_cgroup_id, strict)?;
        write_excludes(&mut ebpf, &config.exclude_cidrs)?;
        write_resolvers(&mut ebpf, &config.dns_resolvers)?;
        let enrolled = ebpf
            .take_map(maps::ENROLLED)
            .ok_or(EbpfError::MissingMap(maps::ENROLLED))?;
        let enroller = Arc::new(Enroller {
            map: std::sync::Mutex::new(
                HashMap::try_from(enrolled).map_err(map_err(maps::ENROLLED))?,
            ),
            written: Default::default(),
            outbound_port: config.outbound_port,
            bridge_ipv4: config.bridge_ipv4,
            bridge_ipv6: config.bridge_ipv6,
            proxy_cgroup,
        });
        // Tasks known up front are enrolled before anything is attached, so none of their
        // connections slips past the proxy at start.
        for (index, task) in initial {
            enroller.enrol(*index, task.network_mode, &task.cgroups)?;
            tracing::info!(task = %task.id, family = %task.family, "task enrolled");
        }
        Ok(Prepared {
            ebpf,
            pin_dir: dir.clone(),
            cgroup_root: config.cgroup_root.clone(),
            takeover,
            enroller,
            proxy_cgroup_id,
        })
    }
}

/// Whether the pinned map at `path` has the layout this version's programs expect.
fn fits(path: &std::path::Path, key: usize, value: usize, max: u32) -> bool {
    MapInfo::from_pin(path).is_ok_and(|info| {
        info.key_size() as usize == key
            && info.value_size() as usize == value
            && info.max_entries() == max
    })
}

impl Prepared {
    /// Writes `ENROLLED` for tasks enrolled between the two steps (the ECS tasks restored
    /// from the state file) and afterwards.
    pub fn enroller(&self) -> Arc<Enroller> {
        self.enroller.clone()
    }

    /// Whether a previous proxy's programs were attached when this one started.
    pub fn takeover(&self) -> bool {
        self.takeover
    }

    /// Step 2: attach, then (on a takeover) detach the previous proxy's programs, and pin
    /// everything under the instance's pin directory.
    pub fn attach(self) -> Result<(Redirect, OrigDstMap), EbpfError> {
        let Prepared {
            mut ebpf,
            pin_dir,
            cgroup_root,
            takeover,
            enroller,
            proxy_cgroup_id,
        } = self;
        if takeover {
            let pruned = enroller.prune();
            if pruned > 0 {
                tracing::info!(
                    pruned,
                    "enrolment entries of the previous proxy that no task claims removed"
                );
            }
        }
        for name in FRESH {
            let path = pins::map_path(&pin_dir, name);
            pins::unpin(&path)?;
            let map = ebpf.map(name).ok_or(EbpfError::MissingMap(name))?;
            map.pin(&path).map_err(pins::PinError::from)?;
        }
        let cgroup_dir =
            std::fs::File::open(&cgroup_root).map_err(|source| cgroup::CgroupError::Io {
                path: cgroup_root.clone(),
                source,
            })?;
        // bpf_link attachments (what aya uses on kernels >= 5.7) always join the cgroup's
        // multi-program list — the kernel passes BPF_F_ALLOW_MULTI itself — and reject the
        // flag from userspace with EINVAL, so `Single` here still coexists with programs
        // attached above or below (a sidecar's per-task attachment, or the programs of the
        // proxy this one takes over from).
        const MODE: CgroupAttachMode = CgroupAttachMode::Single;
        let mut links: Vec<(&str, FdLink)> = Vec::new();
        let link = |what: &str, e| EbpfError::Link {
            what: what.to_owned(),
            source: e,
        };
        for name in [progs::CONNECT4, progs::CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(format!("loading {name}")))?;
            let id = prog
                .attach(&cgroup_dir, MODE)
                .map_err(prog_err(format!("attaching {name}")))?;
            let taken = prog.take_link(id).map_err(prog_err(name))?;
            links.push((name, taken.try_into().map_err(|e| link(name, e))?));
        }
        let prog: &mut SockOps = program(&mut ebpf, progs::SOCKOPS)?;
        prog.load().map_err(prog_err("loading sockops"))?;
        let id = prog
            .attach(&cgroup_dir, MODE)
            .map_err(prog_err("attaching sockops"))?;
        let taken = prog.take_link(id).map_err(prog_err("sockops"))?;
        links.push((
            progs::SOCKOPS,
            taken.try_into().map_err(|e| link(progs::SOCKOPS, e))?,
        ));
        // Ours are attached: now the previous proxy's links may go (removing the pin, their
        // only reference, detaches them), and ours take their place.
        for (name, link) in links {
            pins::unpin(&pins::link_path(&pin_dir, name))?;
            pins::pin_link(&pin_dir, name, link)?;
        }
        for name in progs::ALL {
            let path = pins::prog_path(&pin_dir, name);
            pins::unpin(&path)?;
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| prog_err(name)(aya::programs::ProgramError::NotLoaded))?;
            prog.pin(&path).map_err(pins::PinError::from)?;
        }

        let orig = ebpf
            .take_map(maps::ORIG_DST)
            .ok_or(EbpfError::MissingMap(maps::ORIG_DST))?;
        let walker = aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(pins::map_path(&pin_dir, maps::ORIG_DST))
                .map_err(map_err(maps::ORIG_DST))?,
        );
        let orig = OrigDstMap {
            map: std::sync::Mutex::new(HashMap::try_from(orig).map_err(map_err(maps::ORIG_DST))?),
            walker: HashMap::try_from(walker).map_err(map_err(maps::ORIG_DST))?,
        };
        let stats_map = ebpf
            .take_map(maps::STATS)
            .ok_or(EbpfError::MissingMap(maps::STATS))?;
        let stats = Arc::new(KernelStats(
            PerCpuArray::try_from(stats_map).map_err(map_err(maps::STATS))?,
        ));
        tracing::info!(
            cgroup_root = %cgroup_root.display(),
            pin_dir = %pin_dir.display(),
            proxy_cgroup_id,
            takeover,
            "eBPF redirect attached"
        );
        Ok((
            Redirect {
                ebpf,
                pin_dir,
                stats,
            },
            orig,
        ))
    }
}
