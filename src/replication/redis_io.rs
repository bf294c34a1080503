//! The Redis side of replication: one connection type for a server or a cluster, and the few
//! commands replication sends. Every command names keys of one hash slot, so a cluster needs
//! no cross-slot pipelines; independent commands are sent concurrently (multiplexed).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::try_join_all;
use redis::aio::ConnectionLike;
use redis::{Cmd, RedisFuture, RedisResult, Value};

use super::{BUCKETS, Settings, bucket, member};
use crate::aswl::persist::{LogRecord, encode_log};

/// Removal: record the tombstone (newest wins) and delete the set members it covers.
/// KEYS: set, tombstones (one slot). ARGV: external, local ("" = every local sender), time.
const REMOVE: &str = r#"
local t = tonumber(ARGV[3])
local f = ARGV[1] .. "\0" .. ARGV[2]
local old = tonumber(redis.call("HGET", KEYS[2], f) or "0")
if t > old then redis.call("HSET", KEYS[2], f, ARGV[3]) end
if ARGV[2] ~= "" then
  local s = redis.call("ZSCORE", KEYS[1], f)
  if s and tonumber(s) <= t then redis.call("ZREM", KEYS[1], f) end
  return 0
end
local p = ARGV[1] .. "\0"
local all = redis.call("ZRANGE", KEYS[1], 0, -1, "WITHSCORES")
local n = 0
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #p) == p and tonumber(all[i + 1]) <= t then
    redis.call("ZREM", KEYS[1], all[i]); n = n + 1
  end
end
return n
"#;

/// A connection to one Redis server (reconnecting by itself) or to a cluster.
#[derive(Clone)]
pub(super) enum Conn {
    One(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::One(_) => "Conn::One",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// One stream entry.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) node: String,
    pub(super) at_ms: u64,
    pub(super) data: Vec<u8>,
}

/// What `XINFO STREAM` tells us.
#[derive(Debug)]
pub(super) struct StreamInfo {
    /// The oldest entry left.
    first: Option<String>,
    /// The newest id deleted by `XDEL` ("0-0" when none).
    max_deleted: String,
}

impl StreamInfo {
    /// Were entries after `pos` removed before we read them? (Conservative: when the entry
    /// at `pos` itself is gone, yes.)
    pub(super) fn gap_after(&self, pos: &str) -> bool {
        id_lt(pos, &self.max_deleted) || self.first.as_deref().is_some_and(|f| id_lt(pos, f))
    }
}

fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Stream id order.
pub(super) fn id_lt(a: &str, b: &str) -> bool {
    parse_id(a) < parse_id(b)
}

fn tls_certs(s: &Settings) -> Option<redis::TlsCertificates> {
    s.tls_ca.as_ref().map(|ca| redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.clone()),
    })
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::Int(i) => Some(i.to_string()),
        _ => bytes_of(v).map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

