//! Things going wrong: malformed input, Redis dying or stalling, too many clients, bad
//! configuration, SIGTERM with work in flight, a pub/sub client that stops reading.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn malformed_input_gets_redis_error_and_close() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut other = proxy.conn();
    let _: () = redis::cmd("SET").arg("mal:n").arg(0).query(&mut other).unwrap();
    let cases: [(&str, &[u8], &str); 5] = [
        ("bad multibulk count", b"*x\r\n", "-ERR Protocol error: invalid multibulk length\r\n"),
        ("negative bulk length", b"*1\r\n$-5\r\n", "-ERR Protocol error: invalid bulk length\r\n"),
        ("unbalanced quotes", b"SET k \"abc\r\n", "-ERR Protocol error: unbalanced quotes in request\r\n"),
        ("no dollar", b"*1\r\nfoo\r\n", "-ERR Protocol error: expected '$', got 'f'\r\n"),
        ("good command first", b"PING\r\n*x\r\n", "+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"),
    ];
    for (i, (what, bytes, want)) in cases.iter().enumerate() {
        // Redis itself, for the reference text.
        let mut d = RawConn::connect(redis.port);
        d.send(bytes);
        let n = want.matches("\r\n").count();
        let from_redis: String = d.read_replies(n, IO_TIMEOUT).unwrap().iter().map(|b| text(b)).collect();
        assert_eq!(&from_redis, want, "{what}: Redis's own answer");
        d.expect_eof(Duration::from_secs(5)).unwrap_or_else(|e| panic!("{what}: Redis: {e}"));

        let mut c = proxy.raw();
        c.send(bytes);
        let from_proxy: String =
            c.read_replies(n, IO_TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e}")).iter().map(|b| text(b)).collect();
        assert_eq!(from_proxy, from_redis, "{what}: the proxy answers like Redis");
        c.expect_eof(Duration::from_secs(5)).unwrap_or_else(|e| panic!("{what}: proxy did not close: {e}"));

        // Another client of the proxy is unaffected.
        let v: i64 = redis::cmd("INCR").arg("mal:n").query(&mut other).unwrap();
        assert_eq!(v, i as i64 + 1);
    }
    let mut fresh = proxy.raw();
    assert_eq!(text(&fresh.call(&["PING"])), "+PONG\r\n");
}

#[derive(Default)]
struct WorkerStats {
    ok_before: AtomicU64,
    errors: AtomicU64,
    ok_after: AtomicU64,
}

