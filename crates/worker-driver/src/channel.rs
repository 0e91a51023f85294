//! The private channel between Steward and a worker, shared by every
//! driver. By default a Unix domain socket in a directory only the
//! worker's uid (and Steward, as root) can enter; before the first byte
//! Steward checks who listens on it (`SO_PEERCRED`: the worker's uid, and
//! a pid of the worker's process group or cgroup). A worker that swaps its
//! socket for a link to another worker's, or anything else listening
//! there, is refused. The fallback is loopback TCP (`--worker-channel tcp`)
//! on a port leased to one live worker, with its own check: every socket
//! listening on the port (`/proc/net/tcp`, `tcp6`) must be the worker's
//! uid and open in one of the worker's processes (`socket:[inode]` among
//! `/proc/<pid>/fd/*`), so a process that bound the port first, or beside
//! it with `SO_REUSEPORT`, gets nothing.
//!
//! Must not know about: gRPC, HTTP/2 (the caller speaks over the stream).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::cgroup::WorkerCgroup;

/// How Steward reaches workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelKind {
    /// A Unix socket in the worker's private directory (the default).
    #[default]
    Unix,
    /// Loopback TCP on a leased port (the fallback).
    Tcp,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Unix => "unix",
            ChannelKind::Tcp => "tcp",
        }
    }
}

impl std::str::FromStr for ChannelKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "unix" => Ok(ChannelKind::Unix),
            "tcp" => Ok(ChannelKind::Tcp),
            _ => Err(format!("{s:?}: expected unix or tcp")),
        }
    }
}

/// Longest path of a Unix socket (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A checked connection to a worker.
#[derive(Debug)]
pub enum WorkerStream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl AsyncRead for WorkerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WorkerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            WorkerStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WorkerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WorkerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            WorkerStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WorkerStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WorkerStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WorkerStream::Unix(s) => s.is_write_vectored(),
            WorkerStream::Tcp(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WorkerStream::Unix(s) => Pin::new(s).poll_flush(cx),
            WorkerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WorkerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            WorkerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why no stream came back.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nobody listens yet (the worker is starting): try again.
    #[error("{0}")]
    NotYet(io::Error),
    /// Something listens that is not the worker: never try again.
    #[error("refused the worker's channel {address}: {reason}")]
    Refused { address: String, reason: PeerError },
}

/// Why what listens on a worker's channel is not taken for the worker.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no peer credentials: {0}")]
    NoCredentials(io::Error),
    #[error("the socket's listener runs as uid {uid}, the worker as uid {worker_uid}")]
    Uid { uid: u32, worker_uid: u32 },
    #[error(
        "the socket's listener is pid {pid}, which is not in worker {worker}'s process group or cgroup"
    )]
    Pid { pid: u32, worker: u32 },
    #[error("the kernel gave no pid for the socket's listener")]
    NoPid,
    #[error("nothing listens on port {0} any more")]
    NothingListens(u16),
    #[error(
        "a socket listening on port {port} belongs to uid {uid}, the worker runs as uid {worker_uid}"
    )]
    PortUid {
        port: u16,
        uid: u32,
        worker_uid: u32,
    },
    #[error(
        "a socket listening on port {port} (inode {inode}) is not open in any of the worker's processes"
    )]
    NotTheWorkers { port: u16, inode: u64 },
    #[error("the check did not finish: {0}")]
    Unfinished(tokio::task::JoinError),
}

/// Who must be listening: the worker's uid, its leader (whose process
/// group it leads) and its cgroup where it has one.
#[derive(Clone)]
pub struct Expected {
    pub uid: u32,
    pub pid: u32,
    pub cgroup: Option<Arc<WorkerCgroup>>,
}

impl Expected {
    /// Whether process `pid` is the worker's: its leader, in its process
    /// group, or in its cgroup.
    fn owns(&self, pid: u32) -> bool {
        if pid == self.pid {
            return true;
        }
        let Ok(raw) = i32::try_from(pid) else {
            return false;
        };
        if nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(raw)))
            .is_ok_and(|g| g.as_raw() as u32 == self.pid)
        {
            return true;
        }
        self.cgroup
            .as_ref()
            .is_some_and(|cg| cg.procs().contains(&raw))
    }

    /// Pids of the worker's processes: the leader and its cgroup's members.
    fn processes(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        if let Some(cg) = &self.cgroup {
            pids.extend(cg.procs().into_iter().filter_map(|p| u32::try_from(p).ok()));
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

/// Where a worker listens.
#[derive(Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { port: u16, _lease: PortLease },
}

impl Endpoint {
    /// A fresh TCP endpoint on a port no live worker holds.
    pub fn tcp() -> io::Result<Endpoint> {
        let lease = lease_port(free_port)?;
        Ok(Endpoint::Tcp {
            port: lease.0,
            _lease: lease,
        })
    }

    /// What the worker is told to listen on (`--address`): `unix:<path>`
    /// or `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp { port, .. } => format!("127.0.0.1:{port}"),
        }
    }

    /// Where to dial, owned, for a connect that outlives the borrow.
    pub fn target(&self) -> Target {
        match self {
            Endpoint::Unix(p) => Target::Unix(p.clone()),
            Endpoint::Tcp { port, .. } => Target::Tcp(*port),
        }
    }
}

