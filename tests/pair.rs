//! Active-active pair mode (spec/PAIR_INTERFACE.md, DESIGN.md "core invariants"): two real
//! Redis, two real sidecars, clients on both. Every test checks both Redis directly, not only
//! what the sidecars answer.
//!
//! Run with `cargo test --test pair -- --test-threads=1` for stable timings (each test starts
//! two Redis and two sidecars with two runtime threads each).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::pair::*;
use common::*;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// xorshift64*: deterministic per-thread randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn get(con: &mut redis::Connection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query(con).unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

fn set(con: &mut redis::Connection, key: &str, val: &str) {
    let r: String = redis::cmd("SET").arg(key).arg(val).query(con).unwrap_or_else(|e| panic!("SET {key}: {e}"));
    assert_eq!(r, "OK", "SET {key}");
}

fn direct_get(r: &RedisServer, key: &str) -> Option<String> {
    get(&mut r.conn(), key)
}

fn pexpiretime(r: &RedisServer, key: &str) -> i64 {
    redis::cmd("PEXPIRETIME").arg(key).query(&mut r.conn()).expect("PEXPIRETIME")
}

fn info_field(r: &RedisServer, section: &str, field: &str) -> i64 {
    let info: String = redis::cmd("INFO").arg(section).query(&mut r.conn()).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has no {field}: {info}"))
}