#[test]
fn redis_killed_and_restarted_under_load() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    const WORKERS: usize = 4;
    // 0 = running, 1 = Redis killed, 2 = Redis restarted, 3 = stop.
    let phase = Arc::new(AtomicUsize::new(0));
    let stats: Arc<Vec<WorkerStats>> = Arc::new((0..WORKERS).map(|_| WorkerStats::default()).collect());
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let samples: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let (phase, stats, failures, samples) = (phase.clone(), stats.clone(), failures.clone(), samples.clone());
        let port = proxy.port;
        handles.push(std::thread::spawn(move || {
            let mut c = redis_conn(port, None);
            // A hang shows up as a read timeout, i.e. a failure.
            c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut c).unwrap();
            let key = format!("load:{w}");
            let mut i = 0u64;
            loop {
                let p = phase.load(Ordering::SeqCst);
                if p == 3 {
                    break;
                }
                i += 1;
                let r: redis::RedisResult<(String, u64)> =
                    redis::pipe().cmd("SET").arg(&key).arg(i).cmd("GET").arg(&key).query(&mut c);
                match r {
                    Ok((ok, v)) => {
                        assert_eq!((ok.as_str(), v), ("OK", i), "worker {w}");
                        match p {
                            0 => stats[w].ok_before.fetch_add(1, Ordering::SeqCst),
                            2 => stats[w].ok_after.fetch_add(1, Ordering::SeqCst),
                            _ => 0,
                        };
                    }
                    Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.code().is_none() => {
                        failures.lock().unwrap().push(format!("worker {w} in phase {p}: {e} ({:?})", e.kind()));
                        return;
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Some("ERR"), "worker {w}: {e}");
                        stats[w].errors.fetch_add(1, Ordering::SeqCst);
                        let mut s = samples.lock().unwrap();
                        if s.len() < 8 {
                            s.push(e.to_string());
                        }
                    }
                }
            }
            // Same connection, same session, still answering.
            let id2: i64 = redis::cmd("CLIENT").arg("ID").query(&mut c).unwrap();
            assert_eq!(id, id2, "worker {w}");
        }));
    }
    let all = |f: &dyn Fn(&WorkerStats) -> u64, n: u64| stats.iter().all(|s| f(s) >= n);
    let no_failures = || failures.lock().unwrap().is_empty();
    assert!(
        wait_until(Duration::from_secs(10), || all(&|s| s.ok_before.load(Ordering::SeqCst), 20)),
        "workers never got going"
    );

    redis.kill();
    phase.store(1, Ordering::SeqCst);
    let got_errors =
        wait_until(Duration::from_secs(10), || !no_failures() || all(&|s| s.errors.load(Ordering::SeqCst), 20));
    assert!(no_failures(), "connections failed while Redis was down: {:?}", failures.lock().unwrap());
    assert!(got_errors, "clients did not get -ERR replies while Redis was down: {:?}", errors_of(&stats));

    redis.restart();
    phase.store(2, Ordering::SeqCst);
    let served =
        wait_until(Duration::from_secs(20), || !no_failures() || all(&|s| s.ok_after.load(Ordering::SeqCst), 20));
    phase.store(3, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    assert!(no_failures(), "connections failed: {:?}", failures.lock().unwrap());
    assert!(served, "the proxy did not serve again after Redis restarted: {:?}", oks_after(&stats));
    let samples = samples.lock().unwrap();
    // The errors are the proxy's own (not a dropped connection or a garbled reply).
    assert!(samples.iter().all(|s| s.contains("resplica:")), "unexpected error replies: {samples:?}");
    eprintln!("error samples: {samples:?}");
}

fn errors_of(stats: &[WorkerStats]) -> Vec<u64> {
    stats.iter().map(|s| s.errors.load(Ordering::SeqCst)).collect()
}

fn oks_after(stats: &[WorkerStats]) -> Vec<u64> {
    stats.iter().map(|s| s.ok_after.load(Ordering::SeqCst)).collect()
}

#[test]
fn stalled_redis_times_out_then_recovers() {
    let redis = RedisServer::start();
    for driver in drivers() {
        let proxy = Proxy::with_config(&format!(
            "[node]\nthreads = 2\nio_driver = \"{driver}\"\n[redis]\naddress = \"{}\"\nrequest_timeout_ms = 500\n",
            redis.addr()
        ));
        let mut c = proxy.conn();
        let _: () = redis::cmd("SET").arg("stall:k").arg("v").query(&mut c).unwrap();

        redis.stop();
        let t = Instant::now();
        let r = redis::cmd("GET").arg("stall:k").query::<String>(&mut c);
        let took = t.elapsed();
        let err = match r {
            Ok(v) => {
                redis.cont();
                panic!("{driver}: GET answered {v:?} while Redis is stopped")
            }
            Err(e) => e,
        };
        assert!(!err.is_io_error() && !err.is_timeout(), "{driver}: the proxy must answer, not hang: {err}");
        assert!(err.to_string().contains("did not answer"), "{driver}: {err}");
        assert!(took < Duration::from_secs(5), "{driver}: took {took:?}");
        assert!(took >= Duration::from_millis(400), "{driver}: answered before the timeout ({took:?})");

        redis.cont();
        let mut last = String::new();
        let back =
            wait_until(Duration::from_secs(10), || match redis::cmd("GET").arg("stall:k").query::<String>(&mut c) {
                Ok(v) => v == "v",
                Err(e) => {
                    assert!(!e.is_io_error() && !e.is_timeout(), "{driver}: connection lost: {e}");
                    last = e.to_string();
                    false
                }
            });
        assert!(back, "{driver}: proxy did not serve again after SIGCONT; last error: {last}");
    }
}