/// Where to dial.
#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    Tcp(u16),
}

/// Connects to the worker at `target` and checks, before any byte is sent,
/// that it is `expected` listening there.
pub async fn connect(target: Target, expected: Expected) -> Result<WorkerStream, ConnectError> {
    match target {
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(ConnectError::NotYet)?;
            let refused = |reason| ConnectError::Refused {
                address: format!("unix:{}", path.display()),
                reason,
            };
            let cred = stream
                .peer_cred()
                .map_err(|e| refused(PeerError::NoCredentials(e)))?;
            let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
            check_unix_peer(cred.uid(), pid, &expected, |p| expected.owns(p)).map_err(refused)?;
            Ok(WorkerStream::Unix(stream))
        }
        Target::Tcp(port) => {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(ConnectError::NotYet)?;
            stream.set_nodelay(true).map_err(ConnectError::NotYet)?;
            let check = expected.clone();
            let verdict = tokio::task::spawn_blocking(move || tcp_peer_check(port, &check))
                .await
                .unwrap_or_else(|e| Err(PeerError::Unfinished(e)));
            verdict.map_err(|reason| ConnectError::Refused {
                address: format!("127.0.0.1:{port}"),
                reason,
            })?;
            Ok(WorkerStream::Tcp(stream))
        }
    }
}

/// The `SO_PEERCRED` rule: the listener is the worker's uid and one of its
/// processes.
fn check_unix_peer(
    uid: u32,
    pid: Option<u32>,
    expected: &Expected,
    owns: impl Fn(u32) -> bool,
) -> Result<(), PeerError> {
    if uid != expected.uid {
        return Err(PeerError::Uid {
            uid,
            worker_uid: expected.uid,
        });
    }
    match pid {
        Some(p) if owns(p) => Ok(()),
        Some(p) => Err(PeerError::Pid {
            pid: p,
            worker: expected.pid,
        }),
        None => Err(PeerError::NoPid),
    }
}

/// A listening TCP socket of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listener {
    port: u16,
    uid: u32,
    inode: u64,
}

/// The listening sockets of a `/proc/net/tcp` or `tcp6` table.
fn listeners(table: &str) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&LISTEN) {
                return None;
            }
            let (_, port) = f.get(1)?.rsplit_once(':')?;
            Some(Listener {
                port: u16::from_str_radix(port, 16).ok()?,
                uid: f.get(7)?.parse().ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The TCP rule: something listens on `port`, and every socket listening
/// on it is the worker's uid and open in one of the worker's processes.
fn check_tcp_listeners(
    port: u16,
    all: &[Listener],
    uid: u32,
    worker_sockets: &HashSet<u64>,
) -> Result<(), PeerError> {
    let on_port: Vec<&Listener> = all.iter().filter(|l| l.port == port).collect();
    if on_port.is_empty() {
        return Err(PeerError::NothingListens(port));
    }
    for l in on_port {
        if l.uid != uid {
            return Err(PeerError::PortUid {
                port,
                uid: l.uid,
                worker_uid: uid,
            });
        }
        if !worker_sockets.contains(&l.inode) {
            return Err(PeerError::NotTheWorkers {
                port,
                inode: l.inode,
            });
        }
    }
    Ok(())
}

/// Socket inodes open in process `pid` (`socket:[N]` links in its fd table).
fn sockets_of(pid: u32, into: &mut HashSet<u64>) {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return;
    };
    for fd in fds.filter_map(Result::ok) {
        if let Ok(target) = std::fs::read_link(fd.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
        {
            into.insert(inode);
        }
    }
}

fn tcp_peer_check(port: u16, expected: &Expected) -> Result<(), PeerError> {
    let mut all = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(t) = std::fs::read_to_string(table) {
            all.extend(listeners(&t));
        }
    }
    let mut sockets = HashSet::new();
    for pid in expected.processes() {
        sockets_of(pid, &mut sockets);
    }
    check_tcp_listeners(port, &all, expected.uid, &sockets)
}

/// Ports handed to live workers. The worker binds its port with
/// SO_REUSEPORT (grpc-python does), so two workers given the same port
/// would both bind it and the agent could talk to the wrong one: a port is
/// never handed out twice while its worker lives.
static LEASED_PORTS: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A port leased to one worker until dropped.
#[derive(Debug)]
pub struct PortLease(u16);

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Ok(mut leased) = LEASED_PORTS.lock() {
            leased.remove(&self.0);
        }
    }
}

