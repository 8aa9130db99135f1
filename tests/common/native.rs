//! Native-mode helpers shared by the native pair tests: options, status polling, "the pair
//! formed" and a logical comparison of both Redis (every db: type, content, TTL class) that
//! tolerates a Redis in the middle of a sync (it just polls again).

use std::collections::BTreeMap;
use std::time::Duration;

use super::pair::{conn_with_timeout, parse_status, Pair, PairOpts, Status};
use super::wait_until;

/// How long a pair may take to form (or re-form after a disturbance).
pub const FORM_TIMEOUT: Duration = Duration::from_secs(20);

pub fn native(write_ack: &'static str) -> PairOpts {
    PairOpts { mode: "native", write_ack, ..PairOpts::default() }
}

/// `RESPLICA STATUS` through a sidecar's client port, or `None` when it does not answer.
pub fn status_of(port: u16) -> Option<Status> {
    let mut c = conn_with_timeout(port, Duration::from_secs(2)).ok()?;
    let text: String = redis::cmd("RESPLICA").arg("STATUS").query(&mut c).ok()?;
    Some(parse_status(&text))
}

/// Both statuses, for failure messages.
pub fn statuses(pair: &Pair) -> String {
    format!(
        "a: {}\nb: {}",
        status_of(pair.a.port).map(|s| s.raw).unwrap_or_else(|| "(no answer)".into()),
        status_of(pair.b.port).map(|s| s.raw).unwrap_or_else(|| "(no answer)".into())
    )
}

/// Whether `primary`'s sidecar is primary, the other's is its replica with the link up, and
/// both say so.
pub fn is_formed(pair: &Pair, primary: &str) -> bool {
    let (Some(a), Some(b)) = (status_of(pair.a.port), status_of(pair.b.port)) else { return false };
    a.get("primary") == primary
        && b.get("primary") == primary
        && a.get("replica_link") == "up"
        && b.get("replica_link") == "up"
}

/// Wait until `is_formed`; panic with both statuses on timeout.
pub fn wait_formed(pair: &Pair, primary: &str, timeout: Duration) {
    if !wait_until(timeout, || is_formed(pair, primary)) {
        panic!("pair did not form with {primary} primary within {timeout:?}\n{}", statuses(pair));
    }
}

/// Wait until both sidecars agree on a primary with the replica linked; returns its id.
pub fn wait_formed_any(pair: &Pair, timeout: Duration) -> String {
    let mut who = String::new();
    let ok = wait_until(timeout, || {
        let (Some(a), Some(b)) = (status_of(pair.a.port), status_of(pair.b.port)) else { return false };
        who = a.get("primary").to_string();
        !who.is_empty() && b.get("primary") == who && a.get("replica_link") == "up" && b.get("replica_link") == "up"
    });
    if !ok {
        panic!("pair did not form within {timeout:?}\n{}", statuses(pair));
    }
    who
}

/// `role:` of `INFO replication` ("master" / "slave"), "" when it does not answer.
pub fn role_of(conn: &mut redis::Connection) -> String {
    let info: String = redis::cmd("INFO").arg("replication").query(conn).unwrap_or_default();
    info.lines().find_map(|l| l.strip_prefix("role:")).unwrap_or("").trim().to_string()
}

/// `role:` of the Redis on `port`, "" when it does not answer.
pub fn redis_role(port: u16) -> String {
    match conn_with_timeout(port, Duration::from_secs(2)) {
        Ok(mut c) => role_of(&mut c),
        Err(_) => String::new(),
    }
}

/// One key's logical content: (type, content, has a TTL).
pub type Content = (String, String, bool);
/// (db, key) → content.
pub type Data = BTreeMap<(i64, Vec<u8>), Content>;

fn q<T: redis::FromRedisValue>(c: &mut redis::Connection, cmd: &mut redis::Cmd) -> Result<T, String> {
    cmd.query(c).map_err(|e| e.to_string())
}

