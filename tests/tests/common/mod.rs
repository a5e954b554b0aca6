//! Shared by the privileged integration tests. They need root (CI runs as root) and fail,
//! never skip, when it is missing or the kernel refuses.
#![allow(dead_code)]
pub mod mesh;
use std::net::SocketAddr;

use harness::{Tools, world::ConnReport};

pub fn tools() -> Tools {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the eBPF/namespace tests need root; run them as CI does (`cargo xtask test` as root)"
    );
    Tools::from_env(env!("CARGO_BIN_EXE_meshtool"))
}

#[track_caller]
pub fn assert_all_ok(reports: &[ConnReport]) {
    let bad: Vec<_> = reports.iter().filter(|r| !r.ok).collect();
    assert!(
        bad.is_empty(),
        "{} of {} connections failed: {bad:?}",
        bad.len(),
        reports.len()
    );
}

/// Every connection went through `via` and was answered by the server it asked for.
#[track_caller]
pub fn assert_redirected(reports: &[ConnReport], via: SocketAddr) {
    assert_all_ok(reports);
    for r in reports {
        assert_eq!(
            r.peer,
            Some(via),
            "client socket's peer should be the proxy: {r:?}"
        );
        assert_eq!(
            r.served_by.as_deref(),
            Some(r.target.to_string().as_str()),
            "{r:?}"
        );
    }
}

/// Every connection went straight to its target.
#[track_caller]
pub fn assert_direct(reports: &[ConnReport]) {
    assert_all_ok(reports);
    for r in reports {
        assert_eq!(
            r.peer,
            Some(r.target),
            "expected a direct connection: {r:?}"
        );
    }
}