/// Leases a port from `pick` that no live worker holds (a few tries).
fn lease_port(mut pick: impl FnMut() -> io::Result<u16>) -> io::Result<PortLease> {
    for _ in 0..32 {
        let port = pick()?;
        let mut leased = LEASED_PORTS
            .lock()
            .map_err(|_| io::Error::other("port lease table poisoned"))?;
        if leased.insert(port) {
            return Ok(PortLease(port));
        }
    }
    Err(io::Error::other(
        "no free port that no live worker holds after 32 tries",
    ))
}

/// A port free right now (binding port 0; the worker binds it a moment later).
fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether a socket at `path` fits `sun_path`.
pub fn socket_path_fits(path: &Path) -> bool {
    path.as_os_str().len() <= MAX_SOCKET_PATH
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(uid: u32, pid: u32) -> Expected {
        Expected {
            uid,
            pid,
            cgroup: None,
        }
    }

    #[test]
    fn a_port_is_never_leased_to_two_live_workers() {
        let first = lease_port(|| Ok(40_001)).expect("lease");
        // The picker offers the leased port again, then another one.
        let mut offers = [40_001u16, 40_002].into_iter();
        let second = lease_port(|| Ok(offers.next().unwrap_or(40_003))).expect("lease");
        assert_eq!((first.0, second.0), (40_001, 40_002));
        assert!(
            lease_port(|| Ok(40_001)).is_err(),
            "only the taken port on offer"
        );
        drop(first);
        let again = lease_port(|| Ok(40_001)).expect("free once its worker is gone");
        assert_eq!(again.0, 40_001);
    }

    #[test]
    fn unix_peers_must_be_the_workers_uid_and_process() {
        let e = expected(2_000_000_001, 500);
        let owns = |p| p == 500 || p == 501;
        assert!(check_unix_peer(2_000_000_001, Some(500), &e, owns).is_ok());
        assert!(check_unix_peer(2_000_000_001, Some(501), &e, owns).is_ok());
        let other_uid = check_unix_peer(2_000_000_002, Some(500), &e, owns)
            .expect_err("uid")
            .to_string();
        assert!(other_uid.contains("uid 2000000002"), "{other_uid}");
        let other_pid = check_unix_peer(2_000_000_001, Some(900), &e, owns)
            .expect_err("pid")
            .to_string();
        assert!(other_pid.contains("pid 900"), "{other_pid}");
        assert!(check_unix_peer(2_000_000_001, None, &e, owns).is_err());
    }

    #[test]
    fn proc_net_tcp_tables_parse() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  2000000001        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  2000000001        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(
            listeners(table),
            vec![
                Listener {
                    port: 8080,
                    uid: 2_000_000_001,
                    inode: 4242
                },
                Listener {
                    port: 22,
                    uid: 0,
                    inode: 17
                }
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 99 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(
            listeners(v6),
            vec![Listener {
                port: 8080,
                uid: 1000,
                inode: 99
            }]
        );
        assert!(listeners("garbage\nmore garbage").is_empty());
    }

    #[test]
    fn every_tcp_listener_on_the_port_must_be_the_workers() {
        let mine = Listener {
            port: 8080,
            uid: 7,
            inode: 1,
        };
        let sockets = HashSet::from([1u64]);
        assert!(check_tcp_listeners(8080, &[mine], 7, &sockets).is_ok());
        // A listener that bound the port before or beside the worker.
        let squatter = Listener { inode: 2, ..mine };
        let e = check_tcp_listeners(8080, &[mine, squatter], 7, &sockets)
            .expect_err("squatter")
            .to_string();
        assert!(e.contains("inode 2"), "{e}");
        let other_uid = Listener { uid: 0, ..mine };
        assert!(check_tcp_listeners(8080, &[other_uid], 7, &sockets).is_err());
        assert!(check_tcp_listeners(9090, &[mine], 7, &sockets).is_err());
    }
}
