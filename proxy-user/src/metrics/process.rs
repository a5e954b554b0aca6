//! The standard process metrics (`process_resident_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_cpu_seconds_total`, `process_start_time_seconds`), read
//! from `/proc/self` at each scrape, under the names every Prometheus client library
//! uses, so the usual dashboards show the proxy's CPU and memory.
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What one read of `/proc/self` gives.
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100) as f64
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .filter(|p| *p > 0)
        .unwrap_or(4096) as u64
}

/// Parses `/proc/<pid>/stat` (fields after the command name, which may hold spaces and
/// parentheses) and `/proc/stat`'s `btime`.
pub fn parse_stat(stat: &str, btime: u64, ticks: f64, page: u64) -> Option<(u64, f64, f64)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15, starttime 22, rss 24.
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let cpu = (field(14)? + field(15)?) as f64 / ticks;
    let start = btime as f64 + field(22)? as f64 / ticks;
    let rss = field(24)? * page;
    Some((rss, cpu, start))
}

impl Sample {
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        let (rss_bytes, cpu_seconds, start_time_seconds) =
            parse_stat(&stat, btime, clock_ticks(), page_size())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(0);
        Some(Self {
            rss_bytes,
            cpu_seconds,
            start_time_seconds,
            open_fds,
            max_fds,
        })
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = Sample::read() else {
            return Ok(());
        };
        let gauges: [(&str, &str, f64); 4] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.rss_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        ConstCounter::new(s.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid ... as the kernel writes it; comm "tokio (rt) w".
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[0] = "S".into(); // 3: state
        fields[14 - 3] = "250".into(); // utime
        fields[15 - 3] = "150".into(); // stime
        fields[22 - 3] = "1000".into(); // starttime
        fields[24 - 3] = "300".into(); // rss pages
        let stat = format!("42 (tokio (rt) w) {}", fields.join(" "));
        let (rss, cpu, start) = parse_stat(&stat, 1_700_000_000, 100.0, 4096).unwrap();
        assert_eq!(rss, 300 * 4096);
        assert_eq!(cpu, 4.0);
        assert_eq!(start, 1_700_000_010.0);
    }

    #[test]
    fn this_process_reads() {
        let s = Sample::read().expect("/proc/self");
        assert!(s.rss_bytes > 1 << 20, "{s:?}");
        assert!(s.open_fds >= 3 && s.max_fds >= s.open_fds, "{s:?}");
        assert!(s.start_time_seconds > 1.6e9, "{s:?}");
    }
}
