//! Connection state through the proxy: RESP3, pub/sub, blocking commands, transactions,
//! AUTH (client side and upstream), refused commands, MONITOR.

mod common;

use std::time::{Duration, Instant};

use common::*;
use redis::Value;

fn redis_version(redis: &RedisServer) -> String {
    let info: String = redis::cmd("INFO").arg("server").query(&mut redis.conn()).unwrap();
    info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap().trim().to_string()
}

#[test]
fn resp3_hello_maps_doubles_nulls() {
    let redis = RedisServer::start();
    let version = redis_version(&redis);
    for driver in drivers() {
        let proxy = Proxy::start(&redis, &["--io-driver", driver, "--threads", "2"]);
        let mut c = proxy.raw();
        let hello = c.call(&["HELLO", "3"]);
        let h = text(&hello);
        assert!(h.starts_with("%7\r\n"), "{driver}: HELLO 3 must return a 7-entry map: {h:?}");
        assert!(h.contains("$5\r\nproto\r\n:3\r\n"), "{driver}: {h:?}");
        assert!(h.contains("$6\r\nserver\r\n$5\r\nredis\r\n"), "{driver}: {h:?}");
        let k = format!("r3:{driver}");
        assert_eq!(text(&c.call(&["HSET", &format!("{k}:h"), "f1", "v1", "f2", "v2"])), ":2\r\n");
        let all = text(&c.call(&["HGETALL", &format!("{k}:h")]));
        assert!(all.starts_with("%2\r\n"), "{driver}: HGETALL in RESP3 is a map: {all:?}");
        assert!(all.contains("$2\r\nf1\r\n$2\r\nv1\r\n") && all.contains("$2\r\nf2\r\n$2\r\nv2\r\n"), "{all:?}");
        assert_eq!(text(&c.call(&["ZADD", &format!("{k}:z"), "1.5", "m"])), ":1\r\n");
        assert_eq!(text(&c.call(&["ZSCORE", &format!("{k}:z"), "m"])), ",1.5\r\n", "{driver}: RESP3 double");
        assert_eq!(text(&c.call(&["GET", &format!("{k}:missing")])), "_\r\n", "{driver}: RESP3 null");
        assert_eq!(text(&c.call(&["SISMEMBER", &format!("{k}:missing"), "x"])), ":0\r\n");
        assert_eq!(text(&c.call(&["CLIENT", "GETNAME"])), "_\r\n", "{driver}: local nil follows the protocol");

        // Back to RESP2 on the same connection.
        let h2 = text(&c.call(&["HELLO", "2"]));
        assert!(h2.starts_with("*14\r\n"), "{h2:?}");
        assert!(text(&c.call(&["HGETALL", &format!("{k}:h")])).starts_with("*4\r\n"));
        assert_eq!(text(&c.call(&["ZSCORE", &format!("{k}:z"), "m"])), "$3\r\n1.5\r\n");
        assert_eq!(text(&c.call(&["GET", &format!("{k}:missing")])), "$-1\r\n");

        // HELLO reports the version of the Redis behind the proxy, whichever core took the
        // connection.
        for i in 0..16 {
            let mut c = proxy.raw();
            let h = text(&c.call(&["HELLO", "3"]));
            let want = format!("$7\r\nversion\r\n${}\r\n{version}\r\n", version.len());
            assert!(h.contains(&want), "{driver}: connection {i}: HELLO must report Redis {version}: {h:?}");
        }
    }
}

/// Read pub/sub messages until one arrives (bounded by the connection's read timeout).
fn next_msg(ps: &mut redis::PubSub<'_>) -> (String, Option<String>, String) {
    let m = ps.get_message().unwrap_or_else(|e| panic!("no pub/sub message: {e}"));
    let pattern: Option<String> = m.get_pattern().ok();
    (m.get_channel_name().to_string(), pattern, m.get_payload().unwrap())
}