impl Conn {
    pub(super) async fn open(s: &Settings, response_timeout: Duration) -> RedisResult<Conn> {
        let connect_timeout = Duration::from_secs(2);
        if s.cluster {
            let mut b = redis::cluster::ClusterClient::builder(s.urls.clone())
                .connection_timeout(connect_timeout)
                .response_timeout(response_timeout)
                .retries(2);
            if let Some(u) = &s.username {
                b = b.username(u);
            }
            if let Some(p) = &s.password {
                b = b.password(p);
            }
            if let Some(c) = tls_certs(s) {
                b = b.certs(c);
            }
            return Ok(Conn::Cluster(b.build()?.get_async_connection().await?));
        }
        let url = s.urls.first().map(String::as_str).unwrap_or_default();
        let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
        let mut rs = info.redis_settings().clone();
        if let Some(u) = &s.username {
            rs = rs.set_username(u);
        }
        if let Some(p) = &s.password {
            rs = rs.set_password(p);
        }
        info = info.set_redis_settings(rs);
        let client = match tls_certs(s) {
            Some(c) => redis::Client::build_with_tls(info, c)?,
            None => redis::Client::open(info)?,
        };
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2);
        let mut c = client.get_connection_manager_with_config(cfg).await?;
        // A manager connects lazily in places; make sure this one answers.
        redis::cmd("PING").query_async::<()>(&mut c).await?;
        Ok(Conn::One(c))
    }

    /// Run independent single-slot commands concurrently.
    pub(super) async fn all(&self, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        try_join_all(cmds.into_iter().map(|cmd| {
            let mut c = self.clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        }))
        .await
    }

    /// Publish a batch: set members, then removals, then the stream entry.
    pub(super) async fn publish(
        &mut self,
        s: &Settings,
        node: &str,
        recs: &[LogRecord],
        at_ms: u64,
    ) -> RedisResult<()> {
        let mut adds: HashMap<u32, Cmd> = HashMap::new();
        let mut data = Vec::new();
        for r in recs {
            data.extend_from_slice(&encode_log(r.remove, r.t, &r.pairs));
            if r.remove {
                continue;
            }
            for p in &r.pairs {
                let b = bucket(&p.external);
                adds.entry(b)
                    .or_insert_with(|| {
                        let mut c = redis::cmd("ZADD");
                        c.arg(s.set_key(b)).arg("GT");
                        c
                    })
                    .arg(r.t)
                    .arg(member(&p.external, &p.local));
            }
        }
        self.all(adds.into_values().collect()).await?;
        let script = redis::Script::new(REMOVE);
        for r in recs.iter().filter(|r| r.remove) {
            for p in &r.pairs {
                let b = bucket(&p.external);
                script
                    .key(s.set_key(b))
                    .key(s.tomb_key(b))
                    .arg(p.external.as_bytes())
                    .arg(p.local.as_bytes())
                    .arg(r.t)
                    .invoke_async::<Value>(self)
                    .await?;
            }
        }
        redis::cmd("XADD")
            .arg(s.stream_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(s.stream_max_len)
            .arg("*")
            .arg("n")
            .arg(node)
            .arg("at")
            .arg(at_ms)
            .arg("d")
            .arg(data)
            .query_async::<Value>(self)
            .await?;
        Ok(())
    }

    /// Entries after `pos` (waiting up to `block` for one).
    pub(super) async fn read(
        &mut self,
        s: &Settings,
        pos: &str,
        count: usize,
        block: Duration,
    ) -> RedisResult<Vec<Entry>> {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(s.stream_key())
            .arg(pos)
            .query_async(self)
            .await?;
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            for id in k.ids {
                let field = |f: &str| id.map.get(f);
                out.push(Entry {
                    node: field("n").and_then(text_of).unwrap_or_default(),
                    at_ms: field("at")
                        .and_then(text_of)
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0),
                    data: field("d")
                        .and_then(bytes_of)
                        .map(<[u8]>::to_vec)
                        .unwrap_or_default(),
                    id: id.id,
                });
            }
        }
        Ok(out)
    }

    /// The newest id in the stream ("0-0" when empty or missing).
    pub(super) async fn last_id(&mut self, s: &Settings) -> RedisResult<String> {
        let r: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(s.stream_key())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(self)
            .await?;
        Ok(r.ids.into_iter().next().map_or("0-0".into(), |i| i.id))
    }

    /// `None` when the stream does not exist.
    pub(super) async fn stream_info(&mut self, s: &Settings) -> RedisResult<Option<StreamInfo>> {
        let exists: bool = redis::cmd("EXISTS")
            .arg(s.stream_key())
            .query_async(self)
            .await?;
        if !exists {
            return Ok(None);
        }
        let v: Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(s.stream_key())
            .query_async(self)
            .await?;
        let pairs: Vec<(String, Value)> = match v {
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| Some((text_of(kv.first()?)?, kv.get(1)?.clone())))
                .collect(),
            Value::Map(m) => m
                .into_iter()
                .filter_map(|(k, v)| Some((text_of(&k)?, v)))
                .collect(),
            _ => Vec::new(),
        };
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        // Trimming does not move `max-deleted-entry-id` (only XDEL does): the oldest entry
        // left tells whether a position was trimmed away.
        let first = match get("first-entry") {
            Some(Value::Array(e)) => e.first().and_then(text_of),
            _ => None,
        };
        let max_deleted = get("max-deleted-entry-id")
            .and_then(text_of)
            .unwrap_or_else(|| "0-0".into());
        Ok(Some(StreamInfo { first, max_deleted }))
    }

    /// Every bucket's tombstones: (bucket, [(field, time)]).
    async fn tombstones_by_bucket(
        &self,
        s: &Settings,
    ) -> RedisResult<Vec<(u32, Vec<(Vec<u8>, u32)>)>> {
        let cmds = (0..BUCKETS)
            .map(|b| {
                let mut c = redis::cmd("HGETALL");
                c.arg(s.tomb_key(b));
                c
            })
            .collect();
        let mut out = Vec::new();
        for (b, v) in (0..BUCKETS).zip(self.all(cmds).await?) {
            let flat: Vec<(Vec<u8>, String)> = redis::from_redis_value(v)?;
            let fields = flat
                .into_iter()
                .filter_map(|(f, t)| Some((f, t.parse::<u32>().ok()?)))
                .collect();
            out.push((b, fields));
        }
        Ok(out)
    }

    /// Every tombstone: (external, local or "") → time.
    pub(super) async fn load_tombstones(
        &mut self,
        s: &Settings,
    ) -> RedisResult<HashMap<(String, String), u32>> {
        let mut out = HashMap::new();
        for (_, fields) in self.tombstones_by_bucket(s).await? {
            for (f, t) in fields {
                if let Some((e, l)) = super::split_member(&f) {
                    out.insert((e.to_string(), l.to_string()), t);
                }
            }
        }
        Ok(out)
    }

    /// Every member of a bucket's set with its `last_sent` (`ZSCAN`: whatever is there for the
    /// whole scan is returned).
    pub(super) async fn scan_set(
        &mut self,
        s: &Settings,
        b: u32,
    ) -> RedisResult<Vec<(Vec<u8>, u32)>> {
        let key = s.set_key(b);
        let mut cursor = "0".to_string();
        let mut out = Vec::new();
        loop {
            let (next, items): (String, Vec<Vec<u8>>) = redis::cmd("ZSCAN")
                .arg(&key)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(self)
                .await?;
            let mut it = items.into_iter();
            while let (Some(m), Some(score)) = (it.next(), it.next()) {
                let t = std::str::from_utf8(&score)
                    .ok()
                    .and_then(|x| x.parse::<f64>().ok())
                    .map_or(0, |x| x.clamp(0.0, f64::from(u32::MAX)) as u32);
                out.push((m, t));
            }
            if next == "0" {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Remove set members last sent before `cutoff` and older tombstones.
    pub(super) async fn expire(&mut self, s: &Settings, cutoff: u32) -> RedisResult<()> {
        let cmds = (0..BUCKETS)
            .map(|b| {
                let mut c = redis::cmd("ZREMRANGEBYSCORE");
                c.arg(s.set_key(b)).arg("-inf").arg(format!("({cutoff}"));
                c
            })
            .collect();
        self.all(cmds).await?;
        let mut dels = Vec::new();
        for (b, fields) in self.tombstones_by_bucket(s).await? {
            let old: Vec<Vec<u8>> = fields
                .into_iter()
                .filter(|&(_, t)| t < cutoff)
                .map(|(f, _)| f)
                .collect();
            if !old.is_empty() {
                let mut c = redis::cmd("HDEL");
                c.arg(s.tomb_key(b)).arg(old);
                dels.push(c);
            }
        }
        self.all(dels).await?;
        Ok(())
    }
}