/// Every key of every db of the Redis on `port`, read directly; `Err` when it does not
/// answer properly now (down, loading a full sync).
pub fn data_of(port: u16) -> Result<Data, String> {
    let mut c = conn_with_timeout(port, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let info: String = q(&mut c, redis::cmd("INFO").arg("keyspace"))?;
    let dbs: Vec<i64> = info
        .lines()
        .filter_map(|l| l.strip_prefix("db"))
        .filter_map(|l| l.split(':').next())
        .filter_map(|n| n.parse().ok())
        .collect();
    let mut out = Data::new();
    for db in dbs {
        let _: () = q(&mut c, redis::cmd("SELECT").arg(db))?;
        let keys: Vec<Vec<u8>> = q(&mut c, redis::cmd("KEYS").arg("*"))?;
        for key in keys {
            let kind: String = q(&mut c, redis::cmd("TYPE").arg(&key))?;
            let show = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
            let content = match kind.as_str() {
                "none" => continue,
                "string" => {
                    let v: Option<Vec<u8>> = q(&mut c, redis::cmd("GET").arg(&key))?;
                    v.map(|v| show(&v)).unwrap_or_default()
                }
                "list" => {
                    let v: Vec<Vec<u8>> = q(&mut c, redis::cmd("LRANGE").arg(&key).arg(0).arg(-1))?;
                    format!("{:?}", v.iter().map(|x| show(x)).collect::<Vec<_>>())
                }
                "set" => {
                    let mut v: Vec<Vec<u8>> = q(&mut c, redis::cmd("SMEMBERS").arg(&key))?;
                    v.sort();
                    format!("{:?}", v.iter().map(|x| show(x)).collect::<Vec<_>>())
                }
                "hash" => {
                    let v: Vec<Vec<u8>> = q(&mut c, redis::cmd("HGETALL").arg(&key))?;
                    let mut pairs: Vec<String> =
                        v.chunks(2).map(|p| format!("{}={}", show(&p[0]), show(&p[1]))).collect();
                    pairs.sort();
                    format!("{pairs:?}")
                }
                "zset" => {
                    let v: Vec<Vec<u8>> = q(&mut c, redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).arg("WITHSCORES"))?;
                    format!("{:?}", v.iter().map(|x| show(x)).collect::<Vec<_>>())
                }
                other => {
                    let v: Vec<u8> = q(&mut c, redis::cmd("DUMP").arg(&key))?;
                    format!("{other} {v:?}")
                }
            };
            let pttl: i64 = q(&mut c, redis::cmd("PTTL").arg(&key))?;
            if pttl == -2 {
                continue; // expired meanwhile
            }
            out.insert((db, key), (kind, content, pttl >= 0));
        }
    }
    Ok(out)
}

/// The differences between two datasets (a summary, then up to `max` keys); empty when equal.
pub fn diff(a: &Data, b: &Data, max: usize) -> Vec<String> {
    let keys: std::collections::BTreeSet<&(i64, Vec<u8>)> = a.keys().chain(b.keys()).collect();
    let mut lines = Vec::new();
    let mut n = 0;
    for k in keys {
        let (va, vb) = (a.get(k), b.get(k));
        if va == vb {
            continue;
        }
        n += 1;
        if n <= max {
            lines.push(format!("  db{} {:?}: a={va:?} b={vb:?}", k.0, String::from_utf8_lossy(&k.1)));
        }
    }
    if n > 0 {
        lines.insert(0, format!("{n} keys differ (a has {} keys, b has {})", a.len(), b.len()));
    }
    lines
}

/// Wait until both Redis hold the same data (every db: type, content, TTL class), polling
/// while replication catches up; panic with the differences on timeout. Returns the data.
pub fn wait_equal(pair: &Pair, timeout: Duration) -> Data {
    let mut last = Vec::new();
    let mut data = Data::new();
    let ok = wait_until(timeout, || match (data_of(pair.a.redis.port), data_of(pair.b.redis.port)) {
        (Ok(a), Ok(b)) => {
            last = diff(&a, &b, 8);
            data = a;
            last.is_empty()
        }
        (a, b) => {
            last = vec![format!("a: {:?}, b: {:?}", a.err(), b.err())];
            false
        }
    });
    assert!(ok, "the two Redis differ after {timeout:?}:\n{}\n{}", last.join("\n"), statuses(pair));
    data
}
