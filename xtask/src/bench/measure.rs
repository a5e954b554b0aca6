//! What the benchmark reads from the kernel: CPU time of the mesh processes (cgroup
//! `cpu.stat`, µs), their memory (`/proc/<pid>/status` VmRSS/VmHWM, `smaps_rollup` Pss),
//! and the CPU other processes on the machine used during a cell (per-process
//! `/proc/<pid>/stat` deltas).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Instant,
};

/// `usage_usec` of a cgroup v2 directory (present without the cpu controller enabled).
pub fn cgroup_cpu_usec(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("cpu.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn cgroups_cpu_usec(dirs: &[PathBuf]) -> u64 {
    dirs.iter().map(|d| cgroup_cpu_usec(d)).sum()
}

fn status_kib(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    /// Sum of VmRSS.
    pub rss_bytes: u64,
    /// Sum of VmHWM (peak RSS since the last reset).
    pub peak_rss_bytes: u64,
    /// Sum of Pss from smaps_rollup.
    pub pss_bytes: u64,
}

pub fn memory(pids: &[i32]) -> Memory {
    let mut m = Memory::default();
    for &pid in pids {
        m.rss_bytes += status_kib(pid, "VmRSS:") * 1024;
        m.peak_rss_bytes += status_kib(pid, "VmHWM:") * 1024;
        m.pss_bytes += std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("Pss:")?
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            })
            .unwrap_or(0)
            * 1024;
    }
    m
}

/// Reset VmHWM to the current RSS (`clear_refs` 5), so a cell's peak is its own.
pub fn reset_peak(pids: &[i32]) {
    for pid in pids {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

/// utime+stime (clock ticks) of every user-space process that is not part of the
/// benchmark (not in the world's cgroup tree, not this process).
pub struct Neighbours {
    ticks: HashMap<i32, u64>,
    at: Instant,
    marker: String,
}

fn proc_ticks(pid: i32) -> Option<(u64, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid = field 4, utime = 14, stime = 15.
    let ppid: i32 = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime, ppid))
}

fn others(marker: &str) -> HashMap<i32, u64> {
    let me = std::process::id() as i32;
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || pid == 2 {
            continue;
        }
        let Some((ticks, ppid)) = proc_ticks(pid) else {
            continue;
        };
        if ppid == 2 {
            continue; // kernel threads
        }
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cg.contains(marker) {
            continue;
        }
        out.insert(pid, ticks);
    }
    out
}

impl Neighbours {
    /// `marker`: a path fragment of the world's cgroup tree (`ecsmesh-test/<id>`).
    pub fn start(marker: &str) -> Self {
        Self {
            ticks: others(marker),
            at: Instant::now(),
            marker: marker.to_owned(),
        }
    }

    /// Cores the neighbours used since `start`, and the busiest of them.
    pub fn cores(&self) -> (f64, Option<String>) {
        let now = others(&self.marker);
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let mut total = 0u64;
        let mut top: Option<(u64, i32)> = None;
        for (pid, t) in &now {
            let d = t.saturating_sub(*self.ticks.get(pid).unwrap_or(&0));
            total += d;
            if top.is_none_or(|(best, _)| d > best) {
                top = Some((d, *pid));
            }
        }
        let name = top.filter(|(d, _)| *d > 0).map(|(d, pid)| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!(
                "{} (pid {pid}, {:.2} cores)",
                comm.trim(),
                d as f64 / hz / secs
            )
        });
        (total as f64 / hz / secs, name)
    }
}
