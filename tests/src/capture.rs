//! Packet capture on one interface inside a network namespace, with an `AF_PACKET` raw
//! socket (no tcpdump needed): tests look for a marker in the raw frames to tell plaintext
//! from encrypted traffic. Needs root.
use std::{
    fs::File,
    io::Read,
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

use crate::netns::Netns;

/// Bytes kept at most; later frames are dropped.
pub const MAX_BYTES: usize = 64 * 1024 * 1024;
/// The capture thread stops on its own after this.
pub const MAX_DURATION: Duration = Duration::from_secs(120);
const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// Big enough for a GSO/GRO super-packet on loopback or veth.
const FRAME_BUF: usize = 256 * 1024;

/// A running capture; stopped by `stop` or on drop.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u8>>>,
    what: String,
}

impl Capture {
    /// Start capturing every frame (both directions) on `ifname` in `netns`. Returns once
    /// the socket is bound, so traffic sent afterwards is captured.
    pub fn start(netns: &Netns, ifname: &str) -> Capture {
        let what = format!("{ifname} in netns {}", netns.name);
        let ns = File::open(netns.path())
            .unwrap_or_else(|e| panic!("capture {what}: open {}: {e}", netns.path().display()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let ifname = ifname.to_owned();
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // setns affects only this thread; the socket stays in the netns afterwards.
            let socket = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))
                .and_then(|()| open_bound(&ifname));
            match socket {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    read_frames(s, &stop_flag)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    Vec::new()
                }
            }
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                panic!("capture {what}: {e}");
            }
            Err(_) => panic!("capture {what}: capture thread died"),
        }
        Capture {
            stop,
            thread: Some(thread),
            what,
        }
    }

    /// Stop and return every captured frame, concatenated (link-layer headers included).
    pub fn stop(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("capture running");
        thread
            .join()
            .unwrap_or_else(|_| panic!("capture {}: thread panicked", self.what))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Does `needle` occur in `haystack`? (An empty needle always does.)
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// An AF_PACKET socket bound to `ifname` (in the calling thread's netns) for all protocols.
/// Created with protocol 0 so that it receives nothing before the bind: no frames from
/// other interfaces slip in.
fn open_bound(ifname: &str) -> Result<Socket, String> {
    let socket = Socket::new(Domain::PACKET, Type::RAW, None)
        .map_err(|e| format!("socket(AF_PACKET, SOCK_RAW): {e} (needs root / CAP_NET_RAW)"))?;
    let c_name = std::ffi::CString::new(ifname).map_err(|e| format!("{ifname:?}: {e}"))?;
    // SAFETY: a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if ifindex == 0 {
        return Err(format!(
            "interface {ifname:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a properly initialised sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "bind AF_PACKET to {ifname}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Bursts (a whole echo in one go) must not overflow the default receive buffer;
    // SO_RCVBUFFORCE ignores rmem_max (we are root), plain SO_RCVBUF is the fallback.
    let size: libc::c_int = 32 * 1024 * 1024;
    // SAFETY: valid fd, option value is a c_int of the size passed.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = socket.set_recv_buffer_size(size as usize);
    }
    socket
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    Ok(socket)
}

fn read_frames(mut socket: Socket, stop: &AtomicBool) -> Vec<u8> {
    let deadline = Instant::now() + MAX_DURATION;
    let mut out = Vec::new();
    let mut buf = vec![0u8; FRAME_BUF];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match socket.read(&mut buf) {
            Ok(n) => {
                if out.len() + n > MAX_BYTES {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    out
}