fn numsub(redis: &RedisServer, ch: &str) -> i64 {
    let v: (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg(ch).query(&mut redis.conn()).unwrap();
    v.1
}

#[test]
fn pubsub_subscribe_psubscribe_unsubscribe() {
    let redis = RedisServer::start();
    for driver in drivers() {
        let proxy = Proxy::start(&redis, &["--io-driver", driver, "--threads", "2"]);
        let ch = format!("ps:{driver}:ch");
        let mut sub = proxy.conn();
        let mut publ = proxy.conn();
        let mut ps = sub.as_pubsub();
        ps.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ps.subscribe(&ch).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || numsub(&redis, &ch) == 1),
            "{driver}: subscription not seen by Redis"
        );

        let n: i64 = redis::cmd("PUBLISH").arg(&ch).arg("through-proxy").query(&mut publ).unwrap();
        assert_eq!(n, 1);
        assert_eq!(next_msg(&mut ps), (ch.clone(), None, "through-proxy".to_string()));

        let n: i64 = redis::cmd("PUBLISH").arg(&ch).arg("direct").query(&mut redis.conn()).unwrap();
        assert_eq!(n, 1);
        assert_eq!(next_msg(&mut ps), (ch.clone(), None, "direct".to_string()));

        let pat = format!("ps:{driver}:news.*");
        ps.psubscribe(&pat).unwrap();
        let news = format!("ps:{driver}:news.sport");
        assert!(wait_until(Duration::from_secs(5), || {
            let n: i64 = redis::cmd("PUBSUB").arg("NUMPAT").query(&mut redis.conn()).unwrap();
            n == 1
        }));
        let n: i64 = redis::cmd("PUBLISH").arg(&news).arg("goal").query(&mut publ).unwrap();
        assert_eq!(n, 1);
        assert_eq!(next_msg(&mut ps), (news.clone(), Some(pat.clone()), "goal".to_string()));

        ps.unsubscribe(&ch).unwrap();
        assert!(wait_until(Duration::from_secs(5), || numsub(&redis, &ch) == 0), "{driver}: UNSUBSCRIBE not applied");
        let n: i64 = redis::cmd("PUBLISH").arg(&ch).arg("nobody-hears").query(&mut publ).unwrap();
        assert_eq!(n, 0);
        // The pattern subscription still works, and the unsubscribed message never arrives.
        let n: i64 = redis::cmd("PUBLISH").arg(&news).arg("after").query(&mut publ).unwrap();
        assert_eq!(n, 1);
        assert_eq!(next_msg(&mut ps), (news.clone(), Some(pat.clone()), "after".to_string()));
        ps.punsubscribe(&pat).unwrap();
        drop(ps);
        // The publisher, a normal client, was never disturbed.
        let pong: String = redis::cmd("PING").query(&mut publ).unwrap();
        assert_eq!(pong, "PONG");
    }
}

#[test]
fn blpop_woken_by_rpush_does_not_stall_others() {
    let redis = RedisServer::start();
    for driver in drivers() {
        // One thread: every client shares the same core and upstream connections.
        let proxy = Proxy::start(&redis, &["--io-driver", driver, "--threads", "1"]);
        let list = format!("bl:{driver}:list");
        let port = proxy.port;
        let l2 = list.clone();
        let blocked = std::thread::spawn(move || {
            let mut a = redis_conn(port, None);
            let t = Instant::now();
            let r: Option<(String, String)> = redis::cmd("BLPOP").arg(&l2).arg(10).query(&mut a).unwrap();
            (r, Instant::now(), t.elapsed())
        });
        let mut d = redis.conn();
        assert!(
            wait_until(Duration::from_secs(5), || {
                let info: String = redis::cmd("INFO").arg("clients").query(&mut d).unwrap();
                info.contains("blocked_clients:1")
            }),
            "{driver}: BLPOP never blocked in Redis"
        );

        // A third client keeps being served while the BLPOP blocks.
        let mut c = proxy.conn();
        let _: () = redis::cmd("SET").arg(format!("bl:{driver}:other")).arg("x").query(&mut c).unwrap();
        for i in 0..50 {
            let t = Instant::now();
            let v: String = redis::cmd("GET").arg(format!("bl:{driver}:other")).query(&mut c).unwrap();
            assert_eq!(v, "x");
            assert!(t.elapsed() < Duration::from_secs(1), "{driver}: GET {i} took {:?} during the block", t.elapsed());
        }
        let info: String = redis::cmd("INFO").arg("clients").query(&mut d).unwrap();
        assert!(info.contains("blocked_clients:1"), "{driver}: the BLPOP must still be blocked");

        let mut b = proxy.conn();
        let pushed_at = Instant::now();
        let len: i64 = redis::cmd("RPUSH").arg(&list).arg("wake-up").query(&mut b).unwrap();
        assert!(len <= 1);
        let (r, got_at, took) = blocked.join().unwrap();
        assert_eq!(r, Some((list.clone(), "wake-up".to_string())), "{driver}");
        assert!(got_at >= pushed_at, "{driver}: BLPOP answered before the push");
        assert!(took < Duration::from_secs(9), "{driver}: BLPOP waited for its timeout ({took:?})");
        let n: i64 = redis::cmd("LLEN").arg(&list).query(&mut d).unwrap();
        assert_eq!(n, 0);
    }
}

