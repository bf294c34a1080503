//! SMTP AUTH credentials: a `users_file` of `user:argon2-hash` lines (PHC strings, as written by
//! `ringmx hash-password`). Verification is deliberately slow (argon2), so the runtime runs it
//! on its own small pool ([`Verifier`]), never on a core's reactor and never in the way of the
//! spool's blocking work. [`Failures`] counts failures per client address across connections
//! (Postfix's anvil `smtpd_client_auth_rate_limit` is the model).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::workers::Workers;

/// The users allowed to authenticate.
#[derive(Debug, Clone, Default)]
pub struct Users {
    hashes: HashMap<String, String>,
    /// Verified against for unknown users, so they cost the same time as known ones.
    dummy: String,
}

impl Users {
    /// Read `path`; errors name the file and line.
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Users::parse(&text).map_err(|(line, e)| format!("{}:{line}: {e}", path.display()))
    }

    /// Parse `user:hash` lines (blank lines and `#` comments ignored).
    pub fn parse(text: &str) -> Result<Users, (usize, String)> {
        let mut hashes = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err((i + 1, "expected user:argon2-hash".into()));
            };
            PasswordHash::new(hash)
                .map_err(|e| (i + 1, format!("user {user:?}: not an argon2 PHC hash: {e}")))?;
            if hashes.insert(user.to_string(), hash.to_string()).is_some() {
                return Err((i + 1, format!("user {user:?} is listed twice")));
            }
        }
        let dummy = hash_password("no such user").map_err(|e| (0, e))?;
        Ok(Users { hashes, dummy })
    }

    /// Whether `password` is right for `user`. Unknown users cost a verification too, so timing
    /// does not tell which user names exist.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.hashes.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.dummy.as_str(), false),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && known
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// No users.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// Authentication failures per client address (IPv4 /32, IPv6 /64: one host's whole prefix)
/// within a window. Bounded: at `capacity` addresses, expired entries are dropped and then an
/// eighth of the rest (in the map's random order), so a flood of sources forgets some failures
/// rather than growing, and the O(n) pass happens once per `capacity / 8` new addresses.
#[derive(Debug)]
pub struct Failures {
    map: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    capacity: usize,
}

/// The address a failure is counted against.
fn failure_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
        },
        v4 => v4,
    }
}

impl Failures {
    /// A table holding at most `capacity` addresses.
    pub fn new(capacity: usize) -> Failures {
        Failures {
            map: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `ip` has failed `limit` times within `window` before `now` (0 = no limit).
    pub fn blocked(&self, ip: IpAddr, now: Instant, limit: u32, window: Duration) -> bool {
        limit > 0
            && self
                .lock()
                .get(&failure_key(ip))
                .is_some_and(|&(n, since)| {
                    n >= limit && now.saturating_duration_since(since) < window
                })
    }

    /// Failures of `ip` within `window` before `now`.
    pub fn failures(&self, ip: IpAddr, now: Instant, window: Duration) -> u32 {
        self.lock()
            .get(&failure_key(ip))
            .filter(|(_, since)| now.saturating_duration_since(*since) < window)
            .map_or(0, |(n, _)| *n)
    }

    /// Count one failure of `ip` at `now`; a window that has passed starts again.
    pub fn record(&self, ip: IpAddr, now: Instant, window: Duration) {
        let key = failure_key(ip);
        let mut map = self.lock();
        if !map.contains_key(&key) && map.len() >= self.capacity {
            map.retain(|_, (_, since)| now.saturating_duration_since(*since) < window);
            if map.len() >= self.capacity {
                let victims: Vec<IpAddr> = map
                    .keys()
                    .take((self.capacity / 8).max(1))
                    .copied()
                    .collect();
                for k in victims {
                    map.remove(&k);
                }
            }
        }
        let e = map.entry(key).or_insert((0, now));
        if now.saturating_duration_since(e.1) >= window {
            *e = (0, now);
        }
        e.0 = e.0.saturating_add(1);
    }

    /// Addresses tracked.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// None tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// argon2 verification on its own [`Workers`] pool: a flood of AUTH attempts waits there (or
/// is turned away), never in front of spool or drop-folder I/O.
#[derive(Debug)]
pub struct Verifier {
    workers: Workers,
}

impl Verifier {
    /// `threads` workers; at most `pending` checks queued beyond them.
    pub fn new(threads: usize, pending: usize) -> std::io::Result<Verifier> {
        Ok(Verifier {
            workers: Workers::new("auth", threads, pending)?,
        })
    }

    /// Queue a check of `username`/`password` against `users`; `None` when the queue is full
    /// (the caller answers "try again later"). The receiver yields the result.
    pub fn verify(
        &self,
        users: Arc<Users>,
        username: String,
        password: String,
    ) -> Option<tokio::sync::oneshot::Receiver<bool>> {
        self.workers
            .submit(move || users.verify(&username, &password))
    }
}

/// An argon2id PHC hash of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| format!("reading /dev/urandom: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        let users = Users::parse(&format!("# users\nalice:{h}\n")).unwrap();
        assert!(users.verify("alice", "s3cret"));
        assert!(!users.verify("alice", "wrong"));
        assert!(!users.verify("bob", "s3cret"));
    }

    #[test]
    fn failures_per_address_window_and_bound() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let f = Failures::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(!f.blocked(a, t0, 3, w));
            f.record(a, t0, w);
        }
        assert!(f.blocked(a, t0, 3, w));
        assert!(!f.blocked(a, t0, 0, w), "0 = no limit");
        assert!(!f.blocked(a, t0 + w, 3, w), "the window passed");
        f.record(a, t0 + w, w);
        assert!(!f.blocked(a, t0 + w, 3, w), "a new window starts from one");
        // IPv6: one /64 is one client; IPv4-mapped is IPv4.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        f.record(v6("2001:db8::1"), t0, w);
        f.record(v6("2001:db8::ffff:2"), t0, w);
        f.record(v6("2001:db8::3"), t0, w);
        assert!(f.blocked(v6("2001:db8::99"), t0, 3, w));
        assert!(!f.blocked(v6("2001:db8:0:1::1"), t0, 3, w));
        assert!(f.blocked(v6("::ffff:192.0.2.1"), t0 + w, 1, w));
        // Bounded: new sources push the oldest out.
        for i in 0..10u8 {
            f.record(IpAddr::from([198, 51, 100, i]), t0 + w, w);
            assert!(f.len() <= 3);
        }
    }

    #[test]
    fn verifier_queue_is_bounded() {
        let h = hash_password("pw").unwrap();
        let users = Arc::new(Users::parse(&format!("u:{h}\n")).unwrap());
        let v = Verifier::new(1, 2).unwrap();
        let rxs: Vec<_> = (0..50)
            .filter_map(|_| v.verify(users.clone(), "u".into(), "pw".into()))
            .collect();
        assert!(rxs.len() < 50 && rxs.len() >= 2, "{}", rxs.len());
        for rx in rxs {
            assert_eq!(rx.blocking_recv(), Ok(true));
        }
    }

    #[test]
    fn bad_lines_name_the_line() {
        assert_eq!(Users::parse("\nalice\n").unwrap_err().0, 2);
        assert_eq!(Users::parse("alice:plaintext\n").unwrap_err().0, 1);
    }
}
