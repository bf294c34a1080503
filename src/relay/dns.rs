//! MX resolution (RFC 5321 §5.1) with hickory-resolver. hickory is tokio-based, so it runs on
//! one small tokio runtime of its own. Lookups (MX, next hops by name, DNS lists) and work
//! that mixes them with CPU (SPF, DKIM, DMARC) run as tasks on a few single-threaded runtimes
//! of their own ([`Dns::spawn`]): cores never wait on DNS on their own thread, a task waiting
//! for an answer holds no thread, and the signatures are checked on as many threads as there
//! are task runtimes.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};

/// The resolver and the runtime it runs on.
pub struct Dns {
    rt: tokio::runtime::Runtime,
    resolver: TokioResolver,
    /// The runtimes of [`Dns::spawn`], each driven by a thread of its own.
    tasks: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

/// Threads (each a single-threaded runtime) for [`Dns::spawn`].
const TASK_THREADS: usize = 4;

/// MX hosts of one domain looked up, best preference first (a domain's DNS is the sender's or
/// recipient's: thousands of MX records must not mean thousands of lookups, nor of
/// connection attempts). Postfix tries 5 addresses.
pub const MAX_MX_HOSTS: usize = 10;

/// Addresses of a domain's MX hosts tried in one attempt, duplicates removed (each can cost a
/// connect timeout and the reply timeouts).
pub const MAX_MX_ADDRESSES: usize = 10;

/// How long the address lookups of a domain's MX hosts (all at once) may take together.
const MX_ADDRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn task_runtime(i: usize) -> Result<tokio::runtime::Handle, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name(format!("ringmx-verify-{i}"))
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| e.to_string())?;
    Ok(handle)
}

/// Where to deliver for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// Hosts in preference order, each with its addresses.
    Hosts(Vec<(String, Vec<IpAddr>)>),
    /// The domain publishes a null MX (RFC 7505): it accepts no mail.
    NullMx,
}

/// Hosts by name with an address each: `(name, address)`.
pub type Named<A> = Vec<(String, A)>;

/// Where to connect for a domain's MX hosts (in order, best first): each address once, at
/// most [`MAX_MX_ADDRESSES`], none in `ignore`; and the addresses skipped for `ignore`.
pub fn mx_addresses(
    hosts: Vec<(String, Vec<IpAddr>)>,
    ignore: &[crate::units::Cidr],
    port: u16,
) -> (Named<SocketAddr>, Named<IpAddr>) {
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for (name, ips) in hosts {
        for ip in ips {
            if crate::units::any_contains(ignore, ip) {
                skipped.push((name.clone(), ip));
            } else if seen.len() < MAX_MX_ADDRESSES && seen.insert(ip) {
                out.push((name.clone(), SocketAddr::new(ip, port)));
            }
        }
    }
    (out, skipped)
}

static DNS: OnceLock<Result<Arc<Dns>, String>> = OnceLock::new();

impl Dns {
    /// The process-wide resolver (built on first use from `servers`, or `/etc/resolv.conf`).
    pub fn get(servers: &[SocketAddr]) -> Result<Arc<Dns>, String> {
        DNS.get_or_init(|| Dns::new(servers).map(Arc::new)).clone()
    }