/// Every (key, value) is on both Redis with that value; panics listing the first few that
/// are not.
fn assert_acked_on_both(pair: &Pair, acked: &[(String, u64)]) {
    for n in pair.nodes() {
        let mut c = n.redis.conn();
        let mut bad = Vec::new();
        let mut bad_count = 0;
        for chunk in acked.chunks(500) {
            let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
            let vals: Vec<Option<u64>> = redis::cmd("MGET").arg(&keys).query(&mut c).expect("MGET");
            for ((k, want), got) in chunk.iter().zip(vals) {
                if got != Some(*want) {
                    bad_count += 1;
                    if bad.len() < 10 {
                        bad.push(format!("{k}: want {want}, got {got:?}"));
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{bad_count} of {} acknowledged writes missing or wrong on {}'s Redis (:{}): {bad:?}\n{}",
            acked.len(),
            n.id,
            n.redis.port,
            pair.dump()
        );
    }
}

/// One client thread of a `SetLoad`: what it saw.
#[derive(Debug, Default)]
struct Report {
    node: String,
    worker: usize,
    /// SETs answered OK (key, value).
    acked: Vec<(String, u64)>,
    /// Errors (time since the load started, text): first 50.
    errors: Vec<(Duration, String)>,
    error_count: usize,
    /// The last error, when more than 50 happened.
    last_error: Option<(Duration, String)>,
    /// Read-your-writes violations: a GET on the same connection right after an OK'd SET
    /// returned something else.
    violations: Vec<String>,
}

/// Client threads writing unique keys (`SET prefix:node:worker:i i`) through given sidecars,
/// each followed by a GET on the same connection.
struct SetLoad {
    stop: Arc<AtomicBool>,
    oks: Arc<Vec<AtomicU64>>,
    nodes: Vec<String>,
    handles: Vec<JoinHandle<Report>>,
    start: Instant,
}

impl SetLoad {
    fn start(prefix: &str, targets: &[(&str, u16)]) -> SetLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let oks: Arc<Vec<AtomicU64>> = Arc::new(targets.iter().map(|_| AtomicU64::new(0)).collect());
        let start = Instant::now();
        let mut handles = Vec::new();
        for (w, (node, port)) in targets.iter().enumerate() {
            let (stop, oks, node, port, prefix) =
                (stop.clone(), oks.clone(), node.to_string(), *port, prefix.to_string());
            handles.push(std::thread::spawn(move || {
                let mut rep = Report { node: node.clone(), worker: w, ..Report::default() };
                let err = |rep: &mut Report, e: String| {
                    rep.error_count += 1;
                    if rep.errors.len() < 50 {
                        rep.errors.push((start.elapsed(), e));
                    } else {
                        rep.last_error = Some((start.elapsed(), e));
                    }
                };
                let mut con: Option<redis::Connection> = None;
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if con.is_none() {
                        match conn_with_timeout(port, Duration::from_secs(5)) {
                            Ok(c) => con = Some(c),
                            Err(e) => {
                                err(&mut rep, format!("connect: {e}"));
                                // Reconnect backoff (not synchronization).
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                        }
                    }
                    let c = con.as_mut().unwrap();
                    i += 1;
                    let key = format!("{prefix}:{node}:{w}:{i}");
                    match redis::cmd("SET").arg(&key).arg(i).query::<String>(c) {
                        Ok(r) if r == "OK" => {
                            rep.acked.push((key.clone(), i));
                            oks[w].fetch_add(1, Ordering::SeqCst);
                            match redis::cmd("GET").arg(&key).query::<Option<u64>>(c) {
                                Ok(Some(v)) if v == i => {}
                                Ok(other) => rep.violations.push(format!(
                                    "{:?}: GET {key} right after SET {i} (OK) returned {other:?}",
                                    start.elapsed()
                                )),
                                Err(e) => {
                                    let drop = e.is_io_error() || e.is_timeout() || e.is_connection_dropped();
                                    err(&mut rep, format!("GET {key}: {e}"));
                                    if drop {
                                        con = None;
                                    }
                                }
                            }
                        }
                        Ok(r) => err(&mut rep, format!("SET {key}: unexpected reply {r:?}")),
                        Err(e) => {
                            let drop = e.is_io_error() || e.is_timeout() || e.is_connection_dropped();
                            err(&mut rep, format!("SET {key}: {e}"));
                            if drop {
                                con = None;
                            }
                        }
                    }
                }
                rep
            }));
        }
        SetLoad { stop, oks, nodes: targets.iter().map(|(n, _)| n.to_string()).collect(), handles, start }
    }

    fn counts(&self) -> Vec<u64> {
        self.oks.iter().map(|c| c.load(Ordering::SeqCst)).collect()
    }

    /// Wait until every worker on `node` has `n` more OKs than now.
    fn wait_progress(&self, node: &str, n: u64, timeout: Duration) -> bool {
        let base = self.counts();
        wait_until(timeout, || {
            let now = self.counts();
            self.nodes.iter().enumerate().filter(|(_, nd)| nd.as_str() == node).all(|(i, _)| now[i] >= base[i] + n)
        })
    }

    fn finish(self) -> Vec<Report> {
        self.stop.store(true, Ordering::SeqCst);
        self.handles.into_iter().map(|h| h.join().expect("load worker panicked")).collect()
    }
}

fn print_reports(reps: &[Report]) {
    for r in reps {
        eprintln!(
            "worker {} via {}: {} acked, {} errors, {} read-your-writes violations; errors: {:?}",
            r.worker,
            r.node,
            r.acked.len(),
            r.error_count,
            r.violations.len(),
            r.errors.iter().take(6).collect::<Vec<_>>()
        );
    }
}

/// "n errors between t1 and t2: first ..., last ..." for a worker's errors.
fn error_summary(r: &Report) -> String {
    let Some(first) = r.errors.first() else { return "no errors".into() };
    let last = r.last_error.as_ref().or(r.errors.last()).unwrap();
    format!(
        "worker {} via {}: {} errors from {:?} to {:?}; first: {}; last: {}",
        r.worker, r.node, r.error_count, first.0, last.0, first.1, last.1
    )
}

fn all_acked(reps: &[Report]) -> Vec<(String, u64)> {
    reps.iter().flat_map(|r| r.acked.iter().cloned()).collect()
}

fn assert_no_violations(reps: &[Report]) {
    let v: Vec<&String> = reps.iter().flat_map(|r| r.violations.iter()).collect();
    assert!(v.is_empty(), "read-your-writes violated ({} times): {:?}", v.len(), &v[..v.len().min(10)]);
}

// ---------------------------------------------------------------------------------------
// Basics
// ---------------------------------------------------------------------------------------

#[test]
fn write_through_one_sidecar_read_through_the_other() {
    let pair = Pair::start();
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());

    set(&mut ca, "basic:from-a", "va");
    assert_eq!(get(&mut cb, "basic:from-a").as_deref(), Some("va"), "read through b after a write through a");
    set(&mut cb, "basic:from-b", "vb");
    assert_eq!(get(&mut ca, "basic:from-b").as_deref(), Some("vb"), "read through a after a write through b");
    // Read-your-writes on the follower's connection.
    set(&mut cb, "basic:from-b", "vb2");
    assert_eq!(get(&mut cb, "basic:from-b").as_deref(), Some("vb2"), "read-your-writes through b");

    // write_ack = all: both Redis hold every acknowledged write, no waiting.
    for n in pair.nodes() {
        assert_eq!(direct_get(&n.redis, "basic:from-a").as_deref(), Some("va"), "{}'s Redis", n.id);
        assert_eq!(direct_get(&n.redis, "basic:from-b").as_deref(), Some("vb2"), "{}'s Redis", n.id);
    }

    // A pipeline of writes through b, then reads through a.
    let mut p = redis::pipe();
    for i in 0..200 {
        p.cmd("SET").arg(format!("basic:p:{i}")).arg(i).ignore();
    }
    let _: () = p.query(&mut cb).expect("pipelined SETs through b");
    let keys: Vec<String> = (0..200).map(|i| format!("basic:p:{i}")).collect();
    let want: Vec<Option<u64>> = (0..200).map(Some).collect();
    let got: Vec<Option<u64>> = redis::cmd("MGET").arg(&keys).query(&mut ca).expect("MGET through a");
    assert_eq!(got, want, "pipelined writes through b, read through a");
    for n in pair.nodes() {
        let got: Vec<Option<u64>> = redis::cmd("MGET").arg(&keys).query(&mut n.redis_conn()).unwrap();
        assert_eq!(got, want, "{}'s Redis", n.id);
    }
    pair.assert_converged();
}

#[test]
fn status_command_and_cli() {
    let pair = Pair::start();
    // The writer's view of the peer's role comes with the peer's heartbeats: it may lag the
    // peer's own status for a moment.
    let t = Instant::now();
    let seen = wait_until(Duration::from_secs(3), || {
        pair.a.status().is_ok_and(|s| s.peer("b").is_some_and(|p| p.get("role") == "follower"))
    });
    eprintln!("a reported peer b role=follower {:?} after the pair was in sync ({seen})", t.elapsed());
    let sa = pair.a.status().expect("RESPLICA STATUS through a");
    assert_eq!(sa.get("node"), "a", "{}", sa.raw);
    assert_eq!(sa.role(), "writer", "{}", sa.raw);
    assert_eq!(sa.get("writer"), "a", "{}", sa.raw);
    assert_eq!(sa.get("priority"), "100", "{}", sa.raw);
    assert!(sa.num("epoch") >= 0, "epoch is a number: {}", sa.raw);
    let pb = sa.peer("b").unwrap_or_else(|| panic!("a lists no peer b: {}", sa.raw));
    assert_eq!(pb.get("link"), "up", "{}", sa.raw);
    assert_eq!(pb.get("role"), "follower", "{}", sa.raw);
    assert_eq!(pb.get("priority"), "90", "{}", sa.raw);
    for id in ["a", "b"] {
        let r = sa.replica(id).unwrap_or_else(|| panic!("a lists no replica {id}: {}", sa.raw));
        assert_eq!(r.get("state"), "in_sync", "{}", sa.raw);
        assert_eq!(r.get("redis"), pair.node(id).redis.addr(), "{}", sa.raw);
    }
    assert!(sa.replica("b").unwrap().num("resyncs") >= 0, "resyncs is a number: {}", sa.raw);
    assert!(sa.num("merged_keys") >= 0 && sa.num("conflict_keys") >= 0, "{}", sa.raw);

    let sb = pair.b.status().expect("RESPLICA STATUS through b");
    assert_eq!(sb.get("node"), "b", "{}", sb.raw);
    assert_eq!(sb.role(), "follower", "{}", sb.raw);
    assert_eq!(sb.get("writer"), "a", "{}", sb.raw);
    assert_eq!(sb.get("priority"), "90", "{}", sb.raw);
    assert_eq!(sb.peer("a").map(|p| p.get("link").to_string()).as_deref(), Some("up"), "{}", sb.raw);
    // An in-sync follower serves reads from its own Redis.
    assert!(
        wait_until(Duration::from_secs(5), || pair.b.status().is_ok_and(|s| s.get("local_in_sync") == "1")),
        "b never reports local_in_sync:1\n{}",
        pair.dump()
    );

    // The same text from the admin port, through the CLI.
    for n in pair.nodes() {
        let s = admin_status(&n.admin_addr()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.get("node"), n.id, "{}", s.raw);
        assert_eq!(s.role(), if n.id == "a" { "writer" } else { "follower" }, "{}", s.raw);
        assert!(s.raw.lines().any(|l| l.starts_with("role:")), "{}", s.raw);
    }
    // Unreachable admin address: exit code 1.
    let dead = format!("127.0.0.1:{}", free_port());
    let (code, out, err) = run_cli(&["status", "--admin", &dead], Duration::from_secs(10));
    assert_eq!(code, Some(1), "status against a dead address: stdout {out:?} stderr {err:?}");
}

// ---------------------------------------------------------------------------------------
// Convergence under concurrent clients on both sidecars
// ---------------------------------------------------------------------------------------

struct Mixed {
    incr_replies: Vec<i64>,
    errors: Vec<String>,
    error_count: usize,
    ops: u64,
    /// The slowest command and how long its reply took.
    slowest: (Duration, String),
}

/// `threads` clients split across both sidecars for `dur`, on overlapping keys; every
/// iteration also INCRs `conv:counter`.
fn mixed_workload(pair: &Pair, threads: usize, dur: Duration) -> Mixed {
    let ports = [pair.a.port, pair.b.port];
    let start = Instant::now();
    let handles: Vec<JoinHandle<Mixed>> = (0..threads)
        .map(|t| {
            let port = ports[t % 2];
            std::thread::spawn(move || {
                let mut c = redis_conn(port, None);
                let mut rng = Rng::new(t as u64 + 1);
                let mut out = Mixed {
                    incr_replies: Vec::new(),
                    errors: Vec::new(),
                    error_count: 0,
                    ops: 0,
                    slowest: (Duration::ZERO, String::new()),
                };
                let mut i = 0u64;
                while start.elapsed() < dur {
                    i += 1;
                    let k = rng.below(6);
                    let r = rng.below(1000);
                    let tag = format!("t{t}i{i}");
                    let op = rng.below(17);
                    let op_start = Instant::now();
                    let res: redis::RedisResult<redis::Value> = match op {
                        0 => redis::cmd("SET").arg(format!("conv:s:{k}")).arg(&tag).query(&mut c),
                        1 => redis::cmd("LPUSH").arg(format!("conv:l:{k}")).arg(&tag).query(&mut c),
                        2 => redis::cmd("RPOP").arg(format!("conv:l:{k}")).query(&mut c),
                        3 => redis::cmd("INCR").arg(format!("conv:n:{k}")).query(&mut c),
                        4 => redis::cmd("SADD")
                            .arg(format!("conv:set:{k}"))
                            .arg(format!("m{}", r % 40))
                            .arg(format!("m{}", (r / 40) % 40))
                            .query(&mut c),
                        5 => redis::cmd("SPOP").arg(format!("conv:set:{k}")).query(&mut c),
                        6 => redis::pipe()
                            .atomic()
                            .cmd("INCR")
                            .arg(format!("conv:n:{k}"))
                            .cmd("LPUSH")
                            .arg(format!("conv:l:{k}"))
                            .arg(&tag)
                            .cmd("SET")
                            .arg(format!("conv:s:{k}"))
                            .arg(&tag)
                            .cmd("SPOP")
                            .arg(format!("conv:set:{k}"))
                            .cmd("EXPIRE")
                            .arg(format!("conv:s:{k}"))
                            .arg(500)
                            .query(&mut c),
                        7 => redis::cmd("HSET")
                            .arg(format!("conv:h:{k}"))
                            .arg(format!("f{}", r % 5))
                            .arg(&tag)
                            .query(&mut c),
                        8 => redis::cmd("HINCRBY")
                            .arg(format!("conv:h:{k}"))
                            .arg(format!("c{}", r % 3))
                            .arg(1)
                            .query(&mut c),
                        9 => redis::cmd("ZADD")
                            .arg(format!("conv:z:{k}"))
                            .arg(r % 100)
                            .arg(format!("m{}", r % 10))
                            .query(&mut c),
                        10 => redis::cmd("ZINCRBY")
                            .arg(format!("conv:z:{k}"))
                            .arg(1.5)
                            .arg(format!("m{}", r % 10))
                            .query(&mut c),
                        11 => redis::cmd("SET").arg(format!("conv:e:{k}")).arg(&tag).arg("EX").arg(300).query(&mut c),
                        12 => redis::cmd("EXPIRE").arg(format!("conv:s:{k}")).arg(600).query(&mut c),
                        13 => redis::cmd("INCRBYFLOAT").arg(format!("conv:f:{k}")).arg("0.1").query(&mut c),
                        14 => redis::cmd("SETEX").arg(format!("conv:x:{k}")).arg(400).arg(&tag).query(&mut c),
                        15 => redis::cmd("PEXPIRE").arg(format!("conv:h:{k}")).arg(700_000).query(&mut c),
                        _ => redis::cmd("DEL").arg(format!("conv:l:{k}")).query(&mut c),
                    };
                    out.ops += 1;
                    if op_start.elapsed() > out.slowest.0 {
                        out.slowest = (op_start.elapsed(), format!("op {op} on key #{k} ({res:?})"));
                    }
                    if let Err(e) = res {
                        out.error_count += 1;
                        if out.errors.len() < 10 {
                            out.errors.push(format!("thread {t} op {op}: {e}"));
                        }
                        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                            c = redis_conn(port, None);
                        }
                    }
                    match redis::cmd("INCR").arg("conv:counter").query::<i64>(&mut c) {
                        Ok(v) => out.incr_replies.push(v),
                        Err(e) => {
                            out.error_count += 1;
                            if out.errors.len() < 10 {
                                out.errors.push(format!("thread {t} INCR conv:counter: {e}"));
                            }
                            if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                                c = redis_conn(port, None);
                            }
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut all = Mixed {
        incr_replies: Vec::new(),
        errors: Vec::new(),
        error_count: 0,
        ops: 0,
        slowest: (Duration::ZERO, String::new()),
    };
    for h in handles {
        let m = h.join().expect("client thread panicked");
        all.incr_replies.extend(m.incr_replies);
        all.errors.extend(m.errors);
        all.error_count += m.error_count;
        all.ops += m.ops;
        if m.slowest.0 > all.slowest.0 {
            all.slowest = m.slowest;
        }
    }
    eprintln!(
        "mixed workload: {} ops + {} INCRs, {} errors; slowest reply {:?}: {}",
        all.ops,
        all.incr_replies.len(),
        all.error_count,
        all.slowest.0,
        all.slowest.1
    );
    all
}

/// The writer a's count of full resyncs of b's Redis.
fn resyncs_of_b(pair: &Pair) -> i64 {
    pair.a.status().ok().and_then(|s| s.replica("b").map(|r| r.num("resyncs"))).unwrap_or(-1)
}

/// On a healthy pair no reply waits for a timeout, and b's Redis never drops out of sync (a
/// replica that drops out is acknowledged around under write_ack=all, which would make the
/// "on both Redis when the reply arrives" checks meaningless).
fn assert_healthy_run(pair: &Pair, m: &Mixed, resyncs_before: i64) {
    assert!(
        m.slowest.0 < Duration::from_secs(2),
        "a reply took {:?} on a healthy pair: {}\n{}",
        m.slowest.0,
        m.slowest.1,
        pair.a.log_tail(10)
    );
    let after = resyncs_of_b(pair);
    assert_eq!(
        after,
        resyncs_before,
        "b's Redis dropped out and was resynced during a healthy workload\n{}\n{}",
        pair.dump(),
        pair.a.log_tail(10)
    );
}

fn counter_on(r: &RedisServer) -> i64 {
    redis::cmd("GET").arg("conv:counter").query::<Option<i64>>(&mut r.conn()).expect("GET").unwrap_or(0)
}

fn assert_incrs_distinct(m: &Mixed) {
    let n = m.incr_replies.len() as i64;
    let distinct: BTreeSet<i64> = m.incr_replies.iter().copied().collect();
    assert_eq!(distinct.len() as i64, n, "INCR replies are not all distinct: two clients got the same counter value");
    assert_eq!(distinct.first().copied(), Some(1), "INCR replies start at 1");
    assert_eq!(distinct.last().copied(), Some(n), "INCR replies are exactly 1..={n}");
}

#[test]
fn convergence_mixed_workload_write_ack_local() {
    let pair = Pair::start_with(PairOpts { write_ack: "local", ..PairOpts::default() });
    let m = mixed_workload(&pair, 8, Duration::from_secs(3));
    // How far b lags when the clients stop (write_ack=local lets it fall behind).
    let t = Instant::now();
    let lag = pair.a.status().map(|s| s.replica("b").map(|r| format!("{r:?}"))).unwrap_or_default();
    let caught_up = wait_until(SYNC_TIMEOUT, || pair.check_in_sync().is_ok());
    eprintln!("b's replica line when the load stopped: {lag:?}; in sync {:?} later", t.elapsed());
    assert!(m.errors.is_empty(), "{} errors on a healthy pair: {:?}", m.error_count, m.errors);
    assert!(m.ops > 200, "too few operations ran: {}", m.ops);
    assert!(caught_up, "b did not catch up within {SYNC_TIMEOUT:?}\n{}", pair.dump());
    // A handful of entries behind when the clients stop: catching up takes milliseconds
    // unless the stream to b is stuck (e.g. waiting out a request timeout).
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "b took {:?} to catch up from {lag:?}: the replica stream was stuck\n{}",
        t.elapsed(),
        pair.a.log_tail(20)
    );
    pair.assert_converged();
    let n = m.incr_replies.len() as i64;
    for node in pair.nodes() {
        assert_eq!(counter_on(&node.redis), n, "conv:counter on {}'s Redis vs acknowledged INCRs", node.id);
    }
    assert_incrs_distinct(&m);
}

#[test]
fn convergence_mixed_workload_write_ack_all_counts_every_incr() {
    let pair = Pair::start_with(PairOpts { write_ack: "all", ..PairOpts::default() });
    let resyncs = resyncs_of_b(&pair);
    let m = mixed_workload(&pair, 8, Duration::from_secs(3));
    assert!(m.errors.is_empty(), "{} errors on a healthy pair: {:?}", m.error_count, m.errors);
    assert_healthy_run(&pair, &m, resyncs);
    // write_ack = all: every acknowledged INCR is on both Redis when the reply arrives; checked
    // before waiting for anything.
    let n = m.incr_replies.len() as i64;
    for node in pair.nodes() {
        assert_eq!(
            counter_on(&node.redis),
            n,
            "conv:counter on {}'s Redis right after the last reply vs acknowledged INCRs",
            node.id
        );
    }
    assert_incrs_distinct(&m);
    pair.assert_converged();
}

#[test]
fn multi_key_writes_converge() {
    // Writes that touch keys of several slots (hence several sequencers), racing.
    let pair = Pair::start_with(PairOpts { write_ack: "local", ..PairOpts::default() });
    let ports = [pair.a.port, pair.b.port];
    let start = Instant::now();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let (port, errors) = (ports[t % 2], errors.clone());
            std::thread::spawn(move || {
                let mut c = redis_conn(port, None);
                let mut rng = Rng::new(100 + t as u64);
                let mut i = 0;
                while start.elapsed() < Duration::from_secs(2) {
                    i += 1;
                    let (x, y) = (rng.below(5), rng.below(5));
                    let tag = format!("t{t}i{i}");
                    let res: redis::RedisResult<redis::Value> = match rng.below(6) {
                        0 => redis::cmd("MSET")
                            .arg(format!("mk:s:{x}"))
                            .arg(&tag)
                            .arg(format!("mk:s:{y}"))
                            .arg(&tag)
                            .query(&mut c),
                        1 => redis::cmd("DEL").arg(format!("mk:s:{x}")).arg(format!("mk:l:{y}")).query(&mut c),
                        2 => redis::cmd("RPUSH").arg(format!("mk:l:{x}")).arg(&tag).query(&mut c),
                        3 => redis::cmd("LMOVE")
                            .arg(format!("mk:l:{x}"))
                            .arg(format!("mk:l:{y}"))
                            .arg("LEFT")
                            .arg("RIGHT")
                            .query(&mut c),
                        4 => redis::cmd("SADD").arg(format!("mk:set:{x}")).arg(&tag).query(&mut c),
                        _ => redis::cmd("SUNIONSTORE")
                            .arg(format!("mk:set:{x}"))
                            .arg(format!("mk:set:{x}"))
                            .arg(format!("mk:set:{y}"))
                            .query(&mut c),
                    };
                    if let Err(e) = res {
                        errors.lock().unwrap().push(format!("thread {t}: {e}"));
                        break;
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(errors.is_empty(), "errors: {errors:?}");
    pair.assert_converged();
}

#[test]
fn xadd_with_auto_ids_is_identical_on_both() {
    let pair = Pair::start();
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    let mut ids = Vec::new();
    for i in 0..50 {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        let id: String = redis::cmd("XADD").arg("xs:stream").arg("*").arg("i").arg(i).query(c).expect("XADD");
        ids.push(id);
    }
    let _: i64 = redis::cmd("XTRIM").arg("xs:stream").arg("MAXLEN").arg(40).query(&mut cb).expect("XTRIM");
    for n in pair.nodes() {
        let v: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XRANGE").arg("xs:stream").arg("-").arg("+").query(&mut n.redis_conn()).expect("XRANGE");
        let got: Vec<&String> = v.iter().map(|(id, _)| id).collect();
        let want: Vec<&String> = ids[10..].iter().collect();
        assert_eq!(got, want, "stream ids on {}'s Redis are the ones the clients were given", n.id);
    }
    pair.assert_converged();
}

// ---------------------------------------------------------------------------------------
// Non-deterministic commands and expiry
// ---------------------------------------------------------------------------------------

#[test]
fn expire_is_shipped_as_absolute_time() {
    let pair = Pair::start_with(PairOpts { write_ack: "local", ..PairOpts::default() });
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    let both_have = |key: &str| {
        let ok = wait_until(Duration::from_secs(5), || pair.nodes().iter().all(|n| pexpiretime(&n.redis, key) > 0));
        assert!(ok, "{key} with a TTL did not reach both Redis\n{}", pair.dump());
        let (ea, eb) = (pexpiretime(&pair.a.redis, key), pexpiretime(&pair.b.redis, key));
        (ea, eb)
    };
    let t0 = now_ms();
    let _: () = redis::cmd("SET").arg("exp:set").arg("v").arg("EX").arg(100).query(&mut ca).unwrap();
    set(&mut cb, "exp:expire", "v");
    let _: i64 = redis::cmd("EXPIRE").arg("exp:expire").arg(200).query(&mut cb).unwrap();
    let _: () = redis::cmd("SETEX").arg("exp:setex").arg(300).arg("v").query(&mut cb).unwrap();
    let _: () = redis::cmd("PSETEX").arg("exp:psetex").arg(400_000).arg("v").query(&mut ca).unwrap();
    let _: Option<String> = redis::cmd("GETEX").arg("exp:set").arg("EX").arg(500).query(&mut cb).unwrap();
    for (key, secs) in [("exp:set", 500), ("exp:expire", 200), ("exp:setex", 300), ("exp:psetex", 400)] {
        let (ea, eb) = both_have(key);
        assert!((ea - eb).abs() < 1000, "{key}: expiry on a {ea} vs b {eb} ({} ms apart)", (ea - eb).abs());
        let want = t0 + secs * 1000;
        assert!((ea - want).abs() < 3000, "{key}: expires at {ea}, expected about {want}");
    }

    // Make b's Redis apply late: with relative TTLs shipped, its key would expire later by
    // the delay. (The sleep creates the delay; it synchronizes nothing.)
    pair.b.redis.stop();
    let _: () = redis::cmd("SET").arg("exp:late").arg("v").arg("EX").arg(100).query(&mut ca).unwrap();
    let _: i64 = redis::cmd("EXPIRE").arg("exp:set").arg(50).query(&mut ca).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    pair.b.redis.cont();
    let (ea, eb) = both_have("exp:late");
    assert!(
        (ea - eb).abs() < 500,
        "SET EX applied 1.5 s late on b: expiry on a {ea} vs b {eb} ({} ms apart): relative TTL shipped?",
        (ea - eb).abs()
    );
    assert!(
        wait_until(Duration::from_secs(5), || (pexpiretime(&pair.a.redis, "exp:set")
            - pexpiretime(&pair.b.redis, "exp:set"))
        .abs()
            < 500),
        "EXPIRE applied 1.5 s late on b: a {} vs b {}",
        pexpiretime(&pair.a.redis, "exp:set"),
        pexpiretime(&pair.b.redis, "exp:set")
    );
    pair.assert_converged();
}

#[test]
fn spop_through_both_sidecars_pops_each_member_once() {
    let pair = Pair::start();
    let members: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let _: i64 = redis::cmd("SADD").arg("sp:set").arg(&members).query(&mut pair.a.conn()).unwrap();
    let handles: Vec<_> = [pair.a.port, pair.b.port, pair.a.port, pair.b.port]
        .into_iter()
        .enumerate()
        .map(|(t, port)| {
            std::thread::spawn(move || {
                let mut c = redis_conn(port, None);
                let mut got = Vec::new();
                loop {
                    // Alternate single pops and pops with a count.
                    let v: Vec<String> = if t % 2 == 0 {
                        redis::cmd("SPOP").arg("sp:set").query::<Option<String>>(&mut c).unwrap().into_iter().collect()
                    } else {
                        redis::cmd("SPOP").arg("sp:set").arg(3).query(&mut c).unwrap()
                    };
                    if v.is_empty() {
                        return got;
                    }
                    got.extend(v);
                }
            })
        })
        .collect();
    let mut popped = Vec::new();
    for h in handles {
        popped.extend(h.join().unwrap());
    }
    let distinct: HashSet<&String> = popped.iter().collect();
    assert_eq!(distinct.len(), popped.len(), "a member was popped twice");
    assert_eq!(distinct, members.iter().collect::<HashSet<_>>(), "every member popped");
    for n in pair.nodes() {
        let left: i64 = redis::cmd("SCARD").arg("sp:set").query(&mut n.redis_conn()).unwrap();
        assert_eq!(left, 0, "members left on {}'s Redis", n.id);
    }
    pair.assert_converged();

    // An SPOP that pops nothing (missing key, or a count on an empty set) is answered at once,
    // and leaves the replication streams flowing.
    let mut slow = Vec::new();
    for n in pair.nodes() {
        let mut c = conn_with_timeout(n.port, Duration::from_secs(10)).unwrap();
        for args in [&["sp:set"][..], &["sp:set", "3"][..], &["sp:missing"][..]] {
            let t = Instant::now();
            let r: redis::Value = redis::cmd("SPOP").arg(args).query(&mut c).unwrap();
            let took = t.elapsed();
            if took > Duration::from_secs(1) {
                slow.push(format!("SPOP {args:?} through {} answered {r:?} after {took:?}", n.id));
            }
        }
    }
    set(&mut pair.a.conn(), "sp:after", "x");
    assert!(slow.is_empty(), "empty SPOPs under write_ack=all: {slow:?}\n{}", pair.dump());
    pair.assert_converged();
}

#[test]
fn watch_sees_writes_through_the_other_sidecar() {
    let pair = Pair::start();
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    set(&mut ca, "w:k", "start");
    let _: () = redis::cmd("WATCH").arg("w:k").query(&mut cb).unwrap();
    assert_eq!(get(&mut cb, "w:k").as_deref(), Some("start"));
    set(&mut ca, "w:k", "other"); // through the other sidecar, after the WATCH
    let _: () = redis::cmd("MULTI").query(&mut cb).unwrap();
    let q: String = redis::cmd("SET").arg("w:k").arg("mine").query(&mut cb).unwrap();
    assert_eq!(q, "QUEUED");
    let r: redis::Value = redis::cmd("EXEC").query(&mut cb).unwrap();
    assert_eq!(r, redis::Value::Nil, "EXEC must abort: the watched key changed through a");
    for n in pair.nodes() {
        assert_eq!(direct_get(&n.redis, "w:k").as_deref(), Some("other"), "{}'s Redis", n.id);
    }
    // Undisturbed, the same transaction commits on both.
    let _: () = redis::cmd("WATCH").arg("w:k").query(&mut cb).unwrap();
    let _: () = redis::cmd("MULTI").query(&mut cb).unwrap();
    let _: String = redis::cmd("SET").arg("w:k").arg("mine").query(&mut cb).unwrap();
    let _: String = redis::cmd("INCR").arg("w:n").query(&mut cb).unwrap();
    let r: Vec<redis::Value> = redis::cmd("EXEC").query(&mut cb).unwrap();
    assert_eq!(r.len(), 2, "{r:?}");
    for n in pair.nodes() {
        assert_eq!(direct_get(&n.redis, "w:k").as_deref(), Some("mine"), "{}'s Redis", n.id);
        assert_eq!(direct_get(&n.redis, "w:n").as_deref(), Some("1"), "{}'s Redis", n.id);
    }
    pair.assert_converged();
}

// ---------------------------------------------------------------------------------------
// Blocking pops, pub/sub, FLUSHALL, SELECT
// ---------------------------------------------------------------------------------------

#[test]
fn blocking_pop_woken_by_push_through_the_other_sidecar() {
    let pair = Pair::start();
    for (waiter, pusher) in [(&pair.b, &pair.a), (&pair.a, &pair.b)] {
        let key = format!("bl:{}", waiter.id);
        let port = waiter.port;
        let k = key.clone();
        let h = std::thread::spawn(move || {
            let mut c = redis_conn(port, None);
            let t = Instant::now();
            let r: Option<(String, String)> = redis::cmd("BLPOP").arg(&k).arg(10).query(&mut c).expect("BLPOP");
            (r, t.elapsed())
        });
        // Let the pop block first where that is visible (a Redis with a blocked client); a
        // sidecar may also hold it itself, so this is a bounded best effort.
        let seen = wait_until(Duration::from_secs(2), || {
            pair.nodes().iter().any(|n| info_field(&n.redis, "clients", "blocked_clients") > 0)
        });
        eprintln!("BLPOP via {}: blocked client visible in a Redis: {seen}", waiter.id);
        let _: i64 = redis::cmd("RPUSH").arg(&key).arg("wake").query(&mut pusher.conn()).unwrap();
        let (r, took) = h.join().unwrap();
        assert_eq!(
            r,
            Some((key.clone(), "wake".to_string())),
            "BLPOP through {} woken by RPUSH through {}",
            waiter.id,
            pusher.id
        );
        assert!(took < Duration::from_secs(9), "BLPOP took {took:?}");
        let empty = wait_until(Duration::from_secs(5), || {
            pair.nodes().iter().all(|n| redis::cmd("LLEN").arg(&key).query::<i64>(&mut n.redis_conn()).unwrap() == 0)
        });
        assert!(
            empty,
            "list {key} not empty on both Redis after the pop: a {} b {}",
            redis::cmd("LLEN").arg(&key).query::<i64>(&mut pair.a.redis_conn()).unwrap(),
            redis::cmd("LLEN").arg(&key).query::<i64>(&mut pair.b.redis_conn()).unwrap()
        );
    }
    pair.assert_converged();
}

#[test]
fn pubsub_subscribers_on_both_sidecars_get_each_message_once() {
    let pair = Pair::start();
    let mut subs: Vec<(String, redis::Connection)> = pair.nodes().iter().map(|n| (n.id.clone(), n.conn())).collect();
    let mut pubsubs: Vec<(String, redis::PubSub)> = subs
        .iter_mut()
        .map(|(id, c)| {
            let mut ps = c.as_pubsub();
            ps.subscribe("ps:ch").expect("SUBSCRIBE");
            ps.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            (id.clone(), ps)
        })
        .collect();
    let sent = ["m1", "m2", "m3", "m4", "end"];
    let via = [&pair.a, &pair.a, &pair.b, &pair.b, &pair.a];
    for (m, n) in sent.iter().zip(via) {
        let _: i64 = redis::cmd("PUBLISH").arg("ps:ch").arg(*m).query(&mut n.conn()).expect("PUBLISH");
    }
    // Each subscriber gets exactly the sequence: a duplicate would show up in place of the
    // next message ("end" catches a duplicate of the last one).
    let mut results = Vec::new();
    for (id, ps) in pubsubs.iter_mut() {
        let mut got = Vec::new();
        let mut error = None;
        for _ in 0..sent.len() {
            match ps.get_message() {
                Ok(msg) => got.push(msg.get_payload::<String>().unwrap()),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        results.push((id.clone(), got, error));
    }
    for (id, got, error) in &results {
        assert!(
            got == &sent && error.is_none(),
            "subscriber on {id} got {got:?} (then {error:?}); want {sent:?} (m1, m2, end published through a; \
             m3, m4 through b). All subscribers: {results:?}"
        );
    }
}

#[test]
fn select_and_flushall_replicate() {
    let pair = Pair::start();
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    let _: () = redis::cmd("SELECT").arg(3).query(&mut ca).unwrap();
    set(&mut ca, "sel:k", "in-db3");
    let _: () = redis::cmd("SELECT").arg(3).query(&mut cb).unwrap();
    assert_eq!(get(&mut cb, "sel:k").as_deref(), Some("in-db3"), "db 3 through b");
    let _: () = redis::cmd("SELECT").arg(5).query(&mut cb).unwrap();
    let _: i64 = redis::cmd("HSET").arg("sel:h").arg("f").arg("v").query(&mut cb).unwrap();
    set(&mut pair.a.conn(), "sel:k", "in-db0");
    for n in pair.nodes() {
        let mut c = n.redis_conn();
        let _: () = redis::cmd("SELECT").arg(3).query(&mut c).unwrap();
        assert_eq!(get(&mut c, "sel:k").as_deref(), Some("in-db3"), "{}'s Redis db 3", n.id);
        let _: () = redis::cmd("SELECT").arg(5).query(&mut c).unwrap();
        let h: Option<String> = redis::cmd("HGET").arg("sel:h").arg("f").query(&mut c).unwrap();
        assert_eq!(h.as_deref(), Some("v"), "{}'s Redis db 5", n.id);
        let _: () = redis::cmd("SELECT").arg(0).query(&mut c).unwrap();
        assert_eq!(get(&mut c, "sel:k").as_deref(), Some("in-db0"), "{}'s Redis db 0", n.id);
    }
    pair.assert_converged();

    // FLUSHDB of db 3 through a, then FLUSHALL through b.
    let _: () = redis::cmd("FLUSHDB").query(&mut ca).unwrap();
    for n in pair.nodes() {
        let mut c = n.redis_conn();
        let _: () = redis::cmd("SELECT").arg(3).query(&mut c).unwrap();
        let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
        assert_eq!(size, 0, "db 3 of {}'s Redis after FLUSHDB", n.id);
        let _: () = redis::cmd("SELECT").arg(5).query(&mut c).unwrap();
        let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
        assert_eq!(size, 1, "db 5 of {}'s Redis untouched by FLUSHDB of db 3", n.id);
    }
    let _: () = redis::cmd("FLUSHALL").query(&mut cb).unwrap();
    for n in pair.nodes() {
        let dbs = keyspace_dbs(&mut n.redis_conn());
        assert!(dbs.is_empty(), "{}'s Redis still has keys in dbs {dbs:?} after FLUSHALL", n.id);
    }
    // Still replicating afterwards.
    set(&mut pair.a.conn(), "sel:after", "x");
    assert_eq!(direct_get(&pair.b.redis, "sel:after").as_deref(), Some("x"));
    pair.assert_converged();
}

// ---------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------

#[test]
fn follower_redis_killed_and_restarted_under_load() {
    redis_killed_and_restarted_under_load("b");
}

#[test]
fn writer_redis_killed_and_restarted_under_load() {
    redis_killed_and_restarted_under_load("a");
}

/// kill -9 the Redis of node `victim` under write load through both sidecars
/// (write_ack=all), restart it empty on the same port: the writer keeps writing the other
/// Redis and backlogs the dead one, then rebuilds it; every acknowledged write ends on both.
/// Only the victim's clients may see errors, and only for commands in flight when Redis died.
fn redis_killed_and_restarted_under_load(victim: &str) {
    let mut pair = Pair::start_with(PairOpts { write_ack: "all", ..PairOpts::default() });
    let other = if victim == "a" { "b" } else { "a" };
    let load = SetLoad::start("rk", &[("a", pair.a.port), ("a", pair.a.port), ("b", pair.b.port), ("b", pair.b.port)]);
    assert!(load.wait_progress("a", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    assert!(load.wait_progress("b", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    let resyncs_before = pair.a.status().unwrap().replica(victim).unwrap().num("resyncs");

    let killed_at = load.start.elapsed();
    let node = if victim == "a" { &mut pair.a } else { &mut pair.b };
    node.redis.kill();
    // Writes keep being accepted through the other node: a few hundred per client.
    let progressed = load.wait_progress(other, 200, Duration::from_secs(10));
    let seen_down = wait_until(Duration::from_secs(5), || {
        let w = if pair.a.status().is_ok_and(|s| s.role() == "writer") { &pair.a } else { &pair.b };
        w.status().is_ok_and(|s| s.replica(victim).is_some_and(|r| r.get("state") != "in_sync"))
    });
    let status_down = pair.dump();
    let victim_progress = load.wait_progress(victim, 50, Duration::from_secs(10));
    let restarted_at = load.start.elapsed();
    let node = if victim == "a" { &mut pair.a } else { &mut pair.b };
    node.redis.restart();
    let resumed = load.wait_progress(victim, 20, Duration::from_secs(20))
        && load.wait_progress(other, 20, Duration::from_secs(10));
    let reps = load.finish();
    print_reports(&reps);
    eprintln!(
        "Redis {victim} killed at {killed_at:?}, restarted at {restarted_at:?}; status while down:\n{status_down}"
    );
    assert!(progressed, "writes through {other} stalled while {victim}'s Redis was down\n{}", pair.dump());
    assert!(seen_down, "the writer never reported replica {victim} out of sync while it was down\n{}", pair.dump());
    assert!(victim_progress, "writes (and reads) through {victim} stalled while its Redis was down\n{}", pair.dump());
    assert!(resumed, "load did not resume after the restart\n{}", pair.dump());
    assert_no_violations(&reps);
    for r in reps.iter().filter(|r| r.node == other) {
        assert_eq!(r.error_count, 0, "clients of {other} must see no errors: {}", error_summary(r));
    }

    pair.assert_converged();
    let w = pair.wait_in_sync(SYNC_TIMEOUT);
    let st = pair.node(&w).status().unwrap();
    assert!(
        st.replica(victim).unwrap().num("resyncs") > resyncs_before,
        "{victim}'s Redis restarted empty: a full resync\n{}",
        st.raw
    );
    assert_acked_on_both(&pair, &all_acked(&reps));

    // Invariant 5: the victim's sidecar serves reads from the other Redis while its own is
    // down; its clients may only see errors for commands in flight when Redis died.
    for r in reps.iter().filter(|r| r.node == victim) {
        assert!(
            r.error_count <= 3,
            "clients of {victim} saw more than in-flight errors (its Redis down from {killed_at:?} to \
             {restarted_at:?}): {}",
            error_summary(r)
        );
    }
}

#[test]
fn writer_sidecar_killed_failover_then_handover() {
    let mut pair = Pair::start_with(PairOpts { write_ack: "all", failover_timeout_ms: 500, ..PairOpts::default() });
    let bound = Duration::from_millis(pair.opts.failover_timeout_ms + 500);
    let load = SetLoad::start("fo", &[("a", pair.a.port), ("a", pair.a.port), ("b", pair.b.port), ("b", pair.b.port)]);
    assert!(load.wait_progress("a", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    assert!(load.wait_progress("b", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());

    let mut probe = conn_with_timeout(pair.b.port, Duration::from_secs(3)).expect("probe connection to b");
    let _: String = redis::cmd("SET").arg("fo:probe:0").arg("x").query(&mut probe).expect("probe before the kill");
    let killed_at = load.start.elapsed();
    let t0 = Instant::now();
    pair.a.kill_proxy();
    let mut attempts = Vec::new();
    let mut n = 0;
    let failover = loop {
        n += 1;
        match redis::cmd("SET").arg(format!("fo:probe:{n}")).arg("x").query::<String>(&mut probe) {
            Ok(_) => break Some(t0.elapsed()),
            Err(e) => {
                if attempts.len() < 20 {
                    attempts.push(format!("{:?}: {e}", t0.elapsed()));
                }
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    match conn_with_timeout(pair.b.port, Duration::from_secs(3)) {
                        Ok(c) => probe = c,
                        Err(e) => attempts.push(format!("reconnect: {e}")),
                    }
                }
            }
        }
        if t0.elapsed() > Duration::from_secs(15) {
            break None;
        }
        // Retry pacing (not synchronization).
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("first write through b accepted {failover:?} after a was killed (bound {bound:?}); failed attempts: {attempts:?}");
    let b_writer = pair.wait_role("b", "writer", Duration::from_secs(5));
    eprintln!("b reports role:writer {b_writer:?} later");
    let b_progress = load.wait_progress("b", 20, Duration::from_secs(10));

    // Restart a with the same configuration and ports: resynced, then takes the writer role
    // back.
    let restarted_at = load.start.elapsed();
    pair.a.start_proxy();
    let t1 = Instant::now();
    let handover = wait_until(Duration::from_secs(30), || pair.check_in_sync().is_ok_and(|w| w == "a"));
    eprintln!("a writer and pair in sync {:?} after a's restart (ok={handover})", t1.elapsed());
    let resumed =
        load.wait_progress("a", 20, Duration::from_secs(10)) && load.wait_progress("b", 20, Duration::from_secs(10));
    let reps = load.finish();
    print_reports(&reps);
    eprintln!("a killed at {killed_at:?}, restarted at {restarted_at:?}");
    for r in &reps {
        eprintln!("{}", error_summary(r));
    }

    let failover =
        failover.unwrap_or_else(|| panic!("no write through b accepted within 15 s: {attempts:?}\n{}", pair.dump()));
    assert!(failover < bound, "first write through b after {failover:?}; bound {bound:?}: {attempts:?}");
    assert!(b_progress, "b's clients made no progress after the failover\n{}", pair.dump());
    assert!(handover, "a did not become writer again (in sync) within 30 s of its restart\n{}", pair.dump());
    assert!(
        resumed,
        "load did not resume after the handover: {:?}\n{}",
        reps.iter().map(|r| r.acked.len()).collect::<Vec<_>>(),
        pair.dump()
    );
    assert_no_violations(&reps);
    pair.assert_converged();
    assert_eq!(pair.a.status().unwrap().role(), "writer");
    assert_acked_on_both(&pair, &all_acked(&reps));
}

#[test]
fn backlog_overflow_forces_full_resync() {
    let pair = Pair::start_with(PairOpts { write_ack: "local", backlog_bytes: "64KiB".into(), ..PairOpts::default() });
    let mut ca = pair.a.conn();
    set(&mut ca, "bo:before", "x");
    let resyncs_before = pair.a.status().unwrap().replica("b").map(|r| r.num("resyncs")).unwrap_or(-1);

    // A short stall within the bound is replayed from the backlog: no resync.
    pair.b.redis.stop();
    for i in 0..8 {
        if let Err(e) = redis::cmd("SET").arg(format!("bo:small:{i}")).arg("x".repeat(1024)).query::<String>(&mut ca) {
            pair.b.redis.cont();
            panic!("write through a failed while b's Redis was stopped (write_ack=local): {e}");
        }
    }
    let small_status = pair.a.status().map(|s| s.raw).unwrap_or_else(|e| e);
    pair.b.redis.cont();
    pair.assert_converged();
    let resyncs_small = pair.a.status().unwrap().replica("b").map(|r| r.num("resyncs")).unwrap_or(-1);
    assert_eq!(
        resyncs_small, resyncs_before,
        "8 KiB of lag (bound 64KiB) must be replayed from the backlog, not resynced; status while stopped:\n{small_status}"
    );

    pair.b.redis.stop();
    // 512 KiB through a while b's Redis is stopped: 8x the backlog bound.
    let value = "v".repeat(4096);
    let t = Instant::now();
    for batch in 0..8 {
        let mut p = redis::pipe();
        for i in 0..16 {
            p.cmd("SET").arg(format!("bo:k:{batch}:{i}")).arg(&value).ignore();
        }
        if let Err(e) = p.query::<()>(&mut ca) {
            pair.b.redis.cont();
            panic!("writes through a failed while b's Redis was stopped (write_ack=local): {e}");
        }
    }
    let took = t.elapsed();
    let overflowed = wait_until(Duration::from_secs(5), || {
        pair.a.status().is_ok_and(|s| {
            s.replica("b").is_some_and(|r| r.get("state") == "resyncing" || r.num("resyncs") > resyncs_before)
        })
    });
    // Reads through b while its Redis is stopped and known out of sync (b heard it from the
    // writer): served from the writer. (Before b hears it, a read there may wait for its
    // stopped Redis: write_ack = "local" promises read-your-writes only on the writing side.)
    let knows = wait_until(Duration::from_secs(5), || pair.b.status().is_ok_and(|s| s.get("local_in_sync") == "0"));
    let read_b = conn_with_timeout(pair.b.port, Duration::from_secs(3))
        .and_then(|mut c| redis::cmd("GET").arg("bo:k:7:15").query::<Option<String>>(&mut c));
    let st_during = pair.a.status().map(|s| s.raw).unwrap_or_else(|e| e);
    pair.b.redis.cont();
    eprintln!("512 KiB written through a in {took:?} with b's Redis stopped; a's status then:\n{st_during}");
    assert!(took < Duration::from_secs(4), "write_ack=local writes through a waited for the stopped Redis: {took:?}");
    assert!(knows, "b should learn from the writer that its Redis is out of sync:\n{st_during}");
    match read_b {
        Ok(v) => assert_eq!(v.as_deref(), Some(value.as_str()), "read through b while its Redis is out of sync"),
        Err(e) => panic!("read through b while its Redis is stopped (must be served from the writer): {e}"),
    }

    pair.assert_converged();
    let st = pair.a.status().unwrap();
    let r = st.replica("b").unwrap();
    assert!(
        r.num("resyncs") >= 1 && r.num("resyncs") > resyncs_before,
        "backlog overflow must force a full resync of b (resyncs before {resyncs_before}):\n{}",
        st.raw
    );
    eprintln!("resync observed while stopped: {overflowed}");
    for n in pair.nodes() {
        assert_eq!(direct_get(&n.redis, "bo:k:7:15").as_deref(), Some(value.as_str()), "{}'s Redis", n.id);
    }
}

#[test]
fn partition_heals_merging_keys_and_priority_wins_conflicts() {
    let pair = Pair::start_with(PairOpts { write_ack: "all", relays: true, ..PairOpts::default() });
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    set(&mut ca, "part:base", "before");

    pair.cut_links();
    let took = pair.wait_role("b", "writer", Duration::from_secs(10));
    eprintln!("b took the writer role {took:?} after the cut");
    assert_eq!(pair.a.status().unwrap().role(), "writer", "a stays writer of its own side\n{}", pair.dump());

    // Writes on each side. Through a the first write may wait until a gives up on b's Redis.
    let write_retrying = |con: &mut redis::Connection, port: u16, key: &str, val: &str| {
        let mut last = String::new();
        let ok =
            wait_until(Duration::from_secs(10), || match redis::cmd("SET").arg(key).arg(val).query::<String>(con) {
                Ok(_) => true,
                Err(e) => {
                    last = e.to_string();
                    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                        *con = redis_conn(port, None);
                    }
                    false
                }
            });
        assert!(ok, "SET {key} during the partition never succeeded: {last}\n{}", pair.dump());
    };
    for i in 0..20 {
        write_retrying(&mut ca, pair.a.port, &format!("part:a:{i}"), "va");
        write_retrying(&mut cb, pair.b.port, &format!("part:b:{i}"), "vb");
    }
    write_retrying(&mut ca, pair.a.port, "part:both", "from-a");
    write_retrying(&mut cb, pair.b.port, "part:both", "from-b");
    write_retrying(&mut cb, pair.b.port, "part:base", "changed-on-b");
    // Each side serves its own writes; the other side's Redis has not seen them (the cut is
    // real).
    assert_eq!(get(&mut ca, "part:both").as_deref(), Some("from-a"));
    assert_eq!(get(&mut cb, "part:both").as_deref(), Some("from-b"));
    assert_eq!(direct_get(&pair.b.redis, "part:a:0"), None, "a's write reached b's Redis across the cut");
    assert_eq!(direct_get(&pair.a.redis, "part:b:0"), None, "b's write reached a's Redis across the cut");

    pair.heal_links();
    let w = pair.wait_in_sync(Duration::from_secs(30));
    assert_eq!(w, "a", "the higher-priority node is writer after healing");
    pair.assert_converged();
    // Every expectation checked, then reported together.
    let mut problems = Vec::new();
    for n in pair.nodes() {
        let mut expect = |key: &str, want: &str, what: &str| {
            let got = direct_get(&n.redis, key);
            if got.as_deref() != Some(want) {
                problems.push(format!("{}'s Redis: {key} = {got:?}, want {want:?} ({what})", n.id));
            }
        };
        expect("part:both", "from-a", "written on both sides: the higher priority wins");
        expect("part:base", "changed-on-b", "existed before the cut, written only on b during it");
        for i in 0..20 {
            expect(&format!("part:a:{i}"), "va", "written only on a");
            expect(&format!("part:b:{i}"), "vb", "written only on b");
        }
    }
    let sts: BTreeMap<String, Status> =
        pair.nodes().iter().map(|n| (n.id.clone(), n.status().expect("status"))).collect();
    let conflicts = sts.values().map(|s| s.num("conflict_keys")).max().unwrap();
    let merged = sts.values().map(|s| s.num("merged_keys")).max().unwrap();
    eprintln!("after healing: conflict_keys {conflicts}, merged_keys {merged}");
    if conflicts < 1 {
        problems.push(format!("conflict_keys is {conflicts}: part:both was written on both sides"));
    }
    if merged < 1 {
        problems.push(format!("merged_keys is {merged}: 21 keys were written on b only"));
    }
    assert!(problems.is_empty(), "after healing the partition:\n{}\n{}", problems.join("\n"), pair.dump());
    // Still a working pair.
    set(&mut pair.b.conn(), "part:after", "x");
    assert_eq!(direct_get(&pair.a.redis, "part:after").as_deref(), Some("x"));
}

#[test]
fn follower_sidecar_killed_and_restarted() {
    let mut pair = Pair::start_with(PairOpts { write_ack: "all", ..PairOpts::default() });
    let load = SetLoad::start("fk", &[("a", pair.a.port), ("a", pair.a.port)]);
    assert!(load.wait_progress("a", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    let resyncs_before = pair.a.status().unwrap().replica("b").unwrap().num("resyncs");

    pair.b.kill_proxy();
    let t = Instant::now();
    // The writer notices the peer is gone, and keeps writing b's Redis directly.
    let progressed = load.wait_progress("a", 200, Duration::from_secs(10));
    let link_down = wait_until(Duration::from_secs(5), || {
        pair.a.status().is_ok_and(|s| s.peer("b").is_some_and(|p| p.get("link") != "up"))
    });
    let link_down_after = t.elapsed();
    let st_down = pair.a.status().map(|s| s.raw).unwrap_or_else(|e| e);
    pair.b.start_proxy();
    // b's Redis never missed a write (the writer writes it directly), so a resync is optional;
    // either way the pair is in sync again with b following a.
    let back = wait_until(SYNC_TIMEOUT, || pair.check_in_sync().is_ok());
    let resumed = load.wait_progress("a", 20, Duration::from_secs(10));
    let reps = load.finish();
    print_reports(&reps);
    eprintln!("a's status while b's sidecar was down:\n{st_down}");
    assert!(progressed, "writes through a stalled while b's sidecar was down\n{}", pair.dump());
    assert!(resumed, "writes through a stalled after b's sidecar restarted\n{}", pair.dump());
    assert!(back, "pair not in sync after b's sidecar restarted\n{}", pair.dump());
    assert!(link_down, "a still reports peer b link=up {link_down_after:?} after b's sidecar was killed\n{st_down}");
    eprintln!(
        "a reported b's link down {link_down_after:?} after the kill; b resyncs before {resyncs_before}, after {}",
        pair.a.status().unwrap().replica("b").unwrap().num("resyncs")
    );
    assert_no_violations(&reps);
    for r in &reps {
        assert_eq!(r.error_count, 0, "clients of a must see no errors when b's sidecar dies: {}", error_summary(r));
    }
    pair.assert_converged();
    assert_eq!(pair.b.status().unwrap().role(), "follower");
    assert_acked_on_both(&pair, &all_acked(&reps));
    // Reads and writes through the restarted sidecar.
    let mut cb = pair.b.conn();
    set(&mut cb, "fk:after", "x");
    assert_eq!(direct_get(&pair.a.redis, "fk:after").as_deref(), Some("x"));
}

#[test]
fn peer_link_cut_while_both_reach_both_redis_converges() {
    // Only the sidecar-to-sidecar link is cut: each sidecar still reaches the other's Redis.
    let pair = Pair::start_with(PairOpts { write_ack: "local", relays: true, ..PairOpts::default() });
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    set(&mut ca, "pl:base", "before");
    pair.cut_peer_links();
    let took = pair.wait_role("b", "writer", Duration::from_secs(10));
    eprintln!("b took the writer role {took:?} after the peer link was cut");
    for i in 0..20 {
        set(&mut ca, &format!("pl:a:{i}"), "va");
        set(&mut cb, &format!("pl:b:{i}"), "vb");
    }
    set(&mut ca, "pl:both", "from-a");
    set(&mut cb, "pl:both", "from-b");
    pair.heal_links();
    let w = pair.wait_in_sync(Duration::from_secs(30));
    assert_eq!(w, "a", "the higher-priority node is writer after healing");
    pair.assert_converged();
    let mut problems = Vec::new();
    for n in pair.nodes() {
        let mut expect = |key: &str, want: &str| {
            let got = direct_get(&n.redis, key);
            if got.as_deref() != Some(want) {
                problems.push(format!("{}'s Redis: {key} = {got:?}, want {want:?}", n.id));
            }
        };
        expect("pl:both", "from-a");
        expect("pl:base", "before");
        for i in 0..20 {
            expect(&format!("pl:a:{i}"), "va");
            expect(&format!("pl:b:{i}"), "vb");
        }
    }
    assert!(problems.is_empty(), "after healing the peer link:\n{}\n{}", problems.join("\n"), pair.dump());
}

#[test]
fn resync_under_concurrent_updates_of_the_copied_keys() {
    // b's Redis restarts empty and is rebuilt key by key while clients keep incrementing those
    // very keys: a key copied mid-stream must be neither lost nor incremented twice.
    const KEYS: usize = 20_000;
    let mut pair = Pair::start_with(PairOpts { write_ack: "all", ..PairOpts::default() });
    let mut ca = pair.a.conn();
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for i in chunk {
            p.cmd("SET").arg(format!("rs:c:{i}")).arg(0).ignore();
        }
        let _: () = p.query(&mut ca).unwrap();
    }
    for i in 0..50 {
        let _: () =
            redis::cmd("HSET").arg(format!("rs:h:{i}")).arg("f").arg(i).arg("g").arg("x").query(&mut ca).unwrap();
        let _: () = redis::cmd("RPUSH").arg(format!("rs:l:{i}")).arg(&[1, 2, 3]).query(&mut ca).unwrap();
        let _: () = redis::cmd("SET").arg(format!("rs:t:{i}")).arg(i).arg("EX").arg(1000).query(&mut ca).unwrap();
    }
    pair.wait_in_sync(SYNC_TIMEOUT);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    /// Per thread: acknowledged increments per key, keys with an ambiguous (failed) INCR, errors.
    type Outcome = (BTreeMap<usize, i64>, BTreeSet<usize>, Vec<String>);
    let handles: Vec<JoinHandle<Outcome>> = [pair.a.port, pair.b.port, pair.a.port, pair.b.port]
        .into_iter()
        .enumerate()
        .map(|(t, port)| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(7 + t as u64);
                let mut acked: BTreeMap<usize, i64> = BTreeMap::new();
                let mut uncertain = BTreeSet::new();
                let mut errors = Vec::new();
                let mut c = conn_with_timeout(port, Duration::from_secs(5)).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let k = rng.below(KEYS as u64) as usize;
                    match redis::cmd("INCR").arg(format!("rs:c:{k}")).query::<i64>(&mut c) {
                        Ok(_) => {
                            *acked.entry(k).or_default() += 1;
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            uncertain.insert(k);
                            if errors.len() < 10 {
                                errors.push(e.to_string());
                            }
                            if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                                if let Ok(n) = conn_with_timeout(port, Duration::from_secs(5)) {
                                    c = n;
                                }
                            }
                        }
                    }
                }
                (acked, uncertain, errors)
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || done.load(Ordering::SeqCst) > 200), "increments never got going");
    pair.b.redis.kill();
    pair.b.redis.restart();
    let mut saw_resync = false;
    let resynced = wait_until(SYNC_TIMEOUT, || {
        if let Ok(s) = pair.a.status() {
            saw_resync |= s.replica("b").is_some_and(|r| r.get("state") == "resyncing");
        }
        pair.check_in_sync().is_ok() && saw_resync
    });
    let during = done.load(Ordering::SeqCst);
    // Some more increments once in sync.
    assert!(wait_until(Duration::from_secs(10), || done.load(Ordering::SeqCst) > during + 200), "increments stalled");
    stop.store(true, Ordering::SeqCst);
    let mut expected: BTreeMap<usize, i64> = BTreeMap::new();
    let mut uncertain = BTreeSet::new();
    let mut errors = Vec::new();
    for h in handles {
        let (a, u, e) = h.join().unwrap();
        for (k, n) in a {
            *expected.entry(k).or_default() += n;
        }
        uncertain.extend(u);
        errors.extend(e);
    }
    eprintln!(
        "{} increments acknowledged, {} keys uncertain (errors: {errors:?}); resync seen: {saw_resync}",
        expected.values().sum::<i64>(),
        uncertain.len()
    );
    assert!(resynced, "b's Redis was not resynced (state=resyncing seen: {saw_resync})\n{}", pair.dump());
    pair.assert_converged();
    for n in pair.nodes() {
        let mut c = n.redis_conn();
        let mut bad = Vec::new();
        let all: Vec<usize> = (0..KEYS).collect();
        for chunk in all.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|i| format!("rs:c:{i}")).collect();
            let vals: Vec<Option<i64>> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
            for (i, v) in chunk.iter().zip(vals) {
                let want = expected.get(i).copied().unwrap_or(0);
                let ok =
                    if uncertain.contains(i) { v.is_some_and(|v| v == want || v == want + 1) } else { v == Some(want) };
                if !ok && bad.len() < 10 {
                    bad.push(format!("rs:c:{i} = {v:?}, want {want}"));
                }
            }
        }
        assert!(bad.is_empty(), "counters on {}'s Redis after the resync: {bad:?}", n.id);
    }
}

#[test]
fn pair_on_the_epoll_driver() {
    let pair = Pair::start_with(PairOpts { write_ack: "all", io_driver: Some("epoll"), ..PairOpts::default() });
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    set(&mut cb, "ep:k", "from-b");
    assert_eq!(get(&mut ca, "ep:k").as_deref(), Some("from-b"));
    for n in pair.nodes() {
        assert_eq!(direct_get(&n.redis, "ep:k").as_deref(), Some("from-b"), "{}'s Redis", n.id);
    }
    let resyncs = resyncs_of_b(&pair);
    let m = mixed_workload(&pair, 4, Duration::from_secs(1));
    assert!(m.errors.is_empty(), "{} errors on a healthy pair: {:?}", m.error_count, m.errors);
    assert_healthy_run(&pair, &m, resyncs);
    for n in pair.nodes() {
        assert_eq!(counter_on(&n.redis), m.incr_replies.len() as i64, "conv:counter on {}'s Redis", n.id);
    }
    pair.assert_converged();
}

#[test]
fn peer_link_refuses_a_wrong_secret() {
    let pair = Pair::start_unsynced(PairOpts {
        write_ack: "local",
        b_secret: Some("not-the-secret".into()),
        ..PairOpts::default()
    });
    // b cannot join a: it hears no writer and takes the role itself; a, which hears no
    // authenticated peer either, does the same (each on its own timer: wait for both).
    pair.wait_role("b", "writer", Duration::from_secs(10));
    pair.wait_role("a", "writer", Duration::from_secs(10));
    let sa = pair.a.status().expect("status of a");
    assert_eq!(sa.role(), "writer", "{}", sa.raw);
    let link = sa.peer("b").map(|p| p.get("link").to_string());
    assert_ne!(link.as_deref(), Some("up"), "a accepted b's peer link with a wrong secret:\n{}", sa.raw);
    let sb = pair.b.status().expect("status of b");
    let link = sb.peer("a").map(|p| p.get("link").to_string());
    assert_ne!(link.as_deref(), Some("up"), "b's peer link to a is up with a wrong secret:\n{}", sb.raw);
    // Something that is not a sidecar with the secret gets nothing done on the peer port.
    let mut raw = RawConn::connect(pair.a.peer_port);
    raw.send_cmd(&["SET", "sec:k", "v"]);
    let _ = raw.read_reply(Duration::from_secs(2));
    assert_eq!(direct_get(&pair.a.redis, "sec:k"), None, "a write through the peer port without the secret");
    assert!(pair.a.status().is_ok_and(|s| s.role() == "writer"), "a still serves\n{}", pair.dump());
}

#[test]
fn watch_optimistic_counter_across_both_sidecars() {
    // WATCH/GET/MULTI/SET/EXEC retried on abort, from clients on both sidecars: the counter
    // ends equal to the number of committed transactions, on both Redis.
    let pair = Pair::start();
    set(&mut pair.a.conn(), "wo:n", "0");
    let start = Instant::now();
    let handles: Vec<_> = [pair.a.port, pair.b.port, pair.a.port, pair.b.port]
        .into_iter()
        .map(|port| {
            std::thread::spawn(move || {
                let mut c = redis_conn(port, None);
                let (mut committed, mut aborted) = (0u64, 0u64);
                while start.elapsed() < Duration::from_secs(2) {
                    let _: () = redis::cmd("WATCH").arg("wo:n").query(&mut c).unwrap();
                    let n: i64 = redis::cmd("GET").arg("wo:n").query(&mut c).unwrap();
                    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
                    let _: String = redis::cmd("SET").arg("wo:n").arg(n + 1).query(&mut c).unwrap();
                    let r: redis::Value = redis::cmd("EXEC").query(&mut c).unwrap();
                    if r == redis::Value::Nil {
                        aborted += 1;
                    } else {
                        committed += 1;
                    }
                }
                (committed, aborted)
            })
        })
        .collect();
    let (mut committed, mut aborted) = (0, 0);
    for h in handles {
        let (c, a) = h.join().unwrap();
        committed += c;
        aborted += a;
    }
    eprintln!("{committed} transactions committed, {aborted} aborted");
    assert!(committed > 20, "too few transactions committed: {committed}");
    for n in pair.nodes() {
        assert_eq!(
            direct_get(&n.redis, "wo:n").and_then(|v| v.parse::<u64>().ok()),
            Some(committed),
            "wo:n on {}'s Redis vs committed transactions ({aborted} aborted)",
            n.id
        );
    }
    pair.assert_converged();
}

#[test]
fn blocking_pops_on_both_sidecars_get_each_element_once() {
    let pair = Pair::start();
    const ITEMS: usize = 200;
    let waiters: Vec<_> = [pair.a.port, pair.b.port, pair.a.port, pair.b.port]
        .into_iter()
        .enumerate()
        .map(|(w, port)| {
            std::thread::spawn(move || {
                let mut c = redis_conn(port, None);
                let mut got = Vec::new();
                loop {
                    // BLPOP and BLMOVE (into a per-waiter list) alternately.
                    let v: Option<String> = if got.len() % 2 == 0 {
                        let r: Option<(String, String)> =
                            redis::cmd("BLPOP").arg("bq:list").arg(10).query(&mut c).expect("BLPOP");
                        r.map(|(_, v)| v)
                    } else {
                        redis::cmd("BLMOVE")
                            .arg("bq:list")
                            .arg(format!("bq:got:{w}"))
                            .arg("LEFT")
                            .arg("RIGHT")
                            .arg(10)
                            .query(&mut c)
                            .expect("BLMOVE")
                    };
                    match v {
                        Some(v) if v == "stop" => return got,
                        Some(v) => got.push(v),
                        None => return got, // timed out: reported as missing items below
                    }
                }
            })
        })
        .collect();
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    for i in 0..ITEMS {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        let _: i64 = redis::cmd("RPUSH").arg("bq:list").arg(format!("item{i}")).query(c).unwrap();
    }
    for _ in 0..4 {
        let _: i64 = redis::cmd("RPUSH").arg("bq:list").arg("stop").query(&mut ca).unwrap();
    }
    let mut all = Vec::new();
    for h in waiters {
        all.extend(h.join().unwrap());
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "an element was popped twice");
    assert_eq!(all.len(), ITEMS, "every pushed element popped exactly once");
    pair.assert_converged();
    for n in pair.nodes() {
        let len: i64 = redis::cmd("LLEN").arg("bq:list").query(&mut n.redis_conn()).unwrap();
        assert_eq!(len, 0, "bq:list on {}'s Redis", n.id);
    }
}

#[test]
fn multi_db_commands_replicate() {
    // Commands that name databases: MOVE, COPY ... DB, SWAPDB (which names no key at all).
    let pair = Pair::start();
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    set(&mut ca, "md:moved", "m");
    set(&mut cb, "md:copied", "c");
    let moved: i64 = redis::cmd("MOVE").arg("md:moved").arg(2).query(&mut cb).expect("MOVE");
    assert_eq!(moved, 1);
    let copied: i64 = redis::cmd("COPY").arg("md:copied").arg("md:copy").arg("DB").arg(4).query(&mut ca).expect("COPY");
    assert_eq!(copied, 1);
    let _: () = redis::cmd("SELECT").arg(4).query(&mut ca).unwrap();
    set(&mut ca, "md:in4", "x");
    let _: () = redis::cmd("SWAPDB").arg(2).arg(4).query(&mut cb).expect("SWAPDB");
    let _: () = redis::cmd("SELECT").arg(2).query(&mut cb).unwrap();
    assert_eq!(get(&mut cb, "md:copy").as_deref(), Some("c"), "db 2 through b after SWAPDB");
    pair.assert_converged();
    for n in pair.nodes() {
        let mut c = n.redis_conn();
        let _: () = redis::cmd("SELECT").arg(2).query(&mut c).unwrap();
        assert_eq!(get(&mut c, "md:in4").as_deref(), Some("x"), "{}'s Redis db 2 after SWAPDB", n.id);
        let _: () = redis::cmd("SELECT").arg(4).query(&mut c).unwrap();
        assert_eq!(get(&mut c, "md:moved").as_deref(), Some("m"), "{}'s Redis db 4 after SWAPDB", n.id);
    }
}

// ---------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------

#[test]
fn harness_data_comparison_sees_every_kind_of_difference() {
    let (ra, rb) = (RedisServer::start(), RedisServer::start());
    let fill = |r: &RedisServer| {
        let mut c = r.conn();
        let _: () = redis::pipe()
            .cmd("SET")
            .arg("h:s")
            .arg("v")
            .ignore()
            .cmd("RPUSH")
            .arg("h:l")
            .arg(&["1", "2"])
            .ignore()
            .cmd("SADD")
            .arg("h:set")
            .arg(&["x", "y"])
            .ignore()
            .cmd("ZADD")
            .arg("h:z")
            .arg(1)
            .arg("x")
            .ignore()
            .cmd("HSET")
            .arg("h:h")
            .arg("f")
            .arg("v")
            .ignore()
            .cmd("XADD")
            .arg("h:x")
            .arg("1-1")
            .arg("f")
            .arg("v")
            .ignore()
            .cmd("SET")
            .arg("h:ttl")
            .arg("v")
            .arg("EX")
            .arg(100)
            .ignore()
            .cmd("SELECT")
            .arg(7)
            .ignore()
            .cmd("SET")
            .arg("h:db7")
            .arg("v")
            .ignore()
            .query(&mut c)
            .unwrap();
    };
    fill(&ra);
    fill(&rb);
    assert_same_data(&ra, &rb);
    assert!(data_diff(&snapshot(ra.port), &snapshot(rb.port), 5).is_empty());
    let changes: [&[&str]; 8] = [
        &["RPUSH", "h:l", "3"],
        &["SADD", "h:set", "z"],
        &["ZADD", "h:z", "2", "x"],
        &["HSET", "h:h", "f", "w"],
        &["XADD", "h:x", "2-1", "f", "v"],
        &["PERSIST", "h:ttl"],
        &["EXPIRE", "h:s", "100"],
        &["SET", "h:only-b", "v"],
    ];
    for change in changes {
        let mut c = rb.conn();
        let _: redis::Value = redis::cmd(change[0]).arg(&change[1..]).query(&mut c).unwrap();
        let d = data_diff(&snapshot(ra.port), &snapshot(rb.port), 5);
        assert!(!d.is_empty(), "a difference after {change:?} went unnoticed");
        // Undo by copying b's state to a for that key.
        let key = change[1];
        let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(key).query(&mut c).unwrap();
        let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut c).unwrap();
        let _: () = redis::cmd("RESTORE")
            .arg(key)
            .arg(pttl.max(0))
            .arg(dump.unwrap())
            .arg("REPLACE")
            .query(&mut ra.conn())
            .unwrap();
        assert_same_data(&ra, &rb);
    }
    // A key in another db.
    let mut c = rb.conn();
    let _: () = redis::cmd("SELECT").arg(7).query(&mut c).unwrap();
    let _: () = redis::cmd("DEL").arg("h:db7").query(&mut c).unwrap();
    let d = data_diff(&snapshot(ra.port), &snapshot(rb.port), 5);
    assert!(d.iter().any(|l| l.contains("db7")), "a key missing in db 7 went unnoticed: {d:?}");
}

#[test]
fn harness_link_relay_forwards_cuts_and_heals() {
    let r = RedisServer::start();
    let relay = LinkRelay::start(r.port);
    let mut c = RawConn::connect(relay.port);
    assert_eq!(text(&c.call(&["PING"])), "+PONG\r\n");
    relay.cut();
    c.expect_eof(Duration::from_secs(5)).expect("a forwarded connection is closed by cut()");
    let mut c2 = RawConn::connect(relay.port);
    c2.send_cmd(&["PING"]);
    assert!(c2.read_reply(Duration::from_secs(2)).is_err(), "a new connection is refused while cut");
    relay.heal();
    let mut c3 = RawConn::connect(relay.port);
    assert_eq!(text(&c3.call(&["PING"])), "+PONG\r\n");
    assert!(relay.live_connections() >= 1);
}

#[test]
fn read_your_writes_through_the_follower_with_write_ack_local() {
    // Invariant 2: a read that follows a client's write sees it, also when the write was
    // acknowledged after the writer's own Redis only and the read is served by the follower.
    let pair = Pair::start_with(PairOpts { write_ack: "local", ..PairOpts::default() });
    let load = SetLoad::start("ryw", &[("b", pair.b.port), ("b", pair.b.port), ("a", pair.a.port), ("a", pair.a.port)]);
    let went = load.wait_progress("b", 1000, Duration::from_secs(15));
    let reps = load.finish();
    print_reports(&reps);
    assert!(went, "load too slow\n{}", pair.dump());
    assert_no_violations(&reps);
    for r in &reps {
        assert_eq!(r.error_count, 0, "errors on a healthy pair: {}", error_summary(r));
    }
    pair.assert_converged();
    assert_acked_on_both(&pair, &all_acked(&reps));
}

#[test]
fn partition_under_load_keeps_every_acknowledged_write() {
    // Clients on both sides write unique keys before, during and after a full partition: no
    // key is written on both sides, so after healing every acknowledged write is on both Redis.
    let pair = Pair::start_with(PairOpts { write_ack: "all", relays: true, ..PairOpts::default() });
    let load = SetLoad::start("pl", &[("a", pair.a.port), ("a", pair.a.port), ("b", pair.b.port), ("b", pair.b.port)]);
    assert!(load.wait_progress("a", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    assert!(load.wait_progress("b", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    let cut_at = load.start.elapsed();
    pair.cut_links();
    let b_writer = wait_until(Duration::from_secs(10), || pair.b.status().is_ok_and(|s| s.role() == "writer"));
    let a_progress = load.wait_progress("a", 100, Duration::from_secs(15));
    let b_progress = load.wait_progress("b", 100, Duration::from_secs(15));
    let healed_at = load.start.elapsed();
    pair.heal_links();
    let synced = wait_until(Duration::from_secs(30), || pair.check_in_sync().is_ok_and(|w| w == "a"));
    let resumed =
        load.wait_progress("a", 50, Duration::from_secs(10)) && load.wait_progress("b", 50, Duration::from_secs(10));
    let reps = load.finish();
    print_reports(&reps);
    for r in &reps {
        eprintln!("{}", error_summary(r));
    }
    eprintln!("cut at {cut_at:?}, healed at {healed_at:?}");
    assert!(b_writer, "b never took the writer role during the partition\n{}", pair.dump());
    assert!(a_progress, "writes through a stalled during the partition\n{}", pair.dump());
    assert!(b_progress, "writes through b stalled during the partition\n{}", pair.dump());
    assert!(synced, "pair not in sync with a as writer within 30 s of healing\n{}", pair.dump());
    assert!(resumed, "load did not resume after healing\n{}", pair.dump());
    pair.assert_converged();
    assert_acked_on_both(&pair, &all_acked(&reps));
    assert_no_violations(&reps);
}

#[test]
fn frozen_writer_sidecar_resumes_without_divergence() {
    // The writer's sidecar is frozen (SIGSTOP), not dead: b takes over; when a resumes it must
    // not apply anything it held while frozen behind b's back, and the pair converges with
    // every acknowledged write on both Redis.
    let pair = Pair::start_with(PairOpts { write_ack: "all", ..PairOpts::default() });
    let load = SetLoad::start("fz", &[("a", pair.a.port), ("a", pair.a.port), ("b", pair.b.port), ("b", pair.b.port)]);
    assert!(load.wait_progress("a", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    assert!(load.wait_progress("b", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    let frozen_at = load.start.elapsed();
    pair.a.freeze_proxy();
    let b_writer = wait_until(Duration::from_secs(10), || pair.b.status().is_ok_and(|s| s.role() == "writer"));
    let b_progress = load.wait_progress("b", 100, Duration::from_secs(10));
    let thawed_at = load.start.elapsed();
    pair.a.thaw_proxy();
    let synced = wait_until(Duration::from_secs(30), || pair.check_in_sync().is_ok_and(|w| w == "a"));
    let resumed =
        load.wait_progress("a", 50, Duration::from_secs(10)) && load.wait_progress("b", 50, Duration::from_secs(10));
    let reps = load.finish();
    print_reports(&reps);
    for r in &reps {
        eprintln!("{}", error_summary(r));
    }
    eprintln!("a frozen at {frozen_at:?}, thawed at {thawed_at:?}");
    assert!(b_writer, "b never took the writer role while a was frozen\n{}", pair.dump());
    assert!(b_progress, "writes through b stalled while a was frozen\n{}", pair.dump());
    assert!(synced, "pair not in sync with a as writer within 30 s of the thaw\n{}", pair.dump());
    assert!(resumed, "load did not resume after the thaw\n{}", pair.dump());
    pair.assert_converged();
    assert_acked_on_both(&pair, &all_acked(&reps));
    assert_no_violations(&reps);
}

#[test]
fn repeated_sidecar_kills_under_load_lose_nothing() {
    let mut pair = Pair::start_with(PairOpts { write_ack: "all", ..PairOpts::default() });
    let load = SetLoad::start("rp", &[("a", pair.a.port), ("a", pair.a.port), ("b", pair.b.port), ("b", pair.b.port)]);
    assert!(load.wait_progress("a", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    assert!(load.wait_progress("b", 20, Duration::from_secs(10)), "load never got going: {:?}", load.counts());
    let mut timeline = Vec::new();
    for round in 0..2 {
        for victim in ["a", "b"] {
            let other = if victim == "a" { "b" } else { "a" };
            timeline.push(format!("{:?}: round {round}: kill {victim}", load.start.elapsed()));
            if victim == "a" {
                pair.a.kill_proxy();
            } else {
                pair.b.kill_proxy();
            }
            let took_over =
                wait_until(Duration::from_secs(10), || pair.node(other).status().is_ok_and(|s| s.role() == "writer"));
            assert!(took_over, "round {round}: {other} did not become writer after {victim} died\n{}", pair.dump());
            assert!(
                load.wait_progress(other, 50, Duration::from_secs(10)),
                "round {round}: writes through {other} stalled after {victim} died\n{}",
                pair.dump()
            );
            timeline.push(format!("{:?}: round {round}: restart {victim}", load.start.elapsed()));
            if victim == "a" {
                pair.a.start_proxy();
            } else {
                pair.b.start_proxy();
            }
            let synced = wait_until(Duration::from_secs(30), || pair.check_in_sync().is_ok_and(|w| w == "a"));
            assert!(synced, "round {round}: not in sync with a as writer after {victim} restarted\n{}", pair.dump());
            timeline.push(format!("{:?}: round {round}: in sync", load.start.elapsed()));
        }
    }
    assert!(
        load.wait_progress("a", 20, Duration::from_secs(10)) && load.wait_progress("b", 20, Duration::from_secs(10)),
        "load did not resume\n{}",
        pair.dump()
    );
    let reps = load.finish();
    print_reports(&reps);
    eprintln!("{}", timeline.join("\n"));
    pair.assert_converged();
    assert_acked_on_both(&pair, &all_acked(&reps));
    assert_no_violations(&reps);
}