#[test]
fn brpop_times_out_with_nil() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.conn();
    let t = Instant::now();
    let r: Value = redis::cmd("BRPOP").arg("bl:empty").arg(1).query(&mut c).unwrap();
    let took = t.elapsed();
    assert_eq!(r, Value::Nil);
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
    // The connection goes on normally afterwards.
    let _: () = redis::cmd("SET").arg("bl:after").arg("1").query(&mut c).unwrap();
    let v: i64 = redis::cmd("GET").arg("bl:after").query(&mut c).unwrap();
    assert_eq!(v, 1);
}

#[test]
fn watch_multi_exec() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut a = proxy.conn();
    let mut b = proxy.conn();
    let _: () = redis::cmd("SET").arg("tx:k").arg("start").query(&mut a).unwrap();

    // Aborted: another client changes the watched key.
    let _: () = redis::cmd("WATCH").arg("tx:k").query(&mut a).unwrap();
    let _: () = redis::cmd("SET").arg("tx:k").arg("other").query(&mut b).unwrap();
    let ok: String = redis::cmd("MULTI").query(&mut a).unwrap();
    assert_eq!(ok, "OK");
    let q: String = redis::cmd("SET").arg("tx:k").arg("mine").query(&mut a).unwrap();
    assert_eq!(q, "QUEUED");
    let r: Value = redis::cmd("EXEC").query(&mut a).unwrap();
    assert_eq!(r, Value::Nil, "EXEC must abort");
    let v: String = redis::cmd("GET").arg("tx:k").query(&mut a).unwrap();
    assert_eq!(v, "other");
    let v: String = redis::cmd("GET").arg("tx:k").query(&mut redis.conn()).unwrap();
    assert_eq!(v, "other");

    // Not aborted when nobody touches the key.
    let _: () = redis::cmd("WATCH").arg("tx:k").query(&mut a).unwrap();
    let _: () = redis::cmd("MULTI").query(&mut a).unwrap();
    let _: () = redis::cmd("SET").arg("tx:k").arg("mine").query(&mut a).unwrap();
    let r: Value = redis::cmd("EXEC").query(&mut a).unwrap();
    assert_eq!(r, Value::Array(vec![Value::Okay]));
    let v: String = redis::cmd("GET").arg("tx:k").query(&mut b).unwrap();
    assert_eq!(v, "mine");

    // A plain transaction, raw.
    let mut c = proxy.raw();
    let mut bytes = encode(&["MULTI"]);
    bytes.extend(encode(&["INCR", "tx:n"]));
    bytes.extend(encode(&["INCR", "tx:n"]));
    bytes.extend(encode(&["EXEC"]));
    c.send(&bytes);
    let r: Vec<String> = c.read_replies(4, IO_TIMEOUT).unwrap().iter().map(|b| text(b)).collect();
    assert_eq!(r, ["+OK\r\n", "+QUEUED\r\n", "+QUEUED\r\n", "*2\r\n:1\r\n:2\r\n"]);
    // And through the redis crate's atomic pipeline.
    let (x, y): (i64, i64) =
        redis::pipe().atomic().cmd("INCR").arg("tx:m").cmd("INCR").arg("tx:m").query(&mut a).unwrap();
    assert_eq!((x, y), (1, 2));
}

#[test]
fn client_auth_with_requirepass() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--requirepass", "pw", "--threads", "2"]);
    let mut c = proxy.raw();
    assert_eq!(text(&c.call(&["GET", "auth:k"])), "-NOAUTH Authentication required.\r\n");
    assert_eq!(text(&c.call(&["SET", "auth:k", "1"])), "-NOAUTH Authentication required.\r\n");
    assert_eq!(text(&c.call(&["AUTH", "nope"])), "-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    assert_eq!(
        text(&c.call(&["AUTH", "default", "nope"])),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(text(&c.call(&["GET", "auth:k"])), "-NOAUTH Authentication required.\r\n");
    assert_eq!(text(&c.call(&["AUTH", "pw"])), "+OK\r\n");
    assert_eq!(text(&c.call(&["SET", "auth:k", "1"])), "+OK\r\n");
    assert_eq!(text(&c.call(&["GET", "auth:k"])), "$1\r\n1\r\n");
    let exists: bool = redis::cmd("EXISTS").arg("auth:k").query(&mut redis.conn()).unwrap();
    assert!(exists, "nothing was written before AUTH, the write after it is in Redis");

    // HELLO with AUTH authenticates and switches protocol at once.
    let mut h = proxy.raw();
    let r = text(&h.call(&["HELLO", "3"]));
    assert!(r.starts_with("-NOAUTH"), "{r:?}");
    let r = text(&h.call(&["HELLO", "3", "AUTH", "default", "wrong"]));
    assert!(r.starts_with("-WRONGPASS"), "{r:?}");
    let r = text(&h.call(&["HELLO", "3", "AUTH", "default", "pw"]));
    assert!(r.starts_with("%7\r\n") && r.contains("$5\r\nproto\r\n:3\r\n"), "{r:?}");
    assert_eq!(text(&h.call(&["GET", "auth:k"])), "$1\r\n1\r\n");

    // A client library with the password in its URL.
    let mut lib = redis_conn(proxy.port, Some("pw"));
    let v: i64 = redis::cmd("INCR").arg("auth:k").query(&mut lib).unwrap();
    assert_eq!(v, 2);
}