#[test]
fn stalled_redis_inside_multi_times_out() {
    let redis = RedisServer::start();
    let proxy = Proxy::with_config(&format!(
        "[node]\nthreads = 1\n[redis]\naddress = \"{}\"\nrequest_timeout_ms = 500\n",
        redis.addr()
    ));
    let mut c = proxy.conn();
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    redis.stop();
    let t = Instant::now();
    let r = redis::cmd("INCR").arg("stall:multi").query::<String>(&mut c);
    let took = t.elapsed();
    redis.cont();
    let err = r.expect_err("INCR inside MULTI answered while Redis is stopped");
    assert!(!err.is_io_error() && !err.is_timeout(), "the proxy must answer, not hang: {err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The transaction died with its connection; the client carries on outside it.
    let v: i64 = redis::cmd("INCR").arg("stall:after").query(&mut c).unwrap();
    assert_eq!(v, 1);
}

/// Connect and PING; the connection if the proxy accepted it as a client.
fn try_client(port: u16) -> Option<RawConn> {
    let mut c = RawConn::connect(port);
    c.send_cmd(&["PING"]);
    match c.read_reply(Duration::from_secs(2)) {
        Ok(r) if &r[..] == b"+PONG\r\n" => Some(c),
        _ => None,
    }
}

#[test]
fn max_clients_refuses_the_extra_connection() {
    let redis = RedisServer::start();
    let proxy = Proxy::with_config(&format!(
        "[node]\nthreads = 2\n[redis]\naddress = \"{}\"\n[client]\nmax_clients = 3\n",
        redis.addr()
    ));
    // The readiness probes' connections may still be counted for a moment: poll.
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut got = None;
        assert!(
            wait_until(Duration::from_secs(5), || {
                got = try_client(proxy.port);
                got.is_some()
            }),
            "client {i} of 3 refused"
        );
        clients.push(got.unwrap());
    }
    let mut fourth = RawConn::connect(proxy.port);
    let r = fourth.read_reply(Duration::from_secs(5)).unwrap();
    assert_eq!(text(&r), "-ERR max number of clients reached\r\n");
    fourth.expect_eof(Duration::from_secs(5)).unwrap();
    for c in &mut clients {
        assert_eq!(text(&c.call(&["PING"])), "+PONG\r\n");
    }
    // A slot frees when a client leaves.
    clients.pop();
    assert!(wait_until(Duration::from_secs(5), || try_client(proxy.port).is_some()), "the freed slot was never reused");
}

#[test]
fn bad_config_exits_nonzero_naming_the_field() {
    let (st, err) = run_with_config("[node]\nthreds = 2\n", &[]);
    assert!(!st.success(), "exit status {st}; stderr: {err}");
    assert!(err.contains("threds"), "stderr must name the field: {err}");

    let (st, err) = run_with_config("[client]\nmax_clients = 0\n", &[]);
    assert!(!st.success(), "exit status {st}; stderr: {err}");
    assert!(err.contains("client.max_clients"), "stderr must name the field: {err}");

    let (st, err) = run_with_config("[redis]\nrequest_timeout_ms = 0\n", &[]);
    assert!(!st.success(), "exit status {st}; stderr: {err}");
    assert!(err.contains("redis.request_timeout_ms"), "stderr must name the field: {err}");

    // And a good one passes --check.
    let (st, err) = run_with_config("[node]\nthreads = 2\n", &["--check"]);
    assert!(st.success(), "exit status {st}; stderr: {err}");
}

