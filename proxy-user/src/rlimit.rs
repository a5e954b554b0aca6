//! The proxy holds two sockets per proxied connection (three with a sidecar's tunnel),
//! so the usual soft `RLIMIT_NOFILE` of 1024 caps it at a few hundred connections. At
//! start the soft limit is raised to the hard limit (capped by `fs.nr_open`, which
//! bounds what the kernel accepts when the hard limit is unlimited).
use nix::sys::resource::{Resource, getrlimit, setrlimit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// The soft limit to ask for, given the current limits and `fs.nr_open`.
fn target(soft: u64, hard: u64, nr_open: Option<u64>) -> u64 {
    let ceiling = match nr_open {
        Some(n) => hard.min(n),
        None => hard,
    };
    soft.max(ceiling)
}

/// Raise the soft open-files limit to the hard one.
pub fn raise_nofile() -> nix::Result<NoFile> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let want = target(soft, hard, nr_open);
    if want != soft {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    let (after, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(NoFile {
        before: soft,
        after,
        hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_goes_to_hard_within_nr_open() {
        assert_eq!(target(1024, 20_000, Some(1 << 20)), 20_000);
        assert_eq!(target(1024, u64::MAX, Some(1 << 20)), 1 << 20);
        assert_eq!(target(1024, 4096, None), 4096);
        assert_eq!(target(4096, 4096, Some(1 << 20)), 4096, "already there");
    }

    #[test]
    fn raising_is_idempotent() {
        let first = raise_nofile().unwrap();
        assert!(first.after >= first.before && first.after <= first.hard);
        let second = raise_nofile().unwrap();
        assert_eq!(second.before, second.after, "nothing left to raise");
    }
}