#[test]
fn upstream_password_is_invisible_to_clients() {
    let redis = RedisServer::start_with(&["--requirepass", "upw"]);
    // Redis really requires it.
    let mut direct = RawConn::connect(redis.port);
    assert!(text(&direct.call(&["GET", "x"])).starts_with("-NOAUTH"));

    let proxy = Proxy::with_config(&format!(
        "[node]\nthreads = 2\nio_driver = \"epoll\"\n[redis]\naddress = \"{}\"\npassword = \"upw\"\n",
        redis.addr()
    ));
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET").arg("up:k").arg("v").query(&mut c).unwrap();
    let v: String = redis::cmd("GET").arg("up:k").query(&mut c).unwrap();
    assert_eq!(v, "v");
    let v: String = redis::cmd("GET").arg("up:k").query(&mut redis.conn()).unwrap();
    assert_eq!(v, "v");
    // The dedicated connection of a transaction authenticates too.
    let (x, y): (i64, i64) =
        redis::pipe().atomic().cmd("INCR").arg("up:n").cmd("INCR").arg("up:n").query(&mut c).unwrap();
    assert_eq!((x, y), (1, 2));
    // So does the RESP3 connection.
    let mut r3 = proxy.raw();
    assert!(text(&r3.call(&["HELLO", "3"])).starts_with("%7"));
    assert_eq!(text(&r3.call(&["GET", "up:k"])), "$1\r\nv\r\n");
    // And a blocking command.
    let r: Value = redis::cmd("BLPOP").arg("up:none").arg(1).query(&mut c).unwrap();
    assert_eq!(r, Value::Nil);
}

#[test]
fn refused_commands_keep_redis_running() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.conn();
    for cmd in [
        &["SHUTDOWN"][..],
        &["shutdown", "NOSAVE"],
        &["REPLICAOF", "127.0.0.1", "1"],
        &["replicaof", "NO", "ONE"],
        &["SLAVEOF", "NO", "ONE"],
    ] {
        let mut q = redis::cmd(cmd[0]);
        for a in &cmd[1..] {
            q.arg(*a);
        }
        let err = q.query::<Value>(&mut c).unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{cmd:?}: {err}");
    }
    let mut d = redis.conn();
    let pong: String = redis::cmd("PING").query(&mut d).unwrap();
    assert_eq!(pong, "PONG");
    let info: String = redis::cmd("INFO").arg("replication").query(&mut d).unwrap();
    assert!(info.contains("role:master"), "{info}");
    // The proxy connection is still fine.
    let _: () = redis::cmd("SET").arg("ref:k").arg("1").query(&mut c).unwrap();
    let v: i64 = redis::cmd("GET").arg("ref:k").query(&mut c).unwrap();
    assert_eq!(v, 1);
}

#[test]
fn monitor_sees_other_clients_commands() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut m = proxy.raw();
    // The +OK is Redis's own answer to MONITOR: from here on Redis feeds this connection.
    assert_eq!(text(&m.call(&["MONITOR"])), "+OK\r\n");
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET").arg("mon:marker").arg("seen-by-monitor").query(&mut c).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lines = Vec::new();
    let seen = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match m.read_reply(left) {
            Ok(l) => text(&l),
            Err(e) => panic!("monitor connection: {e}; lines so far: {lines:?}"),
        };
        assert!(line.starts_with('+'), "MONITOR lines are simple strings: {line:?}");
        if line.contains("\"SET\" \"mon:marker\" \"seen-by-monitor\"") {
            break true;
        }
        lines.push(line);
    };
    assert!(seen);
    // The monitoring client's other commands are still answered by Redis (in monitor mode
    // Redis accepts only a few; QUIT is answered by the proxy and closes the connection).
    m.send_cmd(&["QUIT"]);
}