    fn new(servers: &[SocketAddr]) -> Result<Dns, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ringmx-dns")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let provider = TokioRuntimeProvider::default();
        let resolver = rt.block_on(async {
            let builder = if servers.is_empty() {
                Resolver::builder(provider).map_err(|e| e.to_string())?
            } else {
                let ns = servers
                    .iter()
                    .map(|s| {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = s.port();
                        let mut tcp = ConnectionConfig::tcp();
                        tcp.port = s.port();
                        NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                    })
                    .collect();
                Resolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], ns),
                    provider,
                )
            };
            let mut builder = builder;
            // A name server that does not answer costs two tries of 2 s, not hickory's default
            // of 5 s each: SPF, DKIM and DMARC lookups then report `temperror` within the
            // message's time limit instead of running out of it.
            let opts = builder.options_mut();
            opts.timeout = std::time::Duration::from_secs(2);
            opts.attempts = 2;
            builder.build().map_err(|e| e.to_string())
        })?;
        let tasks = (0..TASK_THREADS)
            .map(task_runtime)
            .collect::<Result<_, _>>()?;
        Ok(Dns {
            rt,
            resolver,
            tasks,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The resolver (for lookups this module does not wrap: SPF, DKIM, DMARC).
    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// Enter the resolver's runtime on this thread (to create its timers and lookups).
    pub fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.rt.enter()
    }

    /// Run `f` as a task on one of the task runtimes; its output arrives on the receiver.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let task = async move {
            let _ = tx.send(f.await);
        };
        match self.tasks.get(i % self.tasks.len().max(1)) {
            Some(h) => drop(h.spawn(task)),
            None => drop(self.rt.spawn(task)),
        }
        rx
    }

    /// MX hosts of `domain` with their addresses; the domain itself when it has no MX
    /// (implicit MX, RFC 5321 §5.1). Run it on the resolver's runtimes ([`Dns::spawn`]):
    /// waiting for a slow name server holds no thread.
    pub async fn resolve_mx(&self, domain: &str) -> Result<Targets, String> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mut mx: Vec<(u16, String)> = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(m) => Some((m.preference, m.exchange.to_utf8())),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Err(format!("MX lookup for {domain}: {e}")),
        };
        if mx.len() == 1 && mx.first().is_some_and(|(_, h)| h == ".") {
            return Ok(Targets::NullMx);
        }
        if mx.is_empty() {
            mx.push((0, fqdn.clone()));
        }
        mx.sort_by_key(|(p, _)| *p);
        let mut seen = std::collections::HashSet::new();
        mx.retain(|(_, h)| seen.insert(h.to_ascii_lowercase()));
        mx.truncate(MAX_MX_HOSTS);
        // All at once, within one time limit: one slow name server cannot make the
        // lookups of many hosts take many times its timeout.
        let asks = mx.iter().map(|(_, host)| async move {
            let ips: Vec<IpAddr> = match tokio::time::timeout(
                MX_ADDRESS_TIMEOUT,
                self.resolver.lookup_ip(host.as_str()),
            )
            .await
            {
                Ok(Ok(l)) => l.iter().collect(),
                _ => Vec::new(),
            };
            (host.trim_end_matches('.').to_string(), ips)
        });
        let hosts: Vec<(String, Vec<IpAddr>)> = futures_util::future::join_all(asks).await;
        if hosts.iter().all(|(_, ips)| ips.is_empty()) {
            return Err(format!("no address for the mail hosts of {domain}"));
        }
        Ok(Targets::Hosts(hosts))
    }

    /// The A records of each name, all asked at once, within `timeout` together: per name
    /// the addresses and their smallest TTL (none and 300 s for a name that does not exist),
    /// or `None` when it failed or did not answer in time. Run it on the resolver's runtimes
    /// ([`Dns::spawn`]).
    pub async fn lookup_a_many(
        &self,
        names: &[String],
        timeout: std::time::Duration,
    ) -> Vec<Option<(Vec<std::net::Ipv4Addr>, u32)>> {
        let asks = names.iter().map(|n| async move {
            let fqdn = format!("{}.", n.trim_end_matches('.'));
            match tokio::time::timeout(timeout, self.resolver.ipv4_lookup(fqdn.as_str())).await {
                Ok(Ok(l)) => {
                    let ttl = l.answers().iter().map(|r| r.ttl).min().unwrap_or(300);
                    let addrs = l
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::A(a) => Some(a.0),
                            _ => None,
                        })
                        .collect();
                    Some((addrs, ttl))
                }
                Ok(Err(e)) if e.is_no_records_found() => Some((Vec::new(), 300)),
                _ => None,
            }
        });
        futures_util::future::join_all(asks).await
    }

    /// Addresses of one host (a next hop given by name). Run it on the resolver's runtimes.
    pub async fn resolve_host(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        self.resolver
            .lookup_ip(host)
            .await
            .map(|l| l.iter().collect())
            .map_err(|e| format!("{host}: {e}"))
    }
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Cidr;

    #[test]
    fn mx_addresses_once_each_at_most_ten_none_ignored() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let ignore = [Cidr::parse("127.0.0.0/8").unwrap()];
        let host = |n: &str, ips: &[&str]| (n.to_string(), ips.iter().map(|s| ip(s)).collect());
        // Order kept, duplicates (across hosts too) dropped, ignored ones reported.
        let (out, skipped) = mx_addresses(
            vec![
                host("a", &["192.0.2.1", "127.0.0.1", "192.0.2.1"]),
                host("b", &["2001:db8::1", "192.0.2.1", "::ffff:127.0.0.2"]),
                host("c", &[]),
            ],
            &ignore,
            25,
        );
        let shown: Vec<String> = out.iter().map(|(h, a)| format!("{h} {a}")).collect();
        assert_eq!(shown, ["a 192.0.2.1:25", "b [2001:db8::1]:25"]);
        assert_eq!(
            skipped,
            [
                ("a".to_string(), ip("127.0.0.1")),
                ("b".to_string(), ip("::ffff:127.0.0.2"))
            ]
        );
        // However many a domain publishes, ten are tried.
        let many = (0..40)
            .map(|i| (format!("mx{i}"), vec![ip(&format!("192.0.2.{i}"))]))
            .collect();
        let (out, _) = mx_addresses(many, &ignore, 25);
        assert_eq!(out.len(), MAX_MX_ADDRESSES);
        assert_eq!(out.last().map(|(h, _)| h.as_str()), Some("mx9"));
    }
}
