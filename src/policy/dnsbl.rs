//! DNS block and allow lists (`[dnsbl]`), scored like Postfix's postscreen: each list is
//! `domain[=pattern][*weight]` — `zen.example*2`, `list.example=127.0.0.[2..11]*3`,
//! `allow.example*-5` (a negative weight is an allow list). A client listed where the pattern
//! matches adds the weight; at `threshold` or more it is refused (`554 5.7.1` naming the list
//! that weighed most) before its first command. All lists are asked at once when the client
//! connects, as a task on the resolver's runtime (waiting for a list that does not answer holds
//! no thread: a list that stops answering cannot tie up the policy workers that every other
//! deferred check needs); a timeout or a DNS failure counts as "not listed". Scores are cached
//! per address for the answers' TTL (at most `max_cache_ttl`), in a bounded map.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use super::pipeline::{Check, Decision, Job, Refusal, Request, Stage};
pub use crate::dnslist::{Answer, List, score};
use crate::metrics::Reason;
use crate::proto::reply::Reply;

/// Looks names up (all at once) and gives the answers, in the same order, to the second
/// argument, whose verdict is the job's: a task that waits for DNS without a thread.
pub type Resolve = Arc<dyn Fn(Vec<String>, Scoring) -> Job + Send + Sync>;

/// What to do with the answers.
pub type Scoring = Box<dyn FnOnce(Vec<Answer>) -> Decision + Send>;

/// A cached verdict: the refusal (if any) and when it expires (seconds since the epoch).
type Cached = (Option<&'static Reply>, u32);

/// Clients whose lookups may be under way at once. A lookup goes on after its session has
/// stopped waiting (for at most `timeout`): clients that connect and leave at once, while a
/// list is slow, would otherwise pile up queries (and sockets) without bound. Past it a
/// client counts as not listed, as when a list does not answer.
pub const MAX_IN_FLIGHT: usize = 1024;

/// One client's lookups under way; counted down when dropped (answered or not).
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The `dnsbl` check (connect stage).
pub struct DnsLists {
    lists: Arc<Vec<List>>,
    replies: Arc<Vec<&'static Reply>>,
    threshold: i32,
    max_ttl: u32,
    cache_size: usize,
    cache: Arc<Mutex<HashMap<IpAddr, Cached>>>,
    resolve: Resolve,
    /// Clients whose lookups are under way ([`MAX_IN_FLIGHT`]).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// How long a session waits for the lookups (the lookups' own timeout and a margin).
    time_limit: std::time::Duration,
}

impl std::fmt::Debug for DnsLists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsLists")
            .field("lists", &self.lists)
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

/// The refusal naming `list`, made once per list name for the life of the process.
fn reply_for(list: &str) -> &'static Reply {
    static REPLIES: OnceLock<Mutex<HashMap<String, &'static Reply>>> = OnceLock::new();
    let mut m = REPLIES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // Bounded by the list names ever configured; list names are [a-z0-9.-] (no CR/LF).
    m.entry(list.to_string()).or_insert_with(|| {
        Box::leak(Box::new(Reply {
            code: 554,
            enhanced: "5.7.1",
            text: format!("Service unavailable; client blocked using {list}").into(),
        }))
    })
}

impl DnsLists {
    pub fn new(
        lists: Vec<List>,
        threshold: i32,
        max_ttl: u32,
        cache_size: usize,
        resolve: Resolve,
        time_limit: std::time::Duration,
    ) -> DnsLists {
        let replies = lists.iter().map(|l| reply_for(&l.domain)).collect();
        DnsLists {
            lists: Arc::new(lists),
            replies: Arc::new(replies),
            threshold,
            max_ttl,
            cache_size: cache_size.max(1),
            cache: Arc::default(),
            resolve,
            in_flight: Arc::default(),
            time_limit,
        }
    }

    /// For `ringmx why`: the cached verdict on `ip` (the refusal, if listed) and when it
    /// expires (seconds since the epoch); `None` when nothing is cached at `now`.
    pub fn cached(&self, ip: IpAddr, now: u32) -> Option<(Option<&'static Reply>, u32)> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .copied()
            .filter(|(_, expires)| *expires > now)
    }

    /// Drop the cached verdict on `ip` (the next connection asks the lists again).
    pub fn forget(&self, ip: IpAddr) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip);
    }

    fn refusal(reply: &'static Reply) -> Decision {
        Decision::Reject(Refusal::new(
            reply,
            Reason::Listed,
            "refused: DNS block list",
        ))
    }
}