/// A script that runs past its time limit can be stopped with SCRIPT KILL from another
/// client, even one on the same core (whose shared lane is the one the script blocks) and
/// in another database (Redis refuses SELECT while a script runs). The script's own client
/// gets Redis's error and the lane serves again.
#[test]
fn script_kill_stops_a_runaway_script_sent_through_the_same_lane() {
    let redis = RedisServer::start();
    // One core: both clients share one upstream lane.
    let proxy = Proxy::start(&redis, &["--threads", "1"]);
    let mut direct = RawConn::connect(redis.port);
    assert_eq!(text(&direct.call(&["CONFIG", "SET", "lua-time-limit", "10"])), "+OK\r\n");
    let mut busy = proxy.raw();
    assert_eq!(text(&busy.call(&["SELECT", "9"])), "+OK\r\n");
    busy.send_cmd(&["EVAL", "while true do end", "0"]);
    // Redis answers -BUSY to everyone once the script is past lua-time-limit.
    assert!(
        wait_until(Duration::from_secs(5), || text(&direct.call(&["PING"])).starts_with("-BUSY")),
        "the script never started"
    );
    let mut killer = proxy.raw();
    assert_eq!(text(&killer.call(&["SELECT", "9"])), "+OK\r\n");
    killer.send_cmd(&["SCRIPT", "KILL"]);
    let reply = killer.read_reply(Duration::from_secs(3)).map(|r| text(&r));
    assert_eq!(reply.as_deref(), Ok("+OK\r\n"), "SCRIPT KILL must reach Redis while the script runs");
    let killed = text(&busy.read_reply(Duration::from_secs(3)).expect("the script's client gets its reply"));
    assert!(killed.starts_with("-ERR Script killed by user"), "{killed:?}");
    // Both clients go on as before, in their database.
    assert_eq!(text(&killer.call(&["SET", "sk:k", "v"])), "+OK\r\n");
    assert_eq!(text(&busy.call(&["GET", "sk:k"])), "$1\r\nv\r\n");
    assert_eq!(text(&direct.call(&["EXISTS", "sk:k"])), ":0\r\n", "the key is in database 9, not 0");
}

/// A client's first blocking command goes out on a spare connection with its SELECT in the
/// same write; spare connections are replaced when Redis restarts.
#[test]
fn first_blocking_pop_in_another_database_and_after_a_redis_restart() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "1"]);
    for round in 0..2 {
        let mut direct = RawConn::connect(redis.port);
        direct.call(&["SELECT", "5"]);
        direct.call(&["RPUSH", "warm:list", &format!("v{round}")]);
        let mut c = proxy.raw();
        assert_eq!(&c.call(&["SELECT", "5"])[..], b"+OK\r\n");
        let r = c.call(&["BLPOP", "warm:list", "2"]);
        let expected = format!("*2\r\n$9\r\nwarm:list\r\n$2\r\nv{round}\r\n");
        assert_eq!(text(&r), expected, "round {round}");
        if round == 0 {
            redis.kill();
            redis.restart();
            // Wait until the proxy serves again (its lanes reconnect).
            let mut probe = proxy.raw();
            assert!(wait_until(Duration::from_secs(10), || probe.call(&["GET", "x"]).starts_with(b"$-1")));
        }
    }
}

/// With a `[client] password`, a connection that never authenticates is told so and closed
/// after `auth_timeout_ms`; an authenticated one stays, however idle.
#[test]
fn unauthenticated_connections_time_out() {
    let redis = RedisServer::start();
    let proxy = Proxy::with_config(&format!(
        "[redis]\naddress = \"{}\"\n[client]\npassword = \"pw\"\nauth_timeout_ms = 300\n",
        redis.addr()
    ));
    let mut idle = proxy.raw();
    let mut authed = proxy.raw();
    assert_eq!(text(&authed.call(&["AUTH", "pw"])), "+OK\r\n");
    let started = Instant::now();
    let r = idle.read_reply(Duration::from_secs(5)).expect("the timeout's error");
    assert!(text(&r).contains("authentication timed out"), "{:?}", text(&r));
    idle.expect_eof(Duration::from_secs(5)).expect("closed after the timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Opened before the closed one, so past the timeout too: it still serves.
    assert_eq!(text(&authed.call(&["PING"])), "+PONG\r\n");
}
