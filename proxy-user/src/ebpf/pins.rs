//! The per-instance pin directory: layout, creation and complete removal.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::links::FdLink;

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pinning: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("mounting bpffs at {BPFFS}: {0}")]
    Mount(nix::Error),
    #[error("{path}: not removed, it holds files ecsmesh did not create: {names:?}")]
    Foreign { path: PathBuf, names: Vec<String> },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.into(),
        source,
    }
}

pub fn link_path(dir: &Path, prog: &str) -> PathBuf {
    dir.join(format!("link_{prog}"))
}
pub fn prog_path(dir: &Path, prog: &str) -> PathBuf {
    dir.join(format!("prog_{prog}"))
}
pub fn map_path(dir: &Path, map: &str) -> PathBuf {
    dir.join(format!("map_{map}"))
}

/// Mount bpffs at /sys/fs/bpf when nothing (or not bpffs) is mounted there.
pub fn ensure_bpffs() -> Result<(), PinError> {
    let is_bpffs = nix::sys::statfs::statfs(BPFFS)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if is_bpffs {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(io_err(Path::new(BPFFS)))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(PinError::Mount)?;
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

/// Whether a proxy of this instance (running, stopped or crashed) left its programs
/// attached: a takeover, not a first install.
pub fn attached(dir: &Path) -> bool {
    proxy_common::progs::ALL
        .iter()
        .any(|p| link_path(dir, p).exists())
}

/// Removes a pin if present (the object lives on while something else holds it).
pub fn unpin(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

pub fn create_dir(dir: &Path) -> Result<(), PinError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))
}

/// Pin a link and close our own reference: from now on the pin alone keeps it attached.
pub fn pin_link(dir: &Path, prog: &str, link: FdLink) -> Result<(), PinError> {
    drop(link.pin(link_path(dir, prog))?);
    Ok(())
}

/// Remove every pin of one instance: links first (the pin is a link's only reference, the
/// proxy closes its own fd right after pinning, so removing the pin detaches it), then
/// programs and maps, then the directory. A missing directory
/// is not an error: uninstall is idempotent.
pub fn uninstall(dir: &Path) -> Result<(), PinError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let ours = |n: &str| {
        proxy_common::progs::ALL
            .iter()
            .any(|p| n == format!("link_{p}") || n == format!("prog_{p}"))
            || proxy_common::maps::ALL
                .iter()
                .any(|m| n == format!("map_{m}"))
    };
    let (ours_names, foreign): (Vec<_>, Vec<_>) = names.into_iter().partition(|n| ours(n));
    // Links first, so no program is left attached while its maps disappear.
    for name in ours_names.iter().filter(|n| n.starts_with("link_")) {
        let path = dir.join(name);
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    for name in ours_names.iter().filter(|n| !n.starts_with("link_")) {
        let path = dir.join(name);
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    if !foreign.is_empty() {
        return Err(PinError::Foreign {
            path: dir.into(),
            names: foreign,
        });
    }
    std::fs::remove_dir(dir).map_err(io_err(dir))
}
