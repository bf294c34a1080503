//! Listening sockets: one per binding per core, all with SO_REUSEPORT so the kernel spreads
//! connections, and SO_INCOMING_CPU so a connection is accepted on the core whose thread is
//! pinned to the CPU that received it.
//!
//! SO_REUSEPORT would also let us share a port with a stray process of the same user without an
//! error, so every address is first probed with a socket that does *not* set it: if that bind
//! fails with EADDRINUSE, the port belongs to someone else and startup fails naming the binding.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Why a listener could not be set up.
#[derive(Debug)]
pub struct BindError {
    pub binding: String,
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.error.kind() == io::ErrorKind::AddrInUse {
            write!(
                f,
                "binding {:?}: {} is already in use by another process",
                self.binding, self.addr
            )
        } else {
            write!(
                f,
                "binding {:?}: cannot listen on {}: {}",
                self.binding, self.addr, self.error
            )
        }
    }
}

impl std::error::Error for BindError {}

fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // "[::]:25" listens on IPv6 only; configure "0.0.0.0:25" too for IPv4 (explicit beats
        // the sysctl-dependent dual-stack default).
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    Ok(s)
}

/// How long an address may stay busy before it counts as someone else's: a process killed with
/// SIGKILL releases its io_uring listeners asynchronously, a few milliseconds after it is gone.
const PROBE_PATIENCE: Duration = Duration::from_secs(2);

/// Whether listening on `addr` would overlap a listener of ours (`ours`): same port and family,
/// and the same address or a wildcard on either side. The probe cannot tell such an overlap
/// from a stranger, and the kernel lets our own SO_REUSEPORT sockets share it.
fn overlaps_ours(addr: SocketAddr, ours: &[SocketAddr]) -> bool {
    ours.iter().any(|o| {
        o.port() == addr.port()
            && o.is_ipv4() == addr.is_ipv4()
            && (o.ip() == addr.ip() || o.ip().is_unspecified() || addr.ip().is_unspecified())
    })
}

/// Fail if `addr` is held by another process (see the module comment). `ours` are the
/// addresses this server already listens on (a reload). An address that stays busy is retried
/// for [`PROBE_PATIENCE`] (a previous instance's listeners on their way out) before it counts as
/// taken.
pub fn probe(binding: &str, addr: SocketAddr, ours: &[SocketAddr]) -> Result<(), BindError> {
    if overlaps_ours(addr, ours) {
        return Ok(());
    }
    let err = |error| BindError {
        binding: binding.to_string(),
        addr,
        error,
    };
    let started = Instant::now();
    loop {
        let s = socket_for(addr).map_err(err)?;
        match s.bind(&addr.into()) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse && started.elapsed() < PROBE_PATIENCE =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err(e)),
        }
    }
}

/// A listener for one core. `cpu` is the CPU the core's thread is pinned to.
pub fn bind(
    binding: &str,
    addr: SocketAddr,
    cpu: usize,
    backlog: i32,
) -> Result<std::net::TcpListener, BindError> {
    let err = |error| BindError {
        binding: binding.to_string(),
        addr,
        error,
    };
    let s = socket_for(addr).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    // Best effort: without it the kernel still balances, only without CPU locality.
    let _ = s.set_cpu_affinity(cpu);
    s.set_nonblocking(true).map_err(err)?;
    s.set_tcp_nodelay(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(backlog).map_err(err)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_held_by_another_socket_is_reported() {
        // A foreign listener that itself uses SO_REUSEPORT: a plain REUSEPORT bind would share
        // it silently; the probe must refuse.
        let foreign = socket_for("127.0.0.1:0".parse().unwrap()).unwrap();
        foreign.set_reuse_port(true).unwrap();
        foreign
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        foreign.listen(8).unwrap();
        let addr = foreign.local_addr().unwrap().as_socket().unwrap();
        let t = Instant::now();
        let e = probe("mx", addr, &[]).unwrap_err();
        assert!(
            t.elapsed() >= PROBE_PATIENCE,
            "a busy port is retried before it is refused"
        );
        assert_eq!(e.error.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            e.to_string(),
            format!("binding \"mx\": {addr} is already in use by another process")
        );
    }

    #[test]
    fn our_own_overlapping_listeners_are_not_strangers() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ours = [a("0.0.0.0:2525"), a("[::1]:587")];
        assert!(overlaps_ours(a("127.0.0.1:2525"), &ours));
        assert!(overlaps_ours(a("[::]:587"), &ours));
        assert!(!overlaps_ours(a("127.0.0.1:2526"), &ours));
        assert!(!overlaps_ours(a("[::1]:2525"), &ours), "another family");
        // A port freed a moment after the probe starts (a killed process's listeners) is taken.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(l);
        });
        assert!(probe("mx", addr, &[]).is_ok());
        t.join().unwrap();
    }

    #[test]
    fn cores_share_a_port_with_each_other() {
        let l0 = bind("mx", "127.0.0.1:0".parse().unwrap(), 0, 16).unwrap();
        let addr = l0.local_addr().unwrap();
        let l1 = bind("mx", addr, 1, 16).unwrap();
        assert_eq!(l1.local_addr().unwrap(), addr);
    }
}