impl Check for DnsLists {
    fn name(&self) -> &'static str {
        "dnsbl"
    }
    fn stage(&self) -> Stage {
        Stage::Connect
    }
    fn time_limit(&self) -> Option<std::time::Duration> {
        Some(self.time_limit)
    }
    /// No answer in time (or no worker free) is "not listed".
    fn unavailable(&self) -> Decision {
        Decision::Continue
    }
    fn check(&self, r: &Request<'_>) -> Decision {
        let ip = r.ip;
        let now = r.now;
        if let Some((verdict, expires)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .copied()
            && expires > now
        {
            return verdict.map_or(Decision::Continue, DnsLists::refusal);
        }
        let (lists, replies, cache) =
            (self.lists.clone(), self.replies.clone(), self.cache.clone());
        let (threshold, max_ttl, cache_size) = (self.threshold, self.max_ttl, self.cache_size);
        let names: Vec<String> = lists.iter().map(|l| l.query(ip)).collect();
        if self
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            >= MAX_IN_FLIGHT
        {
            self.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(client = %ip, "dnsbl: too many lookups under way; not listed");
            return Decision::Continue;
        }
        let in_flight = InFlight(self.in_flight.clone());
        Decision::Defer((self.resolve)(
            names,
            Box::new(move |answers| {
                let _in_flight = in_flight;
                let (total, top, ttl) = score(&lists, &answers);
                let verdict = if total >= threshold {
                    top.and_then(|i| replies.get(i).copied())
                } else {
                    None
                };
                // Failed lookups are not remembered long: a minute at most.
                let ttl = ttl.unwrap_or(60).min(max_ttl);
                let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
                if c.len() >= cache_size {
                    // Full: drop what expired, and if that is not an eighth, an eighth of the rest
                    // (rare, amortized; no client can flush every verdict at once).
                    c.retain(|_, (_, exp)| *exp > now);
                    if c.len() >= cache_size - cache_size / 8 {
                        let drop: Vec<IpAddr> =
                            c.keys().take(cache_size / 8 + 1).copied().collect();
                        for k in drop {
                            c.remove(&k);
                        }
                    }
                }
                c.insert(ip, (verdict, now.saturating_add(ttl)));
                drop(c);
                verdict.map_or(Decision::Continue, DnsLists::refusal)
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::pipeline::{Outcome, Pipeline};
    use std::net::Ipv4Addr;

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A resolver answering at once with `f`, as a blocking job.
    fn answering(f: impl Fn(&[String]) -> Vec<Answer> + Send + Sync + 'static) -> Resolve {
        Arc::new(move |names: Vec<String>, then: Scoring| {
            let answers = f(&names);
            Job::blocking(move || then(answers))
        })
    }

    #[test]
    fn deferred_lookup_then_cache() {
        let asked = Arc::new(Mutex::new(0));
        let counter = asked.clone();
        let resolve = answering(move |names: &[String]| {
            *counter.lock().unwrap() += 1;
            names
                .iter()
                .map(|n| {
                    if n.starts_with("4.0.0.127.") {
                        Some((vec![ip4("127.0.0.2")], 100))
                    } else {
                        Some((Vec::new(), 100))
                    }
                })
                .collect()
        });
        let lists = vec![List::parse("zen.example*2").unwrap()];
        let p = Pipeline::new(vec![Arc::new(DnsLists::new(
            lists,
            2,
            3600,
            10,
            resolve,
            std::time::Duration::from_secs(3),
        ))]);
        let run = |ip: &str, now: u32| {
            let r = Request::new(ip.parse().unwrap(), now);
            match p.run(Stage::Connect, &r) {
                Outcome::Defer(d) => {
                    let answer = d.job.wait();
                    p.resume(d.resume, answer, &r)
                }
                o => o,
            }
        };
        let listed = |o: Outcome| match o {
            Outcome::Reject(f) => Some(f.reply.text.to_string()),
            _ => None,
        };
        assert_eq!(
            listed(run("127.0.0.4", 1000)),
            Some("Service unavailable; client blocked using zen.example".to_string())
        );
        assert_eq!(listed(run("127.0.0.5", 1000)), None);
        assert_eq!(*asked.lock().unwrap(), 2);
        // Cached for the TTL: no new lookup; after it, asked again.
        let r = Request::new("127.0.0.4".parse().unwrap(), 1050);
        assert!(matches!(p.run(Stage::Connect, &r), Outcome::Reject(_)));
        assert_eq!(*asked.lock().unwrap(), 2);
        assert!(listed(run("127.0.0.4", 1101)).is_some());
        assert_eq!(*asked.lock().unwrap(), 3);
    }

    #[test]
    fn lookups_under_way_are_bounded() {
        let held: Arc<Mutex<Vec<Scoring>>> = Arc::default();
        let keep = held.clone();
        let resolve: Resolve = Arc::new(move |_names: Vec<String>, then: Scoring| {
            // Never answered until dropped: a list that does not answer.
            keep.lock().unwrap().push(then);
            Job::blocking(|| Decision::Continue)
        });
        let lists = vec![List::parse("zen.example").unwrap()];
        let d = DnsLists::new(
            lists,
            1,
            3600,
            10,
            resolve,
            std::time::Duration::from_secs(1),
        );
        let check = |i: usize| {
            let ip = IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i as u32));
            d.check(&Request::new(ip, 1000))
        };
        for i in 0..MAX_IN_FLIGHT {
            assert!(matches!(check(i), Decision::Defer(_)), "{i}");
        }
        // The next client is not listed at once, and nothing is cached for it.
        assert!(matches!(check(MAX_IN_FLIGHT), Decision::Continue));
        assert!(d.cached("10.0.4.0".parse().unwrap(), 1000).is_none());
        // Lookups that end (answered, or their task gone) make room again.
        held.lock().unwrap().clear();
        assert!(matches!(check(MAX_IN_FLIGHT + 1), Decision::Defer(_)));
    }
}