#[test]
fn sigterm_finishes_in_flight_pipeline_and_exits_zero() {
    let redis = RedisServer::start();
    for driver in drivers() {
        let mut proxy = Proxy::start(&redis, &["--io-driver", driver, "--threads", "2"]);
        let key = format!("term:{driver}");
        let mut c = proxy.raw();
        assert_eq!(text(&c.call(&["SET", &key, "0"])), "+OK\r\n");

        // Hold Redis so the whole pipeline is in flight at SIGTERM: read by the proxy, its
        // first batch forwarded and unanswered, the rest queued behind that batch.
        const N: usize = 1000;
        let frame = encode(&["INCR", key.as_str()]);
        let pipeline: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * N).collect();
        redis.stop();
        c.send(&pipeline);
        let in_flight = wait_until(Duration::from_secs(4), || {
            redis_unread_bytes(redis.port) >= frame.len() as u64
                && redis_unread_bytes(proxy.port) == 0
                && unsent_to(proxy.port) == 0
        });
        if !in_flight {
            redis.cont();
            panic!(
                "{driver}: the pipeline never got in flight ({} bytes at Redis, {} unread by the proxy)",
                redis_unread_bytes(redis.port),
                redis_unread_bytes(proxy.port)
            );
        }
        proxy.terminate();
        let stopping = wait_until(Duration::from_secs(5), || proxy.log_text().contains("stopping"));
        redis.cont();
        assert!(stopping, "{driver}: the proxy never logged that it is stopping");

        let replies = c.read_replies(N, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{driver}: {e}"));
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(text(r), format!(":{}\r\n", i + 1), "{driver}: reply {i}");
        }
        c.expect_eof(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{driver}: {e}"));
        let st = proxy
            .wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("{driver}: proxy did not exit after SIGTERM"));
        assert!(st.success(), "{driver}: exit status {st}");
        let v: usize = redis::cmd("GET").arg(&key).query(&mut redis.conn()).unwrap();
        assert_eq!(v, N);
    }
}

#[test]
fn slow_pubsub_reader_is_disconnected() {
    let redis = RedisServer::start();
    for driver in drivers() {
        slow_pubsub_reader(&redis, driver);
    }
}

fn slow_pubsub_reader(redis: &RedisServer, driver: &str) {
    let proxy = Proxy::with_config(&format!(
        "[node]\nthreads = 2\nio_driver = \"{driver}\"\n[redis]\naddress = \"{}\"\n[client]\npubsub_output_buffer_limit = \"1MiB\"\nmax_clients = 4\n",
        redis.addr()
    ));
    let ch = format!("slow:{driver}");
    let mut sub = proxy.raw();
    let r = text(&sub.call(&["SUBSCRIBE", ch.as_str()]));
    assert_eq!(r, format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n{ch}\r\n:1\r\n", ch.len()), "{driver}");
    // From here on the subscriber reads nothing.
    let mut publ = proxy.conn();
    let mut other = proxy.conn();
    let _: () = redis::cmd("SET").arg("slow:other").arg("fine").query(&mut other).unwrap();
    let payload = vec![b'p'; 256 * 1024];
    let mut receivers = Vec::new();
    for _ in 0..80 {
        let n: i64 = redis::cmd("PUBLISH").arg(&ch).arg(&payload).query(&mut publ).unwrap();
        receivers.push(n);
        let t = Instant::now();
        let v: String = redis::cmd("GET").arg("slow:other").query(&mut other).unwrap();
        assert_eq!(v, "fine");
        assert!(t.elapsed() < Duration::from_secs(2), "{driver}: another client waited {:?}", t.elapsed());
    }
    // The proxy dropped the subscriber: its subscription is gone from Redis ...
    let mut d = redis.conn();
    let gone = wait_until(Duration::from_secs(10), || {
        let (_, n): (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg(&ch).query(&mut d).unwrap();
        n == 0
    });
    assert!(gone, "{driver}: the slow subscriber is still subscribed (PUBLISH receivers: {receivers:?})");
    // ... its connection is really closed: its client slot is free again although it has
    // read nothing (subscriber + publisher + other = 3 of 4; two more fit only without it) ...
    let freed = wait_until(Duration::from_secs(5), || {
        let a = try_client(proxy.port);
        let b = try_client(proxy.port);
        a.is_some() && b.is_some()
    });
    assert!(freed, "{driver}: the cut-off subscriber still holds its client slot");
    // ... and its socket ends once it finally reads.
    let read =
        sub.drain_until_closed(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{driver}: slow subscriber: {e}"));
    assert!(read < 80 * payload.len(), "{driver}: the subscriber got everything ({read} bytes): it was never cut off");
    // Everyone else is fine.
    let v: String = redis::cmd("GET").arg("slow:other").query(&mut other).unwrap();
    assert_eq!(v, "fine");
    let n: i64 = redis::cmd("PUBLISH").arg(&ch).arg("x").query(&mut publ).unwrap();
    assert_eq!(n, 0);
    assert_eq!(text(&proxy.raw().call(&["PING"])), "+PONG\r\n");
}
