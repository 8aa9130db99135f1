//! Client-side caching and commands that name other clients: CLIENT TRACKING (RESP3 pushes
//! and RESP2 REDIRECT), CLIENT UNBLOCK by the id the proxy gave, and pushes that reach a shared
//! upstream connection (they must never be taken for someone's reply).

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(5);

fn int(reply: &[u8]) -> i64 {
    text(reply).trim_start_matches(':').trim().parse().unwrap_or_else(|_| panic!("not an integer: {}", text(reply)))
}

#[test]
fn resp3_tracking_delivers_invalidation_pushes_and_keeps_the_client_id() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.raw();
    assert!(c.call(&["HELLO", "3"]).starts_with(b"%"));
    let id_before = int(&c.call(&["CLIENT", "ID"]));
    assert_eq!(&c.call(&["CLIENT", "TRACKING", "ON"])[..], b"+OK\r\n");
    assert_eq!(int(&c.call(&["CLIENT", "ID"])), id_before, "CLIENT ID must not change with tracking");
    assert_eq!(&c.call(&["SET", "trk:k", "1"])[..], b"+OK\r\n");
    assert_eq!(&c.call(&["GET", "trk:k"])[..], b"$1\r\n1\r\n");
    // Another client changes the key: an invalidation push must reach the tracking client.
    let mut other = proxy.raw();
    assert_eq!(&other.call(&["SET", "trk:k", "2"])[..], b"+OK\r\n");
    let push = c.read_reply(T).expect("invalidation push");
    assert!(push.starts_with(b">2\r\n$10\r\ninvalidate\r\n"), "got {}", text(&push));
    assert!(text(&push).contains("trk:k"), "got {}", text(&push));
    // The connection keeps answering in order after the push.
    assert_eq!(&c.call(&["PING"])[..], b"+PONG\r\n");
    assert_eq!(&c.call(&["GET", "trk:k"])[..], b"$1\r\n2\r\n");
}

#[test]
fn resp2_tracking_redirects_to_a_subscriber_by_proxy_id() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut sub = proxy.raw();
    let sub_id = int(&sub.call(&["CLIENT", "ID"]));
    let r = sub.call(&["SUBSCRIBE", "__redis__:invalidate"]);
    assert!(text(&r).contains("subscribe"), "{}", text(&r));
    let mut c = proxy.raw();
    let r = c.call(&["CLIENT", "TRACKING", "ON", "REDIRECT", &sub_id.to_string()]);
    assert_eq!(&r[..], b"+OK\r\n", "redirect to the subscriber's proxy id: {}", text(&r));
    c.call(&["SET", "csc:k", "1"]);
    c.call(&["GET", "csc:k"]);
    let mut w = proxy.raw();
    w.call(&["SET", "csc:k", "2"]);
    let msg = sub.read_reply(T).expect("invalidation message");
    assert!(text(&msg).contains("invalidate") && text(&msg).contains("csc:k"), "got {}", text(&msg));
    // A redirect to an id nobody has is refused, as Redis refuses it.
    let r = proxy.raw().call(&["CLIENT", "TRACKING", "ON", "REDIRECT", "999999"]);
    assert!(r.starts_with(b"-ERR"), "{}", text(&r));
}

#[test]
fn client_unblock_by_proxy_id_wakes_a_blocked_pop() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut blocked = proxy.raw();
    let id = int(&blocked.call(&["CLIENT", "ID"]));
    blocked.send_cmd(&["BLPOP", "unblock:list", "0"]);
    let mut admin = proxy.raw();
    // The pop is blocked once Redis counts a blocked client.
    assert!(wait_until(T, || text(&redis_info(&mut admin)).contains("blocked_clients:1")));
    let r = admin.call(&["CLIENT", "UNBLOCK", &id.to_string()]);
    assert_eq!(int(&r), 1, "CLIENT UNBLOCK {id}: {}", text(&r));
    let r = blocked.read_reply(T).expect("BLPOP answered after unblock");
    assert!(r.starts_with(b"*-1") || r.starts_with(b"_"), "timeout-style nil expected, got {}", text(&r));
}

fn redis_info(c: &mut RawConn) -> bytes::Bytes {
    c.call(&["INFO", "clients"])
}

#[test]
fn config_set_requirepass_is_refused() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.raw();
    let r = c.call(&["CONFIG", "SET", "maxmemory-policy", "noeviction", "requirepass", "x"]);
    assert!(r.starts_with(b"-ERR resplica: CONFIG SET requirepass"), "{}", text(&r));
    // Redis was not changed: a direct client still needs no password.
    let mut direct = RawConn::connect(redis.port);
    assert_eq!(&direct.call(&["PING"])[..], b"+PONG\r\n");
    assert_eq!(&c.call(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])[..], b"+OK\r\n");
}

