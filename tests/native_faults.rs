//! Native mode under faults (issue 7's scenarios): real redis-server processes on Redis's own
//! replication, steered by two real resplica sidecars, disturbed by kill -9, SIGSTOP, restarts
//! of Redis without persistence, a partition that drops packets, full memory, expiry and
//! eviction. Every test counts the writes it got acknowledged (and, for writes that are not
//! idempotent, the indeterminate ones: errors and timeouts), and ends by comparing both Redis
//! (every db: type, content, TTL class) once the pair is whole again.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::native::{native, redis_role, status_of, statuses, wait_equal, wait_formed, wait_formed_any, FORM_TIMEOUT};
use common::pair::{conn_with_timeout, LinkRelay, Pair, PairOpts};
use common::{wait_until, RedisServer};
use redis::Commands;

/// Longest a test waits for one condition of the pair (failover, re-forming, convergence).
const SETTLE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Load and bookkeeping
// ---------------------------------------------------------------------------------------

/// A connection through the sidecar on `port`, opened on demand and dropped after any error
/// (its state is unknown then).
struct Client {
    port: u16,
    timeout: Duration,
    conn: Option<redis::Connection>,
}

impl Client {
    fn new(port: u16, timeout: Duration) -> Client {
        Client { port, timeout, conn: None }
    }

