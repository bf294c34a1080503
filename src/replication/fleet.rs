//! Fleet-wide rate limits (`[rates] fleet = true`): every edge host counts the events of each
//! client network in Redis (the `[aswl.replication]` server), per Unix minute, so a client
//! spread over the fleet meets one limit instead of one per host.
//!
//! The SMTP path never waits for Redis. It hands each counted event to a bounded channel
//! (`try_send`: when the channel is full the event is only counted locally) and reads the
//! fleet's count for the network from a fixed table of atomic cells. A thread batches the
//! events every `INTERVAL`: one `INCRBY` (and `EXPIRE`) per network, minute and kind, whose
//! answer — the fleet's total — goes into the table. When Redis is away nothing is updated,
//! the cells age out with their minute, and each host's own limits (always applied first)
//! remain: the fallback is the local bucket.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::Settings;
use super::redis_io::Conn;

/// How often the counted events go to Redis.
pub const INTERVAL: Duration = Duration::from_millis(200);
/// Events waiting for the next batch at most.
const CHANNEL: usize = 65_536;
/// Cells of the fleet-count table (8 bytes each).
const CELLS: usize = 1 << 16;

/// A client network as every host names it: family, masked address bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Net {
    pub family: u8,
    pub bits: u128,
}

impl Net {
    fn key_part(&self) -> String {
        if self.family == 4 {
            std::net::Ipv4Addr::from((self.bits >> 96) as u32).to_string()
        } else {
            std::net::Ipv6Addr::from(self.bits).to_string()
        }
    }
}

/// The table the SMTP path reads and the channel it feeds.
#[derive(Debug)]
pub struct Fleet {
    tx: crossbeam_channel::Sender<(u8, Net)>,
    rx: crossbeam_channel::Receiver<(u8, Net)>,
    /// tag (16 bits) | minute mod 65,536 (16 bits) | count (32 bits), per kind and network.
    cells: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    /// Whether the last batch reached Redis (for `ringmx why` and the log).
    pub connected: AtomicBool,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet::new()
    }
}

fn unix_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

impl Fleet {
    pub fn new() -> Fleet {
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL);
        Fleet {
            tx,
            rx,
            cells: (0..CELLS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            connected: AtomicBool::new(false),
        }
    }

    fn cell(&self, kind: u8, net: Net) -> (Option<&AtomicU64>, u64) {
        let h = self.hasher.hash_one((kind, net));
        (self.cells.get((h as usize) % CELLS), h >> 48)
    }

    /// Count one event of `kind` from `net` (never blocks; dropped when the channel is full).
    pub fn count(&self, kind: u8, net: Net) {
        let _ = self.tx.try_send((kind, net));
    }

    /// The fleet's count of `kind` from `net` in the current minute, as last heard.
    pub fn total(&self, kind: u8, net: Net) -> u32 {
        self.total_at(kind, net, unix_minute())
    }

    fn total_at(&self, kind: u8, net: Net, minute: u64) -> u32 {
        let (Some(cell), tag) = self.cell(kind, net) else {
            return 0;
        };
        let v = cell.load(Ordering::Relaxed);
        if v >> 48 == tag && (v >> 32) & 0xffff == minute & 0xffff {
            (v & 0xffff_ffff) as u32
        } else {
            0
        }
    }

    fn set_total(&self, kind: u8, net: Net, minute: u64, total: u64) {
        if let (Some(cell), tag) = self.cell(kind, net) {
            let v = (tag << 48) | ((minute & 0xffff) << 32) | total.min(u64::from(u32::MAX));
            cell.store(v, Ordering::Relaxed);
        }
    }

    /// Take what waits in the channel, summed per kind and network.
    fn drain(&self) -> HashMap<(u8, Net), u64> {
        let mut m: HashMap<(u8, Net), u64> = HashMap::new();
        for _ in 0..CHANNEL {
            match self.rx.try_recv() {
                Ok(k) => *m.entry(k).or_default() += 1,
                Err(_) => break,
            }
        }
        m
    }
}

/// The thread that sends the counts.
#[derive(Debug)]
pub struct Handle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Start sending `fleet`'s counts to the Redis of `settings`, keys under `{prefix}rate:`.
pub fn start(settings: Arc<Settings>, fleet: Arc<Fleet>) -> std::io::Result<Handle> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = super::spawn_on_runtime("ringmx-fleet", "fleet rates", async move {
        run(&settings, &fleet, &flag).await;
    })?;
    Ok(Handle {
        stop,
        thread: Some(thread),
    })
}

async fn run(s: &Settings, fleet: &Fleet, stop: &AtomicBool) {
    let mut conn: Option<Conn> = None;
    let mut retry_at = std::time::Instant::now();
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(INTERVAL).await;
        let counts = fleet.drain();
        if conn.is_none() && std::time::Instant::now() >= retry_at {
            match Conn::open(s, Duration::from_secs(1)).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if fleet.connected.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "fleet rates: Redis unreachable; local limits only");
                    }
                    retry_at = std::time::Instant::now() + Duration::from_secs(2);
                }
            }
        }
        let (Some(c), false) = (conn.as_mut(), counts.is_empty()) else {
            continue;
        };
        let minute = unix_minute();
        let keys: Vec<((u8, Net), u64, String)> = counts
            .into_iter()
            .map(|((kind, net), n)| {
                let key = format!("{}rate:{kind}:{}:{minute}", s.prefix, net.key_part());
                ((kind, net), n, key)
            })
            .collect();
        let mut cmds = Vec::with_capacity(keys.len() * 2);
        for (_, n, key) in &keys {
            let mut incr = redis::cmd("INCRBY");
            incr.arg(key).arg(*n);
            cmds.push(incr);
            let mut exp = redis::cmd("EXPIRE");
            exp.arg(key).arg(120);
            cmds.push(exp);
        }
        match c.all(cmds).await {
            Ok(values) => {
                if !fleet.connected.swap(true, Ordering::Relaxed) {
                    tracing::info!("fleet rates: counting through Redis");
                }
                for (((kind, net), _, _), v) in keys.iter().zip(values.iter().step_by(2)) {
                    if let Ok(total) = redis::from_redis_value::<u64>(v.clone()) {
                        fleet.set_total(*kind, *net, minute, total);
                    }
                }
            }
            Err(e) => {
                if fleet.connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "fleet rates: Redis unreachable; local limits only");
                }
                conn = None;
                retry_at = std::time::Instant::now() + Duration::from_secs(2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_belong_to_their_minute_and_network() {
        let f = Fleet::new();
        let a = Net {
            family: 4,
            bits: 1 << 96,
        };
        let b = Net {
            family: 4,
            bits: 2 << 96,
        };
        assert_eq!(f.total_at(0, a, 100), 0);
        f.set_total(0, a, 100, 7);
        assert_eq!(f.total_at(0, a, 100), 7);
        assert_eq!(f.total_at(0, a, 101), 0, "a new minute starts at zero");
        assert_eq!(f.total_at(1, a, 100), 0, "another kind");
        assert_eq!(f.total_at(0, b, 100), 0, "another network");
        f.count(0, a);
        f.count(0, a);
        f.count(2, b);
        let d = f.drain();
        assert_eq!(d.get(&(0, a)), Some(&2));
        assert_eq!(d.get(&(2, b)), Some(&1));
        assert_eq!(a.key_part(), "0.0.0.1");
    }
}