#[test]
fn pushes_redirected_onto_shared_connections_never_become_replies() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    // Point tracking (from a direct connection) at every RESP3 connection of the proxy, as a
    // client could by guessing Redis ids.
    let mut direct = RawConn::connect(redis.port);
    let list = text(&direct.call(&["CLIENT", "LIST"]));
    let targets: Vec<String> = list
        .lines()
        .filter(|l| l.contains("resp=3"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_string))
        .collect();
    assert!(!targets.is_empty(), "the proxy keeps RESP3 connections: {list}");
    let mut trackers = Vec::new();
    for id in &targets {
        let mut t = RawConn::connect(redis.port);
        assert_eq!(&t.call(&["CLIENT", "TRACKING", "ON", "REDIRECT", id, "BCAST"])[..], b"+OK\r\n");
        trackers.push(t);
    }
    let mut readers: Vec<RawConn> = (0..4).map(|_| proxy.raw()).collect();
    for r in &mut readers {
        assert!(r.call(&["HELLO", "3"]).starts_with(b"%"));
        r.call(&["SET", "push:a", "A"]);
    }
    // Keep GETs in flight on the RESP3 connections while other writes make Redis push
    // invalidations onto them.
    let mut writer = RawConn::connect(redis.port);
    for round in 0..5 {
        for r in &mut readers {
            let mut batch = Vec::new();
            for _ in 0..2000 {
                batch.extend_from_slice(&encode(&["GET", "push:a"]));
            }
            r.send(&batch);
        }
        for i in 0..50 {
            writer.call(&["SET", &format!("push:x{round}:{i}"), "v"]);
        }
        for r in &mut readers {
            for reply in r.read_replies(2000, T).expect("2000 replies") {
                assert_eq!(&reply[..], b"$1\r\nA\r\n", "a push was taken for a reply");
            }
        }
    }
    assert!(!proxy.log_text().contains("nobody asked for"), "a push reset a shared connection:\n{}", proxy.log_text());
}

#[test]
fn client_list_and_kill_see_every_client_of_every_core() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut admin = proxy.raw();
    let mut victims: Vec<(i64, RawConn)> = (0..4)
        .map(|i| {
            let mut c = proxy.raw();
            assert_eq!(&c.call(&["CLIENT", "SETNAME", &format!("victim{i}")])[..], b"+OK\r\n");
            (int(&c.call(&["CLIENT", "ID"])), c)
        })
        .collect();
    let list = text(&admin.call(&["CLIENT", "LIST"]));
    for i in 0..4 {
        assert!(list.contains(&format!("name=victim{i} ")), "CLIENT LIST misses victim{i}:\n{list}");
    }
    let only = text(&admin.call(&["CLIENT", "LIST", "ID", &victims[1].0.to_string()]));
    assert!(only.contains("name=victim1 ") && !only.contains("victim2"), "{only}");
    // Kill two clients by id (whatever core they are on); they see their connection close.
    for k in [0, 3] {
        let r = admin.call(&["CLIENT", "KILL", "ID", &victims[k].0.to_string()]);
        assert_eq!(int(&r), 1, "kill victim{k}");
        victims[k].1.expect_eof(T).unwrap_or_else(|e| panic!("victim{k} still connected: {e}"));
    }
    assert_eq!(&victims[1].1.call(&["PING"])[..], b"+PONG\r\n", "others unaffected");
    assert!(wait_until(T, || !text(&admin.call(&["CLIENT", "LIST"])).contains("name=victim0 ")));
    // The old form, by address, and its error.
    let r = admin.call(&["CLIENT", "KILL", "127.0.0.1:1"]);
    assert!(r.starts_with(b"-ERR No such client"), "{}", text(&r));
    // SKIPME defaults to yes: killing by the caller's own id spares it.
    let me = int(&admin.call(&["CLIENT", "ID"]));
    assert_eq!(int(&admin.call(&["CLIENT", "KILL", "ID", &me.to_string()])), 0);
}

#[test]
fn client_list_shows_a_subscribers_command_and_client_info_its_own() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut sub = proxy.raw();
    let sub_id = int(&sub.call(&["CLIENT", "ID"]));
    assert!(text(&sub.call(&["SUBSCRIBE", "news"])).contains("subscribe"));
    let mut c = proxy.raw();
    let list = text(&c.call(&["CLIENT", "LIST"]));
    let line = list.lines().find(|l| l.starts_with(&format!("id={sub_id} "))).unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains(" flags=P ") && line.contains(" cmd=subscribe "), "{line}");
    assert!(text(&c.call(&["CLIENT", "INFO"])).contains(" cmd=client|info "));
    let r = c.call(&["CLIENT", "KILL"]);
    assert_eq!(text(&r), "-ERR wrong number of arguments for 'client|kill' command\r\n");
}