    fn run<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        if self.conn.is_none() {
            self.conn = Some(conn_with_timeout(self.port, self.timeout)?);
        }
        let r = cmd.query(self.conn.as_mut().expect("connection"));
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    /// An idempotent SET, retried on a fresh connection until acknowledged or `deadline`.
    /// `Ok`: how many attempts failed first, and the first error.
    fn set_until_acked(&mut self, key: &str, val: &str, deadline: Instant) -> Result<(u32, String), String> {
        let mut last = String::new();
        let mut first = String::new();
        let mut failed = 0;
        while Instant::now() < deadline {
            match self.run::<()>(redis::cmd("SET").arg(key).arg(val)) {
                Ok(()) => return Ok((failed, first)),
                Err(e) => {
                    failed += 1;
                    last = e.to_string();
                    if first.is_empty() {
                        first = last.clone();
                    }
                    // Pace the retries (a failover is under way); not a synchronization.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Err(format!("SET {key} not acknowledged before the deadline; last error: {last}"))
    }
}

/// Per-key counts of `INCR`s: acknowledged, and indeterminate (error or timeout: it may or may
/// not have been applied).
#[derive(Debug, Default)]
struct Counts {
    acked: BTreeMap<String, u64>,
    indeterminate: BTreeMap<String, u64>,
    /// A few error messages, for the report.
    errors: Vec<String>,
}

impl Counts {
    fn total_acked(&self) -> u64 {
        self.acked.values().sum()
    }

    fn total_indeterminate(&self) -> u64 {
        self.indeterminate.values().sum()
    }
}

/// Threads incrementing counters through one sidecar until told to stop. No retries: an error
/// is indeterminate.
struct IncrLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    handles: Vec<JoinHandle<Counts>>,
}

impl IncrLoad {
    fn start(port: u16, keys: &[&str], threads: usize, timeout: Duration) -> IncrLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let handles = (0..threads)
            .map(|t| {
                let (stop, acked, keys) = (stop.clone(), acked.clone(), keys.clone());
                std::thread::spawn(move || {
                    let mut c = Client::new(port, timeout);
                    let mut counts = Counts::default();
                    let mut i = t;
                    while !stop.load(Ordering::SeqCst) {
                        let key = &keys[i % keys.len()];
                        i += 1;
                        match c.run::<i64>(redis::cmd("INCR").arg(key)) {
                            Ok(_) => {
                                *counts.acked.entry(key.clone()).or_default() += 1;
                                acked.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                *counts.indeterminate.entry(key.clone()).or_default() += 1;
                                if counts.errors.len() < 5 {
                                    counts.errors.push(e.to_string());
                                }
                                // Pace the retries while the pair recovers.
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                    counts
                })
            })
            .collect();
        IncrLoad { stop, acked, handles }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Wait until `n` more increments than now were acknowledged.
    fn wait_more(&self, n: u64, timeout: Duration) -> bool {
        let target = self.acked() + n;
        wait_until(timeout, || self.acked() >= target)
    }

    fn finish(self) -> Counts {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Counts::default();
        for h in self.handles {
            let c = h.join().expect("load thread panicked");
            for (k, v) in c.acked {
                *all.acked.entry(k).or_default() += v;
            }
            for (k, v) in c.indeterminate {
                *all.indeterminate.entry(k).or_default() += v;
            }
            all.errors.extend(c.errors.into_iter().take(5 - all.errors.len().min(5)));
        }
        all
    }
}

/// A counter's value on a Redis, read directly.
fn counter(r: &RedisServer, key: &str) -> u64 {
    let v: Option<u64> = r.conn().get(key).expect("GET counter");
    v.unwrap_or(0)
}

/// Each counter ends between its acknowledged increments and those plus the indeterminate
/// ones, on both Redis.
fn assert_counters(pair: &Pair, counts: &Counts, exact: bool) {
    for (k, &acked) in &counts.acked {
        let indet = counts.indeterminate.get(k).copied().unwrap_or(0);
        let (va, vb) = (counter(&pair.a.redis, k), counter(&pair.b.redis, k));
        eprintln!("{k}: acknowledged {acked}, indeterminate {indet}; a={va} b={vb}");
        assert_eq!(va, vb, "{k} differs between the two Redis");
        if exact {
            assert_eq!(va, acked, "{k}: {acked} acknowledged increments, the Redis hold {va}");
        } else {
            assert!(
                va >= acked && va <= acked + indet,
                "{k}: {va} is outside [{acked}, {}] (acknowledged, + indeterminate)",
                acked + indet
            );
        }
    }
}

/// Every acknowledged `key = value` is on both Redis.
fn assert_acked_on_both(pair: &Pair, acked: &[(String, String)]) {
    for r in [&pair.a.redis, &pair.b.redis] {
        let mut c = r.conn();
        let mut missing = Vec::new();
        for chunk in acked.chunks(500) {
            let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
            let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c).expect("MGET");
            for ((k, want), got) in chunk.iter().zip(vals) {
                if got.as_deref() != Some(want.as_str()) {
                    missing.push(format!("{k}={want} (found {got:?})"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged writes lost or changed on Redis :{}; first: {:?}\n{}",
            missing.len(),
            acked.len(),
            r.port,
            &missing[..missing.len().min(5)],
            statuses(pair)
        );
    }
}

fn info_field(port: u16, section: &str, field: &str) -> i64 {
    let Ok(mut c) = conn_with_timeout(port, Duration::from_secs(2)) else { return -1 };
    let info: String = redis::cmd("INFO").arg(section).query(&mut c).unwrap_or_default();
    info.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).and_then(|v| v.trim().parse().ok()).unwrap_or(-1)
}

/// Keys with a TTL in db 0 (`INFO keyspace` `expires=`; on a replica, until the primary's DEL
/// arrives), `None` when the Redis does not answer.
fn keys_with_ttl(port: u16) -> Option<u64> {
    let mut c = conn_with_timeout(port, Duration::from_secs(2)).ok()?;
    let info: String = redis::cmd("INFO").arg("keyspace").query(&mut c).ok()?;
    let Some(db0) = info.lines().find_map(|l| l.strip_prefix("db0:")) else { return Some(0) };
    db0.split(',').find_map(|f| f.strip_prefix("expires=")).and_then(|n| n.trim().parse().ok())
}

fn status_num(port: u16, field: &str) -> i64 {
    status_of(port).map(|s| s.num(field)).unwrap_or(-1)
}

// ---------------------------------------------------------------------------------------
// 1. Failover, then a rolling restart of both sidecars
// ---------------------------------------------------------------------------------------

/// kill -9 of a's sidecar and Redis; 2,000 SETs acknowledged through b (after its failover);
/// kill -9 of b's sidecar; Redis a restarted empty; both sidecars started again, one after the
/// other. The copy that holds the writes (b's) must lead, and nothing acknowledged is lost.
fn failover_then_rolling_restart(a_first: bool) {
    let mut pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let mut acked = Vec::new();
    let mut ca = pair.a.conn();
    for i in 0..200 {
        let _: () = ca.set(format!("pre:{i}"), i).unwrap();
        acked.push((format!("pre:{i}"), i.to_string()));
    }
    drop(ca);
    pair.a.kill_proxy();
    pair.a.redis.kill();
    let killed = Instant::now();
    let mut cb = Client::new(pair.b.port, Duration::from_secs(6));
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut first = None;
    for i in 0..2000 {
        let (k, v) = (format!("during:{i}"), format!("v{i}"));
        let (failed, err) = cb.set_until_acked(&k, &v, deadline).unwrap_or_else(|e| panic!("{e}\n{}", statuses(&pair)));
        first.get_or_insert_with(|| (killed.elapsed(), failed, err));
        acked.push((k, v));
    }
    let (took, failed, err) = first.unwrap();
    eprintln!("first write through b acknowledged {took:?} after a's node was killed ({failed} failed attempts before: {err})");
    let st = status_of(pair.b.port).expect("b's status");
    assert_eq!(st.get("role"), "primary", "b took over: {}", st.raw);
    drop(cb);
    pair.b.kill_proxy();
    pair.a.redis.restart();
    if a_first {
        pair.a.start_proxy();
        pair.b.start_proxy();
    } else {
        pair.b.start_proxy();
        pair.a.start_proxy();
    }
    // b's Redis holds the writes: it must lead; a's empty one must replicate it, not wipe it.
    wait_formed(&pair, "b", FORM_TIMEOUT);
    assert_eq!(redis_role(pair.a.redis.port), "slave");
    // Writes through both sidecars work again.
    for (n, node) in [("a", &pair.a), ("b", &pair.b)] {
        let mut c = Client::new(node.port, Duration::from_secs(6));
        for i in 0..50 {
            let (k, v) = (format!("after:{n}:{i}"), i.to_string());
            c.set_until_acked(&k, &v, Instant::now() + SETTLE).unwrap();
            acked.push((k, v));
        }
    }
    let data = wait_equal(&pair, SETTLE);
    assert_eq!(data.len(), acked.len(), "every key written, and nothing else");
    assert_acked_on_both(&pair, &acked);
}

#[test]
fn failover_then_rolling_restart_a_first() {
    failover_then_rolling_restart(true);
}

#[test]
fn failover_then_rolling_restart_b_first() {
    failover_then_rolling_restart(false);
}

// ---------------------------------------------------------------------------------------
// 2. SIGSTOP of the primary's sidecar
// ---------------------------------------------------------------------------------------

/// The primary's sidecar frozen well past the failover timeout while counters are incremented
/// through b only: its Redis lives, so this is no failover, and every increment counts once.
#[test]
fn frozen_primary_sidecar_is_not_a_failover_and_loses_no_increment() {
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let ft = Duration::from_millis(pair.opts.failover_timeout_ms);
    let keys = ["ctr:0", "ctr:1", "ctr:2", "ctr:3"];
    let load = IncrLoad::start(pair.b.port, &keys, 3, Duration::from_secs(3));
    assert!(load.wait_more(300, SETTLE), "no progress through b");
    pair.a.freeze_proxy();
    let frozen = Instant::now();
    let noticed = wait_until(SETTLE, || {
        status_of(pair.b.port).is_some_and(|s| s.peer("a").is_some_and(|p| p.get("link") == "down"))
    });
    // Keep it frozen for 4 failover timeouts after b noticed, checking b never fails over.
    let mut violation = None;
    wait_until(SETTLE, || {
        if let Some(s) = status_of(pair.b.port) {
            if s.get("primary") != "a" || s.num("failovers") != 0 {
                violation.get_or_insert(s.raw);
            }
        }
        frozen.elapsed() >= ft * 4
    });
    let progress_while_frozen = load.wait_more(200, SETTLE);
    pair.a.thaw_proxy();
    assert!(noticed, "b never saw a's sidecar go silent\n{}", statuses(&pair));
    assert!(violation.is_none(), "a frozen sidecar whose Redis lives caused a failover:\n{}", violation.unwrap());
    assert!(progress_while_frozen, "writes through b stalled while a's sidecar was frozen\n{}", statuses(&pair));
    assert!(load.wait_more(200, SETTLE), "no progress after the thaw");
    let counts = load.finish();
    eprintln!(
        "acknowledged {} increments, {} errors {:?}",
        counts.total_acked(),
        counts.total_indeterminate(),
        counts.errors
    );
    wait_formed(&pair, "a", FORM_TIMEOUT);
    wait_equal(&pair, SETTLE);
    assert_eq!(status_num(pair.b.port, "failovers"), 0, "{}", statuses(&pair));
    assert_eq!(counts.total_indeterminate(), 0, "writes through b failed: {:?}", counts.errors);
    assert_counters(&pair, &counts, true);
}

// ---------------------------------------------------------------------------------------
// 3. SIGSTOP of the primary Redis
// ---------------------------------------------------------------------------------------

/// The primary Redis frozen past the failover timeout while counters are incremented through
/// b only: b fails over; after SIGCONT the old primary becomes b's replica; each counter ends
/// between its acknowledged increments and those plus the indeterminate ones.
#[test]
fn frozen_primary_redis_fails_over_and_returns_as_replica() {
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let keys = ["ctr:0", "ctr:1", "ctr:2", "ctr:3"];
    let load = IncrLoad::start(pair.b.port, &keys, 3, Duration::from_secs(2));
    assert!(load.wait_more(300, SETTLE), "no progress through b");
    pair.a.redis.stop();
    let stopped = Instant::now();
    let failed_over = wait_until(SETTLE, || status_of(pair.b.port).is_some_and(|s| s.get("role") == "primary"));
    let took = stopped.elapsed();
    let progressed = failed_over && load.wait_more(300, SETTLE);
    pair.a.redis.cont();
    assert!(failed_over, "b did not fail over from a frozen primary Redis\n{}", statuses(&pair));
    eprintln!("b primary {took:?} after SIGSTOP of a's Redis");
    assert!(progressed, "writes through b did not resume after the failover\n{}", statuses(&pair));
    wait_formed(&pair, "b", FORM_TIMEOUT);
    assert_eq!(redis_role(pair.a.redis.port), "slave", "the old primary is b's replica");
    assert!(load.wait_more(200, SETTLE), "no progress once a's Redis returned");
    let counts = load.finish();
    eprintln!(
        "acknowledged {} increments, indeterminate {} {:?}",
        counts.total_acked(),
        counts.total_indeterminate(),
        counts.errors
    );
    wait_equal(&pair, SETTLE);
    assert_counters(&pair, &counts, false);
}

// ---------------------------------------------------------------------------------------
// 4. A partition that drops packets
// ---------------------------------------------------------------------------------------

/// Threads writing distinct keys (`<prefix>:<thread>:<i>` = `v<i>`) through one sidecar until
/// told to stop: each SET tried once; the acknowledged ones are returned.
struct SetLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    handles: Vec<JoinHandle<(Vec<(String, String)>, u64, Vec<String>)>>,
}

impl SetLoad {
    fn start(port: u16, prefix: &str, threads: usize, timeout: Duration) -> SetLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let handles = (0..threads)
            .map(|t| {
                let (stop, acked_n) = (stop.clone(), acked.clone());
                let prefix = format!("{prefix}:{t}");
                std::thread::spawn(move || {
                    let mut c = Client::new(port, timeout);
                    let (mut acked, mut errors, mut samples) = (Vec::new(), 0, Vec::new());
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let (k, v) = (format!("{prefix}:{i}"), format!("v{i}"));
                        i += 1;
                        match c.run::<()>(redis::cmd("SET").arg(&k).arg(&v)) {
                            Ok(()) => {
                                acked.push((k, v));
                                acked_n.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                errors += 1;
                                if samples.len() < 3 {
                                    samples.push(e.to_string());
                                }
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                    (acked, errors, samples)
                })
            })
            .collect();
        SetLoad { stop, acked, handles }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    fn finish(self) -> (Vec<(String, String)>, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = (Vec::new(), 0, Vec::new());
        for h in self.handles {
            let (a, e, s) = h.join().expect("writer panicked");
            all.0.extend(a);
            all.1 += e;
            all.2.extend(s);
        }
        all
    }
}

/// Wait until each load acknowledged `n` more writes than now.
fn wait_both_more(loads: &[&SetLoad], n: u64, timeout: Duration) -> bool {
    let targets: Vec<u64> = loads.iter().map(|l| l.acked() + n).collect();
    wait_until(timeout, || loads.iter().zip(&targets).all(|(l, &t)| l.acked() >= t))
}

/// Every byte between the two sides dropped (sockets stay open) while clients of both
/// sidecars keep writing (through the partition's start, while it lasts, through the heal),
/// plus keys written on both sides during it: each side's acknowledged writes end on both
/// Redis, and a key written on both sides keeps the winner's value, counted in
/// `conflict_keys`.
#[test]
fn packet_dropping_partition_merges_both_sides_writes() {
    let pair = Pair::start_unsynced(PairOpts { relays: true, ..native("all") });
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let timeout = Duration::from_secs(3);
    let load_a = SetLoad::start(pair.a.port, "part:a", 1, timeout);
    let load_b = SetLoad::start(pair.b.port, "part:b", 2, timeout);
    assert!(wait_both_more(&[&load_a, &load_b], 100, SETTLE), "no progress before the partition");
    pair.blackhole_links();
    let cut = Instant::now();
    // Both sides see the partition: a records its writes; b took over and records its own.
    let detected = wait_until(SETTLE, || {
        let (Some(a), Some(b)) = (status_of(pair.a.port), status_of(pair.b.port)) else { return false };
        a.get("writes") == "local"
            && a.get("recording") == "1"
            && b.get("role") == "primary"
            && b.get("writes") == "local"
            && b.get("recording") == "1"
    });
    assert!(detected, "the partition was not detected on both sides\n{}", statuses(&pair));
    eprintln!("both sides serve and record {:?} after the packets stopped", cut.elapsed());
    assert!(
        wait_both_more(&[&load_a, &load_b], 200, SETTLE),
        "writes stalled during the partition (a {}, b {})\n{}",
        load_a.acked(),
        load_b.acked(),
        statuses(&pair)
    );
    // Keys written on both sides.
    let shared = 50;
    let mut both: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    let mut shared_errors = Vec::new();
    for (n, node) in [("a", &pair.a), ("b", &pair.b)] {
        let mut c = Client::new(node.port, timeout);
        for i in 0..shared {
            let (k, v) = (format!("both:{i}"), format!("from-{n}"));
            match c.run::<()>(redis::cmd("SET").arg(&k).arg(&v)) {
                Ok(()) => {
                    let e = both.entry(k).or_default();
                    if n == "a" {
                        e.0 = Some(v);
                    } else {
                        e.1 = Some(v);
                    }
                }
                Err(e) => shared_errors.push(format!("{k} through {n}: {e}")),
            }
        }
    }
    let before = statuses(&pair);
    pair.restore_links();
    let healed = Instant::now();
    let winner = wait_formed_any(&pair, SETTLE);
    eprintln!("partition healed: {winner} primary {:?} after the links were restored", healed.elapsed());
    assert!(
        wait_both_more(&[&load_a, &load_b], 100, SETTLE),
        "writes did not resume after the heal (a {}, b {})\n{}",
        load_a.acked(),
        load_b.acked(),
        statuses(&pair)
    );
    let (mut acked, errors_a, samples_a) = load_a.finish();
    let (acked_b, errors_b, samples_b) = load_b.finish();
    eprintln!(
        "acknowledged: {} through a, {} through b; errors (indeterminate): a {errors_a} {samples_a:?}, b {errors_b} {samples_b:?}; shared-key errors {shared_errors:?}",
        acked.len(),
        acked_b.len()
    );
    acked.extend(acked_b);
    let loser = if winner == "a" { &pair.b } else { &pair.a };
    wait_equal(&pair, SETTLE);
    assert_acked_on_both(&pair, &acked);
    let mut conflicts = 0;
    let mut wrong = Vec::new();
    for (k, (va, vb)) in &both {
        let (want, other) = if winner == "a" { (va, vb) } else { (vb, va) };
        if other.is_some() && want.is_some() {
            conflicts += 1;
        }
        let Some(want) = want else { continue };
        for r in [&pair.a.redis, &pair.b.redis] {
            let got: Option<String> = r.conn().get(k).unwrap();
            if got.as_deref() != Some(want.as_str()) {
                wrong.push(format!("{k} on :{}: {got:?}, the winner ({winner}) wrote {want}", r.port));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} keys written on both sides lost the winner's value: {:?}\nbefore healing:\n{before}\n{}",
        wrong.len(),
        &wrong[..wrong.len().min(5)],
        statuses(&pair)
    );
    assert!(conflicts > 0, "no key was acknowledged on both sides: {shared_errors:?}");
    let counted = wait_until(Duration::from_secs(5), || {
        status_num(pair.a.port, "conflict_keys").max(0) + status_num(pair.b.port, "conflict_keys").max(0) == conflicts
    });
    assert!(counted, "conflict_keys should count the {conflicts} keys written on both sides\n{}", statuses(&pair));
    assert!(status_num(loser.port, "merged_keys") > 0, "the loser's keys were merged\n{}", statuses(&pair));
}

// ---------------------------------------------------------------------------------------
// 5. The replica's Redis at maxmemory with noeviction
// ---------------------------------------------------------------------------------------

/// A replica ignores maxmemory (Redis's default `replica-ignore-maxmemory yes`): writes
/// through either sidecar are acknowledged and present on both Redis, and reads through b
/// see them.
#[test]
fn replica_at_maxmemory_noeviction_still_gets_every_write() {
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let mut rb = pair.b.redis.conn();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut rb).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1mb").query(&mut rb).unwrap();
    let value = "x".repeat(1024);
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    for (n, node) in [("a", &pair.a), ("b", &pair.b)] {
        let mut c = node.conn();
        for i in 0..300 {
            let k = format!("mm:{n}:{i}");
            match c.set::<_, _, ()>(&k, format!("{i}{value}")) {
                Ok(()) => acked.push((k, format!("{i}{value}"))),
                Err(e) => errors.push(format!("{k}: {e}")),
            }
        }
    }
    assert!(errors.is_empty(), "{} writes refused: {:?}", errors.len(), &errors[..errors.len().min(3)]);
    let used = info_field(pair.b.redis.port, "memory", "used_memory");
    assert!(used > 1 << 20, "b's Redis should be past its maxmemory (used_memory {used})");
    // Reads through b see every key.
    let mut cb = pair.b.conn();
    for (k, v) in &acked {
        let got: Option<String> = cb.get(k).unwrap();
        assert_eq!(got.as_deref(), Some(v.as_str()), "GET {k} through b");
    }
    wait_equal(&pair, SETTLE);
    assert_acked_on_both(&pair, &acked);
}

/// N3: while the replica's Redis is down, `write_ack = "all"` acknowledges writes on the
/// primary alone and counts them (`acks_on_primary_alone`, per sidecar); with
/// `min_replicas_to_write = 1` Redis refuses them instead (NOREPLICAS) and nothing is
/// written. Either way, once the replica is back, writes are acknowledged on both and the two
/// Redis are equal.
#[test]
fn replica_down_acks_on_the_primary_alone_or_refuses_with_min_replicas() {
    for min in [0u32, 1] {
        let mut pair = Pair::start_unsynced(PairOpts { min_replicas_to_write: min, ..native("all") });
        wait_formed(&pair, "a", FORM_TIMEOUT);
        pair.b.redis.kill();
        let link_down = wait_until(SETTLE, || {
            status_of(pair.a.port).is_some_and(|st| st.get("replica_link") == "down")
                && status_of(pair.b.port).is_some_and(|st| st.get("replica_link") == "down")
        });
        assert!(link_down, "both sidecars should see the replica down\n{}", statuses(&pair));
        let mut acked = Vec::new();
        let mut refused = Vec::new();
        for (n, node) in [("a", &pair.a), ("b", &pair.b)] {
            let mut c = Client::new(node.port, Duration::from_secs(6));
            for i in 0..100 {
                let k = format!("alone:{n}:{i}");
                match c.run::<()>(redis::cmd("SET").arg(&k).arg(i)) {
                    Ok(()) => acked.push((k, i.to_string())),
                    Err(e) => refused.push(format!("{k}: {e}")),
                }
            }
        }
        let alone =
            || (status_num(pair.a.port, "acks_on_primary_alone"), status_num(pair.b.port, "acks_on_primary_alone"));
        if min == 0 {
            assert!(refused.is_empty(), "{} writes refused: {:?}", refused.len(), &refused[..refused.len().min(3)]);
            // The status text is refreshed once per poll.
            wait_until(SETTLE, || alone().0 >= 100 && alone().1 >= 100);
            let alone = alone();
            assert!(
                alone.0 >= 100 && alone.1 >= 100,
                "each sidecar counts its acks on the primary alone: {alone:?}\n{}",
                statuses(&pair)
            );
        } else {
            assert!(
                acked.is_empty(),
                "min_replicas_to_write = 1 acknowledged {} writes with the replica down",
                acked.len()
            );
            assert!(refused.iter().all(|e| e.contains("NOREPLICAS")), "Redis's own refusal: {:?}", &refused[..3]);
            assert_eq!(alone(), (0, 0), "nothing was acknowledged on the primary alone");
            let mut ra = pair.a.redis.conn();
            let n: u64 = redis::cmd("DBSIZE").query(&mut ra).unwrap();
            assert_eq!(n, 0, "a refused write must not be applied");
        }
        pair.b.redis.restart();
        for (n, node) in [("a", &pair.a), ("b", &pair.b)] {
            let mut c = Client::new(node.port, Duration::from_secs(6));
            for i in 0..20 {
                let (k, v) = (format!("back:{n}:{i}"), i.to_string());
                c.set_until_acked(&k, &v, Instant::now() + SETTLE)
                    .unwrap_or_else(|e| panic!("{e}\n{}", statuses(&pair)));
                acked.push((k, v));
            }
        }
        let data = wait_equal(&pair, SETTLE);
        assert_eq!(data.len(), acked.len(), "min_replicas_to_write = {min}: every acknowledged key, nothing else");
        assert_acked_on_both(&pair, &acked);
    }
}

/// `resplica takeover --admin ADDR` (RESPLICA TAKEOVER on the admin port).
fn takeover(node: &common::pair::Node) -> Result<String, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resplica"))
        .args(["takeover", "--admin", &node.admin_addr()])
        .output()
        .map_err(|e| format!("run resplica takeover: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The copy holding the most is gone for good: a's Redis died (b took over and took writes),
/// then b's whole node died, and a's Redis came back empty. a holds writes rather than serve
/// from less, until the operator runs `resplica takeover`; then a serves, and b, rebuilt,
/// replicates it.
#[test]
fn takeover_lifts_the_hold_when_the_copy_holding_more_is_gone() {
    let mut pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    pair.a.redis.kill();
    let mut cb = Client::new(pair.b.port, Duration::from_secs(6));
    for i in 0..100 {
        cb.set_until_acked(&format!("b:{i}"), "v", Instant::now() + SETTLE)
            .unwrap_or_else(|e| panic!("{e}\n{}", statuses(&pair)));
    }
    drop(cb);
    pair.b.kill_proxy();
    pair.b.redis.kill();
    pair.a.redis.restart();
    // a refuses to serve from its empty Redis: writes wait, and time out.
    let held = wait_until(SETTLE, || status_of(pair.a.port).is_some_and(|st| st.get("writes") == "held"));
    assert!(held, "a should hold writes\n{}", statuses(&pair));
    // (The client waits longer than the proxy's request timeout: a definite refusal.)
    let mut ca = Client::new(pair.a.port, Duration::from_secs(8));
    let refused = ca.run::<()>(redis::cmd("SET").arg("before-takeover").arg(1));
    let refused = refused.expect_err("a write through a must wait, not land on the empty Redis");
    assert_eq!(refused.code(), Some("TRYAGAIN"), "{refused}");
    assert_eq!(status_of(pair.a.port).map(|st| st.get("writes").to_string()).as_deref(), Some("held"));
    let said = takeover(&pair.a).unwrap_or_else(|e| panic!("takeover failed: {e}\n{}", statuses(&pair)));
    assert!(said.contains("operator takeover"), "{said}");
    let mut acked = Vec::new();
    for i in 0..50 {
        let (k, v) = (format!("after:{i}"), i.to_string());
        ca.set_until_acked(&k, &v, Instant::now() + SETTLE).unwrap_or_else(|e| panic!("{e}\n{}", statuses(&pair)));
        acked.push((k, v));
    }
    assert_eq!(status_of(pair.a.port).map(|st| st.get("role").to_string()).as_deref(), Some("primary"));
    let again = takeover(&pair.a).expect_err("a second takeover has nothing to lift");
    assert!(again.contains("already"), "{again}");
    // b comes back (empty): it replicates a.
    pair.b.redis.restart();
    pair.b.start_proxy();
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let data = wait_equal(&pair, SETTLE);
    assert_eq!(data.len(), acked.len(), "the keys written since the takeover, and nothing else");
    assert_acked_on_both(&pair, &acked);
}

// ---------------------------------------------------------------------------------------
// 6. The primary Redis restarted empty
// ---------------------------------------------------------------------------------------

/// A primary Redis without persistence restarted at once, while clients of both sidecars keep
/// writing, must not replicate its emptiness: the replica keeps the data and becomes the
/// primary, and no acknowledged write is lost (a write acknowledged by the empty Redis before
/// the switch must not vanish when it becomes a replica).
#[test]
fn primary_redis_restarted_empty_does_not_wipe_the_replica() {
    let mut pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let mut acked = Vec::new();
    for (n, node) in [("a", &pair.a), ("b", &pair.b)] {
        let mut c = node.conn();
        for i in 0..250 {
            let _: () = c.set(format!("k:{n}:{i}"), i).unwrap();
            acked.push((format!("k:{n}:{i}"), i.to_string()));
        }
    }
    let timeout = Duration::from_secs(3);
    let load_a = SetLoad::start(pair.a.port, "load:a", 1, timeout);
    let load_b = SetLoad::start(pair.b.port, "load:b", 1, timeout);
    assert!(wait_both_more(&[&load_a, &load_b], 100, SETTLE), "no progress before the restart");
    pair.a.redis.restart();
    let restarted = Instant::now();
    wait_formed(&pair, "b", FORM_TIMEOUT);
    eprintln!("b's Redis primary {:?} after a's restarted empty", restarted.elapsed());
    assert_eq!(redis_role(pair.a.redis.port), "slave");
    assert!(wait_both_more(&[&load_a, &load_b], 100, SETTLE), "writes did not resume\n{}", statuses(&pair));
    for (n, load) in [("a", load_a), ("b", load_b)] {
        let (a, errors, samples) = load.finish();
        eprintln!("through {n}: {} acknowledged, {errors} errors {samples:?}", a.len());
        acked.extend(a);
    }
    wait_equal(&pair, SETTLE);
    assert_acked_on_both(&pair, &acked);
}

// ---------------------------------------------------------------------------------------
// 7. Expiry racing writes; an evicting maxmemory-policy
// ---------------------------------------------------------------------------------------

/// `SET k 0 PX 50`, a sleep around 50 ms, `INCR k` (+ `PTTL k`), thousands of times across a
/// few keys, through both sidecars: where the key expired first, INCR made a new key without a
/// TTL. Redis replicates expiry as DELs, so both Redis end with exactly the keys whose last
/// INCR found them expired.
#[test]
fn writes_racing_expiry_leave_both_redis_equal() {
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let threads = 4;
    let keys_per_thread = 8;
    let rounds = 60;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let port = if t % 2 == 0 { pair.a.port } else { pair.b.port };
            std::thread::spawn(move || {
                let mut c = conn_with_timeout(port, Duration::from_secs(10)).expect("connect");
                let keys: Vec<String> = (0..keys_per_thread).map(|j| format!("exp:{t}:{j}")).collect();
                let mut last_pttl: HashMap<String, i64> = HashMap::new();
                let mut writes = 0u64;
                let mut seed = 0x9e37_79b9u64 * (t as u64 + 1);
                for _ in 0..rounds {
                    let mut p = redis::pipe();
                    for k in &keys {
                        p.cmd("SET").arg(k).arg(0).arg("PX").arg(50).ignore();
                    }
                    let _: () = p.query(&mut c).expect("SET PX through the sidecar");
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    // The workload itself: land around the expiry (40..60 ms).
                    std::thread::sleep(Duration::from_millis(40 + (seed >> 33) % 21));
                    let mut p = redis::pipe();
                    for k in &keys {
                        p.cmd("INCR").arg(k).cmd("PTTL").arg(k);
                    }
                    let r: Vec<i64> = p.query(&mut c).expect("INCR + PTTL through the sidecar");
                    for (i, k) in keys.iter().enumerate() {
                        assert_eq!(r[i * 2], 1, "INCR {k} after SET 0 or on an expired key");
                        last_pttl.insert(k.clone(), r[i * 2 + 1]);
                    }
                    writes += 2 * keys.len() as u64;
                }
                (last_pttl, writes)
            })
        })
        .collect();
    let mut persistent: Vec<String> = Vec::new();
    let mut writes = 0;
    for h in handles {
        let (pttl, w) = h.join().expect("writer panicked");
        writes += w;
        persistent.extend(pttl.into_iter().filter(|(_, p)| *p == -1).map(|(k, _)| k));
    }
    persistent.sort();
    eprintln!("{writes} acknowledged writes; {} keys ended without a TTL", persistent.len());
    // Every key that still has a TTL expires within 50 ms of its last write.
    let expired =
        wait_until(SETTLE, || [pair.a.redis.port, pair.b.redis.port].iter().all(|&p| keys_with_ttl(p) == Some(0)));
    assert!(expired, "keys with a TTL did not expire");
    let data = wait_equal(&pair, SETTLE);
    let keys: Vec<String> = data.keys().map(|(_, k)| String::from_utf8_lossy(k).into_owned()).collect();
    assert_eq!(keys, persistent, "exactly the keys whose last INCR found them expired remain");
    for ((_, k), (kind, content, ttl)) in &data {
        assert_eq!((kind.as_str(), content.as_str(), *ttl), ("string", "1", false), "{}", String::from_utf8_lossy(k));
    }
}

/// allkeys-lru with a small maxmemory and writes well beyond it: the primary evicts, Redis
/// replicates the evictions as DELs, and both Redis hold the same keys.
#[test]
fn evicting_policy_leaves_both_redis_equal() {
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    for r in [&pair.a.redis, &pair.b.redis] {
        let used = info_field(r.port, "memory", "used_memory");
        let mut c = r.conn();
        let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("allkeys-lru").query(&mut c).unwrap();
        let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(used + (2 << 20)).query(&mut c).unwrap();
    }
    let value = "v".repeat(500);
    let mut errors = 0;
    let mut acked = 0;
    for (n, node) in [("a", &pair.a), ("b", &pair.b)] {
        let mut c = node.conn();
        for batch in 0..40 {
            let mut p = redis::pipe();
            for i in 0..200 {
                p.set(format!("ev:{n}:{batch}:{i}"), &value).ignore();
            }
            match p.query::<()>(&mut c) {
                Ok(()) => acked += 200,
                Err(e) => {
                    errors += 1;
                    eprintln!("batch refused: {e}");
                }
            }
        }
    }
    assert_eq!(errors, 0, "an evicting policy never refuses a write");
    let evicted = info_field(pair.a.redis.port, "stats", "evicted_keys");
    let data = wait_equal(&pair, SETTLE);
    eprintln!("{acked} SETs acknowledged, {evicted} evicted on a, {} keys on both", data.len());
    assert!(evicted > 0, "the primary evicted nothing");
    assert!(data.len() < acked, "writes went beyond maxmemory");
}

// ---------------------------------------------------------------------------------------
// 8. EVALSHA across failovers
// ---------------------------------------------------------------------------------------

const INCR_SCRIPT: &str = "return redis.call('INCR', KEYS[1])";

/// EVALSHA of the counter script; on NOSCRIPT the client loads the script and retries (the
/// script did not run). `Err`: indeterminate.
fn evalsha_incr(c: &mut Client, sha: &str, key: &str, reloads: &mut u64) -> Result<i64, String> {
    loop {
        match c.run::<i64>(redis::cmd("EVALSHA").arg(sha).arg(1).arg(key)) {
            Ok(v) => return Ok(v),
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                *reloads += 1;
                let loaded: Result<String, _> = c.run(redis::cmd("SCRIPT").arg("LOAD").arg(INCR_SCRIPT));
                if let Err(e) = loaded {
                    return Err(format!("SCRIPT LOAD: {e}"));
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Run `n` acknowledged EVALSHAs through the sidecars on `ports` in turn (an indeterminate
/// one is counted and not retried).
fn eval_phase(ports: &[u16], sha: &str, n: u64, counts: &mut Counts, reloads: &mut u64, refused: &mut u64) {
    let mut clients: Vec<Client> = ports.iter().map(|&p| Client::new(p, Duration::from_secs(6))).collect();
    let deadline = Instant::now() + SETTLE;
    let mut done = 0;
    let mut i = 0;
    while done < n {
        assert!(Instant::now() < deadline, "EVALSHA: only {done} of {n} acknowledged; errors {:?}", counts.errors);
        let c = &mut clients[i % ports.len()];
        i += 1;
        match evalsha_incr(c, sha, "script:ctr", reloads) {
            Ok(_) => {
                *counts.acked.entry("script:ctr".into()).or_default() += 1;
                done += 1;
            }
            Err(e) if e.contains("is unavailable (connect:") => {
                // The sidecar could not connect to the Redis: the call was not sent.
                *refused += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                *counts.indeterminate.entry("script:ctr".into()).or_default() += 1;
                if counts.errors.len() < 5 {
                    counts.errors.push(e);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The counter script through both sidecars across two failovers (a's Redis killed, restarted
/// empty and resynced from b; then b's killed so the resynced copy, whose script cache is
/// empty, takes over): clients reload on NOSCRIPT, and the counter is the same on both Redis
/// and counts each acknowledged call once.
#[test]
fn evalsha_across_failovers_counts_each_call_once() {
    let mut pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(INCR_SCRIPT).query(&mut pair.a.conn()).unwrap();
    let both = [pair.a.port, pair.b.port];
    let mut counts = Counts::default();
    let mut reloads = 0;
    let mut refused = 0;
    eval_phase(&both, &sha, 100, &mut counts, &mut reloads, &mut refused);
    // Failover to b.
    pair.a.redis.kill();
    eval_phase(&[pair.b.port], &sha, 100, &mut counts, &mut reloads, &mut refused);
    pair.a.redis.restart();
    wait_formed(&pair, "b", FORM_TIMEOUT);
    eval_phase(&both, &sha, 100, &mut counts, &mut reloads, &mut refused);
    // Failover back to a's resynced Redis.
    pair.b.redis.kill();
    eval_phase(&[pair.a.port], &sha, 100, &mut counts, &mut reloads, &mut refused);
    pair.b.redis.restart();
    wait_formed(&pair, "a", FORM_TIMEOUT);
    eval_phase(&both, &sha, 100, &mut counts, &mut reloads, &mut refused);
    eprintln!(
        "EVALSHA: {} acknowledged, {} indeterminate {:?}, {reloads} NOSCRIPT reloads, {refused} refused (not sent: the sidecar could not connect)",
        counts.total_acked(),
        counts.total_indeterminate(),
        counts.errors
    );
    wait_equal(&pair, SETTLE);
    assert_counters(&pair, &counts, counts.total_indeterminate() == 0);
}

// ---------------------------------------------------------------------------------------
// 9. The first command right after start
// ---------------------------------------------------------------------------------------

/// Connect to the sidecar on `port` as soon as it listens, and send the first command at once:
/// `RESPLICA STATUS` (the role when the command arrived), `SET first:<n> <n>`, `GET`, in one
/// packet. `Ok(role)` when the SET was acknowledged and read back.
fn first_command(n: &str, port: u16, spawned: Instant) -> Result<String, String> {
    // Refused until the port listens.
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if spawned.elapsed() > Duration::from_secs(10) {
            return Err(format!("{n}'s client port never listened"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let listening = spawned.elapsed();
    let mut c = common::RawConn::connect(port);
    let key = format!("first:{n}");
    let mut frame = common::encode(&["RESPLICA", "STATUS"]);
    frame.extend(common::encode(&["SET", key.as_str(), n]));
    frame.extend(common::encode(&["GET", key.as_str()]));
    c.send(&frame);
    let replies = c
        .read_replies(3, Duration::from_secs(10))
        .map_err(|e| format!("first command through {n}, sent {listening:?} after start: {e}"))?;
    let answered = spawned.elapsed();
    let status = common::text(&replies[0]);
    let role = status.lines().find_map(|l| l.strip_prefix("role:")).unwrap_or("?").trim().to_string();
    eprintln!(
        "{n}: port listening {listening:?} after start (role {role}); first SET+GET answered {answered:?} after start"
    );
    let (set, get) = (common::text(&replies[1]), common::text(&replies[2]));
    if set != "+OK\r\n" {
        return Err(format!("first SET through {n}, sent {listening:?} after start: {set:?}"));
    }
    if get != format!("${}\r\n{n}\r\n", n.len()) {
        return Err(format!("GET {key} through {n} after its SET: {get:?}"));
    }
    Ok(role)
}

/// A client's first command, sent as soon as a sidecar accepts connections, waits while the
/// pair forms instead of failing: both sidecars started together on fresh Redis; then b's
/// started alone (it waits for a's report up to the failover timeout before comparing).
#[test]
fn first_command_right_after_start_waits_for_the_pair() {
    let mut pair = Pair::prepare(native("all"));
    pair.a.spawn_proxy();
    pair.b.spawn_proxy();
    let spawned = Instant::now();
    let firsts: Vec<_> = [("a", pair.a.port), ("b", pair.b.port)]
        .into_iter()
        .map(|(n, port)| std::thread::spawn(move || first_command(n, port, spawned)))
        .collect();
    let results: Vec<_> = firsts.into_iter().map(|h| h.join().expect("client thread")).collect();
    for r in &results {
        if let Err(e) = r {
            panic!("{e}\n{}", statuses(&pair));
        }
    }
    for n in [&mut pair.a, &mut pair.b] {
        n.wait_proxy_ready(common::START_TIMEOUT).unwrap();
    }
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let data = wait_equal(&pair, SETTLE);
    assert_eq!(data.len(), 2);
    drop(pair);

    let mut pair = Pair::prepare(native("all"));
    pair.b.spawn_proxy();
    let spawned = Instant::now();
    let r = first_command("b", pair.b.port, spawned);
    if let Err(e) = r {
        panic!("b started alone: {e}\n{}", statuses(&pair));
    }
    pair.a.start_proxy();
    let primary = wait_formed_any(&pair, FORM_TIMEOUT);
    eprintln!("b started alone first: the pair formed with {primary} primary");
    let data = wait_equal(&pair, SETTLE);
    assert_eq!(data.len(), 1);
}

// ---------------------------------------------------------------------------------------
// 10. The writer node killed right after the pair formed
// ---------------------------------------------------------------------------------------

/// Redis a and sidecar a kill -9'd as soon as the pair reports formed, five times: every run
/// fails over (a write through b is acknowledged within a few seconds).
#[test]
fn writer_node_killed_right_after_forming_fails_over_every_time() {
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for run in 0..5 {
        let mut pair = Pair::start_unsynced(native("all"));
        wait_formed(&pair, "a", FORM_TIMEOUT);
        let formed = Instant::now();
        pair.a.redis.kill();
        pair.a.kill_proxy();
        let killed = Instant::now();
        let since_formed = killed - formed;
        let mut c = Client::new(pair.b.port, Duration::from_secs(2));
        match c.set_until_acked("probe", &run.to_string(), killed + Duration::from_secs(5)) {
            Ok((failed, err)) => {
                let took = killed.elapsed();
                eprintln!(
                    "run {run}: killed {since_formed:?} after formed; failed over in {took:?} ({failed} failed attempts before: {err})"
                );
                times.push(took);
                let v: Option<String> = pair.b.redis.conn().get("probe").unwrap();
                assert_eq!(v.as_deref(), Some(run.to_string().as_str()));
            }
            Err(e) => {
                eprintln!("run {run}: NO FAILOVER within 5 s: {e}\n{}", statuses(&pair));
                failures.push(format!("run {run}: {e}; b: {:?}", status_of(pair.b.port).map(|s| s.raw)));
            }
        }
        if run == 4 && failures.is_empty() {
            // The last run heals and compares.
            pair.a.redis.restart();
            pair.a.start_proxy();
            wait_formed(&pair, "b", FORM_TIMEOUT);
            let data = wait_equal(&pair, SETTLE);
            assert_eq!(data.len(), 1);
        }
    }
    times.sort();
    eprintln!("failover times (kill -9 of Redis a + sidecar a right after forming): {times:?}");
    assert!(failures.is_empty(), "{} of 5 runs did not fail over:\n{}", failures.len(), failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 11. Pub/sub, transactions, WATCH, blocking pops and SELECT through both sidecars
// ---------------------------------------------------------------------------------------

#[test]
fn pubsub_transactions_watch_blocking_and_select_through_both_sidecars() {
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);

    // Pub/sub: subscriber on b, publisher on a.
    {
        let mut sc = pair.b.conn();
        let mut sub = sc.as_pubsub();
        sub.subscribe("news").unwrap();
        sub.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut pc = pair.a.conn();
        let mut got = None;
        let ok = wait_until(Duration::from_secs(10), || {
            let _: i64 = pc.publish("news", "hello").unwrap();
            if let Ok(m) = sub.get_message() {
                got = Some((m.get_channel_name().to_string(), m.get_payload::<String>().unwrap()));
                return true;
            }
            false
        });
        assert!(ok, "the subscriber on b never got a message published on a");
        assert_eq!(got, Some(("news".to_string(), "hello".to_string())));
    }

    // MULTI/EXEC through each sidecar.
    for (n, node) in [("a", &pair.a), ("b", &pair.b)] {
        let mut c = node.conn();
        let (s, v): (String, i64) =
            redis::pipe().atomic().set(format!("tx:{n}"), 10).incr(format!("tx:{n}"), 5).query(&mut c).unwrap();
        assert_eq!((s.as_str(), v), ("OK", 15), "MULTI/EXEC through {n}");
    }

    // WATCH through b, the watched key changed through a: EXEC aborts.
    {
        let mut cb = pair.b.conn();
        let mut ca = pair.a.conn();
        let _: () = ca.set("watched", "base").unwrap();
        let _: () = redis::cmd("WATCH").arg("watched").query(&mut cb).unwrap();
        let seen: String = cb.get("watched").unwrap();
        assert_eq!(seen, "base");
        let _: () = ca.set("watched", "theirs").unwrap();
        let r: Option<(String,)> = redis::pipe().atomic().set("watched", "mine").query(&mut cb).unwrap();
        assert_eq!(r, None, "EXEC must abort: the watched key changed through a");
        // Without a conflict it commits.
        let _: () = redis::cmd("WATCH").arg("watched").query(&mut cb).unwrap();
        let r: Option<(String,)> = redis::pipe().atomic().set("watched2", "mine").query(&mut cb).unwrap();
        assert_eq!(r, Some(("OK".to_string(),)));
    }

    // BLPOP on b woken by LPUSH on a.
    {
        let port = pair.b.port;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut c = conn_with_timeout(port, Duration::from_secs(15)).unwrap();
            let r: redis::RedisResult<Option<(String, String)>> =
                redis::cmd("BLPOP").arg("queue").arg(10).query(&mut c);
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        let blocked = wait_until(Duration::from_secs(10), || {
            info_field(pair.a.redis.port, "clients", "blocked_clients") > 0
                || info_field(pair.b.redis.port, "clients", "blocked_clients") > 0
        });
        assert!(blocked, "BLPOP through b never blocked in a Redis");
        let pushed = Instant::now();
        let _: i64 = pair.a.conn().lpush("queue", "job").unwrap();
        let r = rx.recv_timeout(Duration::from_secs(12)).expect("BLPOP never returned");
        assert_eq!(r, Ok(Some(("queue".to_string(), "job".to_string()))), "BLPOP through b");
        eprintln!("BLPOP through b woken {:?} after LPUSH through a", pushed.elapsed());
    }

    // SELECT 3, then writes through both: on both Redis' db 3, not db 0.
    {
        let mut ca = pair.a.conn();
        let mut cb = pair.b.conn();
        for c in [&mut ca, &mut cb] {
            let _: () = redis::cmd("SELECT").arg(3).query(c).unwrap();
        }
        let _: () = ca.set("db3:a", "1").unwrap();
        let _: () = cb.set("db3:b", "2").unwrap();
        let _: i64 = cb.incr("db3:a", 10).unwrap();
        let got: (Option<String>, Option<String>) = (ca.get("db3:b").unwrap(), cb.get("db3:a").unwrap());
        assert_eq!(got, (Some("2".into()), Some("11".into())));
        for r in [&pair.a.redis, &pair.b.redis] {
            let ok = wait_until(Duration::from_secs(5), || {
                let mut c = r.conn();
                let _: () = redis::cmd("SELECT").arg(3).query(&mut c).unwrap();
                let v: (Option<String>, Option<String>) = (c.get("db3:a").unwrap(), c.get("db3:b").unwrap());
                v == (Some("11".into()), Some("2".into()))
            });
            assert!(ok, "db 3 of Redis :{} lacks the writes", r.port);
            let v: Option<String> = r.conn().get("db3:a").unwrap();
            assert_eq!(v, None, "db 0 of :{} got a db 3 write", r.port);
        }
    }
    let data = wait_equal(&pair, SETTLE);
    assert!(data.keys().any(|(db, _)| *db == 3));
}

// ---------------------------------------------------------------------------------------
// Harness self-test
// ---------------------------------------------------------------------------------------

/// `LinkRelay::blackhole` holds bytes both ways on open sockets and leaves new connections
/// unanswered; `restore` delivers what was held.
#[test]
fn harness_relay_blackhole_holds_bytes_and_restore_delivers_them() {
    let redis = RedisServer::start();
    let relay = LinkRelay::start(redis.port);
    let mut c = conn_with_timeout(relay.port, Duration::from_millis(500)).unwrap();
    let _: () = c.set("k", "v").unwrap();
    relay.blackhole();
    let r: redis::RedisResult<Option<String>> = c.get("k");
    assert!(r.is_err(), "a blackholed link answered: {r:?}");
    // A new connection is accepted by the kernel but answered by no one.
    let mut fresh = common::RawConn::connect(relay.port);
    fresh.send_cmd(&["PING"]);
    assert!(
        fresh.read_reply(Duration::from_millis(300)).is_err(),
        "a new connection through a blackholed link answered"
    );
    // The raw socket keeps its bytes until restore.
    let mut raw = common::RawConn::connect(relay.port);
    raw.send_cmd(&["GET", "k"]);
    assert!(raw.read_reply(Duration::from_millis(300)).is_err());
    relay.restore();
    let reply = raw.read_reply(Duration::from_secs(5)).expect("held request delivered on restore");
    assert_eq!(&reply[..], b"$1\r\nv\r\n");
    let pong = fresh.read_reply(Duration::from_secs(5)).expect("held connection connected on restore");
    assert_eq!(&pong[..], b"+PONG\r\n");
    let mut c2 = conn_with_timeout(relay.port, Duration::from_secs(2)).unwrap();
    let v: Option<String> = c2.get("k").unwrap();
    assert_eq!(v.as_deref(), Some("v"));
}

// ---------------------------------------------------------------------------------------
// A primary's sidecar leaving (SIGTERM, rolling update)
// ---------------------------------------------------------------------------------------

/// SIGTERM to the primary's sidecar: while it drains it hands the primary role to the peer's
/// Redis (a switchover, not a failover), its own Redis follows, and no increment written
/// through the other sidecar is lost or refused.
#[test]
fn draining_primary_sidecar_hands_the_role_over_and_loses_nothing() {
    let mut pair = Pair::start_unsynced(PairOpts { drain_ms: 3000, ..native("all") });
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let keys = ["ctr:0", "ctr:1", "ctr:2", "ctr:3"];
    let load = IncrLoad::start(pair.b.port, &keys, 3, Duration::from_secs(2));
    assert!(load.wait_more(300, SETTLE), "no progress through b");
    let leaving = Instant::now();
    let exit = std::thread::scope(|s| {
        let a = &mut pair.a;
        let t = s.spawn(move || a.terminate_proxy(Duration::from_secs(20)));
        let handed =
            wait_until(Duration::from_secs(3), || status_of(pair.b.port).is_some_and(|st| st.get("role") == "primary"));
        let b_status = status_of(pair.b.port).map(|st| st.raw).unwrap_or_default();
        assert!(handed, "b's Redis did not take the primary role while a drained\n{b_status}");
        eprintln!("b primary {:?} after SIGTERM to a's sidecar", leaving.elapsed());
        t.join().expect("terminate thread")
    });
    assert!(exit.is_some_and(|st| st.success()), "a's sidecar did not exit 0 after the drain: {exit:?}");
    assert!(wait_until(SETTLE, || redis_role(pair.a.redis.port) == "slave"), "a's Redis is not b's replica");
    assert!(load.wait_more(300, SETTLE), "writes through b did not go on after the handover");
    let counts = load.finish();
    eprintln!(
        "acknowledged {}, indeterminate {} {:?}",
        counts.total_acked(),
        counts.total_indeterminate(),
        counts.errors
    );
    assert_eq!(counts.total_indeterminate(), 0, "writes through b failed: {:?}", counts.errors);
    wait_equal(&pair, SETTLE);
    assert_counters(&pair, &counts, true);
}
