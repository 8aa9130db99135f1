//! Native mode (DESIGN.md N1–N7): two real redis-server processes on Redis's own replication,
//! steered by two real resplica sidecars. Every test counts the writes it got acknowledged and
//! ends by comparing both Redis.

mod common;

use std::time::{Duration, Instant};

use common::native::{native, role_of, status_of, wait_equal, wait_formed, FORM_TIMEOUT};
use common::pair::Pair;
use redis::Commands;

#[test]
fn forms_on_the_higher_priority_and_replicates_both_ways() {
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    assert_eq!(role_of(&mut pair.a.redis.conn()), "master");
    assert_eq!(role_of(&mut pair.b.redis.conn()), "slave");
    let mut ca = pair.a.conn();
    let mut cb = pair.b.conn();
    for i in 0..200 {
        let _: () = ca.set(format!("a:{i}"), i).unwrap();
        let _: () = cb.set(format!("b:{i}"), i).unwrap();
        // Read-your-writes through the replica's sidecar.
        let v: i64 = cb.get(format!("b:{i}")).unwrap();
        assert_eq!(v, i);
        let v: i64 = cb.get(format!("a:{i}")).unwrap();
        assert_eq!(v, i, "write_ack=all: a's acknowledged write is on b's Redis");
    }
    // The replica's Redis refuses writes sent to it directly (fencing for free).
    let r: redis::RedisResult<()> = pair.b.redis.conn().set("x", 1);
    let e = r.expect_err("a replica accepted a write");
    assert_eq!(e.kind(), redis::ErrorKind::ReadOnly, "{e}");
    wait_equal(&pair, Duration::from_secs(10));
    let st = status_of(pair.b.port).unwrap();
    assert_eq!(st.get("mode"), "native");
    assert_eq!(st.get("role"), "replica");
}

#[test]
fn primary_redis_killed_fails_over_and_returns_as_replica_without_wiping() {
    let mut pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let mut cb = pair.b.conn();
    let mut acked = Vec::new();
    for i in 0..300 {
        let _: () = cb.set(format!("k{i}"), i).unwrap();
        acked.push(i);
    }
    pair.a.redis.kill();
    let killed = Instant::now();
    // Writes through b succeed again after the failover.
    let mut first_ok = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 300;
    while Instant::now() < deadline && acked.len() < 600 {
        let mut c = match pair.b.try_conn(Duration::from_secs(6)) {
            Ok(c) => c,
            Err(_) => continue,
        };
        match c.set::<_, _, ()>(format!("k{i}"), i) {
            Ok(()) => {
                first_ok.get_or_insert_with(|| killed.elapsed());
                acked.push(i);
                i += 1;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let took = first_ok.expect("no write accepted after the primary Redis died");
    eprintln!("failover: first write accepted {took:?} after kill -9 of the primary Redis");
    // Redis a comes back empty (no persistence): it must become b's replica, not wipe b.
    pair.a.redis.restart();
    wait_formed(&pair, "b", FORM_TIMEOUT);
    wait_equal(&pair, Duration::from_secs(15));
    let mut ra = pair.a.redis.conn();
    for &i in &acked {
        let v: Option<i64> = ra.get(format!("k{i}")).unwrap();
        assert_eq!(v, Some(i), "acknowledged write k{i} lost");
    }
}

#[test]
fn dead_primary_sidecar_is_not_a_failover_and_rolling_restart_keeps_writes() {
    let mut pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    pair.a.kill_proxy();
    let mut cb = pair.b.conn();
    for i in 0..2000 {
        let _: () = cb.set(format!("r{i}"), i).unwrap();
    }
    let st = status_of(pair.b.port).unwrap();
    assert_eq!(st.get("primary"), "a", "a dead sidecar is not a failover: {}", st.raw);
    pair.b.kill_proxy();
    pair.a.start_proxy();
    pair.b.start_proxy();
    wait_formed(&pair, "a", FORM_TIMEOUT);
    wait_equal(&pair, Duration::from_secs(15));
    let n: usize = pair.b.redis.conn().keys::<_, Vec<String>>("r*").unwrap().len();
    assert_eq!(n, 2000);
    let n: usize = pair.a.redis.conn().keys::<_, Vec<String>>("r*").unwrap().len();
    assert_eq!(n, 2000);
}

/// The peer link authenticates by a challenge-response on the shared secret: two sidecars
/// with different secrets never link up, and the secret itself, sent in clear the old way
/// (`RS.NAUTH <secret> <node>`), opens nothing.
#[test]
fn peer_link_needs_the_secret_and_never_takes_it_in_clear() {
    use common::pair::PairOpts;
    use common::{text, RawConn};
    let pair = Pair::start_unsynced(PairOpts { b_secret: Some("not-the-secret".into()), ..native("all") });
    let linked = |port: u16, peer: &str| {
        status_of(port).is_some_and(|st| st.raw.lines().any(|l| l.starts_with(&format!("peer:{peer} link=up"))))
    };
    // Both serve their own clients; neither ever sees the other's link up.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert!(!linked(pair.a.port, "b") && !linked(pair.b.port, "a"), "linked with different secrets");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut raw = RawConn::connect(pair.a.peer_port);
    let r = raw.call(&["RS.NAUTH", "pair-test-secret", "b"]);
    assert!(text(&r).starts_with("-NOAUTH"), "{}", text(&r));
    let mut raw = RawConn::connect(pair.a.peer_port);
    let r = raw.call(&["RS.HELLO", "b", "00112233445566778899aabbccddeeff"]);
    assert!(text(&r).starts_with("*2\r\n"), "a challenge: {}", text(&r));
    let r = raw.call(&["RS.PROVE", "00"]);
    assert!(text(&r).starts_with("-NOAUTH"), "a forged proof: {}", text(&r));
}

/// Both Redis require a password: the sidecars give the replica what Redis's own replication
/// needs (`masterauth`, from `[redis] password`), so the replica links and every write reaches
/// it.
#[test]
fn password_protected_redis_replicate() {
    use common::pair::PairOpts;
    let pair = Pair::start_unsynced(PairOpts { redis_password: Some("redis-pw".into()), ..native("all") });
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let mut cb = pair.b.conn();
    for i in 0..50 {
        let _: () = cb.set(format!("pw:{i}"), i).unwrap();
    }
    let mut rb = pair.b.redis.conn();
    let info: String = redis::cmd("INFO").arg("replication").query(&mut rb).unwrap();
    assert!(info.contains("master_link_status:up"), "{info}");
    let v: i64 = rb.get("pw:49").unwrap();
    assert_eq!(v, 49, "write_ack = all: on b's Redis once acknowledged");
}
