//! Plain request/reply traffic through the proxy: data commands, big pipelines, a 100 MB value,
//! inline commands, SELECT, the CLIENT commands the proxy answers itself, QUIT, CLIENT REPLY.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use redis::Value;

#[test]
fn data_commands_reach_redis() {
    let redis = RedisServer::start();
    for driver in drivers() {
        let proxy = Proxy::start(&redis, &["--io-driver", driver, "--threads", "2"]);
        let mut p = proxy.conn();
        let mut d = redis.conn();
        let k = format!("basic:{driver}:str");
        let c = format!("basic:{driver}:ctr");
        let h = format!("basic:{driver}:hash");

        let ok: String = redis::cmd("SET").arg(&k).arg("hello").query(&mut p).unwrap();
        assert_eq!(ok, "OK");
        let got: String = redis::cmd("GET").arg(&k).query(&mut p).unwrap();
        assert_eq!(got, "hello");
        let direct: String = redis::cmd("GET").arg(&k).query(&mut d).unwrap();
        assert_eq!(direct, "hello", "the SET through the proxy is in Redis");

        for i in 1..=5i64 {
            let n: i64 = redis::cmd("INCR").arg(&c).query(&mut p).unwrap();
            assert_eq!(n, i);
        }
        let n: i64 = redis::cmd("INCRBY").arg(&c).arg(10).query(&mut p).unwrap();
        assert_eq!(n, 15);
        let direct: i64 = redis::cmd("GET").arg(&c).query(&mut d).unwrap();
        assert_eq!(direct, 15);

        let added: i64 = redis::cmd("HSET").arg(&h).arg("f1").arg("v1").arg("f2").arg("v2").query(&mut p).unwrap();
        assert_eq!(added, 2);
        let all: HashMap<String, String> = redis::cmd("HGETALL").arg(&h).query(&mut p).unwrap();
        assert_eq!(all, HashMap::from([("f1".into(), "v1".into()), ("f2".into(), "v2".into())]));
        let f2: String = redis::cmd("HGET").arg(&h).arg("f2").query(&mut p).unwrap();
        assert_eq!(f2, "v2");
        let direct: HashMap<String, String> = redis::cmd("HGETALL").arg(&h).query(&mut d).unwrap();
        assert_eq!(direct, all);
        let deleted: i64 = redis::cmd("HDEL").arg(&h).arg("f1").query(&mut p).unwrap();
        assert_eq!(deleted, 1);
        let len: i64 = redis::cmd("HLEN").arg(&h).query(&mut d).unwrap();
        assert_eq!(len, 1);

        // An error from Redis comes back as that error, and the connection goes on.
        let err = redis::cmd("INCR").arg(&h).query::<i64>(&mut p).unwrap_err();
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        let missing: Option<String> = redis::cmd("GET").arg(format!("basic:{driver}:missing")).query(&mut p).unwrap();
        assert_eq!(missing, None);
    }
}

#[test]
fn pipeline_of_10000_commands_answered_in_order() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut p = proxy.conn();
    let mut pipe = redis::pipe();
    let mut expected = Vec::with_capacity(10_000);
    let mut model: HashMap<String, String> = HashMap::new();
    let mut counter = 0i64;
    for i in 0..10_000u32 {
        let key = format!("pl:k{}", i % 97);
        match i % 3 {
            0 => {
                let v = format!("v{i}");
                pipe.cmd("SET").arg(&key).arg(&v);
                model.insert(key, v);
                expected.push(Value::Okay);
            }
            1 => {
                pipe.cmd("GET").arg(&key);
                expected.push(match model.get(&key) {
                    Some(v) => Value::BulkString(v.clone().into_bytes()),
                    None => Value::Nil,
                });
            }
            _ => {
                pipe.cmd("INCR").arg("pl:counter");
                counter += 1;
                expected.push(Value::Int(counter));
            }
        }
    }
    let got: Vec<Value> = pipe.query(&mut p).unwrap();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "reply {i} out of order or wrong");
    }
    let direct: i64 = redis::cmd("GET").arg("pl:counter").query(&mut redis.conn()).unwrap();
    assert_eq!(direct, counter);
}

#[test]
fn value_of_100_mb_round_trips() {
    let redis = RedisServer::start();
    const SIZE: usize = 100 * 1024 * 1024;
    let value: Vec<u8> = (0..SIZE).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for driver in drivers() {
        let proxy = Proxy::start(&redis, &["--io-driver", driver, "--threads", "2"]);
        let key = format!("big:{driver}");
        let mut c = proxy.raw();
        let t = Instant::now();
        c.send_cmd(&[b"SET".as_slice(), key.as_bytes(), &value]);
        let r = c.read_reply(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{driver}: SET 100 MB: {e}"));
        assert_eq!(text(&r), "+OK\r\n", "{driver}");
        c.send_cmd(&["GET", key.as_str()]);
        let r = c.read_reply(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{driver}: GET 100 MB: {e}"));
        let header = format!("${SIZE}\r\n");
        assert!(r.starts_with(header.as_bytes()), "{driver}: header {:?}", text(&r[..r.len().min(20)]));
        assert_eq!(r.len(), header.len() + SIZE + 2, "{driver}");
        assert!(r[header.len()..header.len() + SIZE] == value[..], "{driver}: GET returned different bytes");
        assert_eq!(&r[r.len() - 2..], b"\r\n");
        eprintln!("{driver}: 100 MB SET+GET in {:?}", t.elapsed());
        // The same value through the redis crate, and as Redis stores it.
        let len: usize = redis::cmd("STRLEN").arg(&key).query(&mut redis.conn()).unwrap();
        assert_eq!(len, SIZE);
        // The connection is still usable afterwards.
        assert_eq!(text(&c.call(&["PING"])), "+PONG\r\n");
        let _: () = redis::cmd("DEL").arg(&key).query(&mut redis.conn()).unwrap();
    }
}

#[test]
fn inline_commands() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.raw();
    c.send(b"PING\r\n");
    assert_eq!(text(&c.read_reply(IO_TIMEOUT).unwrap()), "+PONG\r\n");
    c.send(b"SET inl:k \"a b\"\r\n");
    assert_eq!(text(&c.read_reply(IO_TIMEOUT).unwrap()), "+OK\r\n");
    c.send(b"GET inl:k\r\n");
    assert_eq!(text(&c.read_reply(IO_TIMEOUT).unwrap()), "$3\r\na b\r\n");
    // Several inline commands in one write, with a bare \n and an empty line.
    c.send(b"INCR inl:n\nINCR inl:n\r\n\r\nGET 'inl:k'\r\n");
    let r = c.read_replies(3, IO_TIMEOUT).unwrap();
    assert_eq!(r.iter().map(|b| text(b)).collect::<Vec<_>>(), [":1\r\n", ":2\r\n", "$3\r\na b\r\n"]);
    let direct: String = redis::cmd("GET").arg("inl:k").query(&mut redis.conn()).unwrap();
    assert_eq!(direct, "a b");
}

#[test]
fn select_isolates_databases() {
    let redis = RedisServer::start();
    // One thread: both clients share the same upstream connections.
    let proxy = Proxy::start(&redis, &["--threads", "1"]);
    let mut a = proxy.conn();
    let _: () = redis::cmd("SELECT").arg(3).query(&mut a).unwrap();
    let _: () = redis::cmd("SET").arg("sel:k").arg("in-3").query(&mut a).unwrap();

    let mut d = redis.conn();
    let in0: Option<String> = redis::cmd("GET").arg("sel:k").query(&mut d).unwrap();
    assert_eq!(in0, None, "key must not be in db 0");
    let _: () = redis::cmd("SELECT").arg(3).query(&mut d).unwrap();
    let in3: Option<String> = redis::cmd("GET").arg("sel:k").query(&mut d).unwrap();
    assert_eq!(in3.as_deref(), Some("in-3"));

    // SELECT out of range is refused like Redis does.
    let err = redis::cmd("SELECT").arg(16).query::<()>(&mut a).unwrap_err();
    assert!(err.to_string().contains("DB index is out of range"), "{err}");

    // Two clients in different dbs, interleaved on the same shared connection.
    let mut b = proxy.conn();
    let _: () = redis::cmd("SELECT").arg(5).query(&mut b).unwrap();
    let mut z = proxy.conn(); // stays in db 0
    for i in 0..200 {
        let _: () = redis::cmd("SET").arg("sel:shared").arg(format!("a{i}")).query(&mut a).unwrap();
        let _: () = redis::cmd("SET").arg("sel:shared").arg(format!("b{i}")).query(&mut b).unwrap();
        let _: () = redis::cmd("SET").arg("sel:shared").arg(format!("z{i}")).query(&mut z).unwrap();
        let va: String = redis::cmd("GET").arg("sel:shared").query(&mut a).unwrap();
        let vb: String = redis::cmd("GET").arg("sel:shared").query(&mut b).unwrap();
        let vz: String = redis::cmd("GET").arg("sel:shared").query(&mut z).unwrap();
        assert_eq!((va.as_str(), vb.as_str(), vz.as_str()), (&*format!("a{i}"), &*format!("b{i}"), &*format!("z{i}")));
    }
    // Pipelines of both clients in flight at the same time.
    let pa = proxy.port;
    let ta = std::thread::spawn(move || db_pipeline_check(pa, 7, "x"));
    let tb = std::thread::spawn(move || db_pipeline_check(pa, 8, "y"));
    ta.join().unwrap();
    tb.join().unwrap();

    for (db, want) in [(3, "a199"), (5, "b199"), (0, "z199")] {
        let _: () = redis::cmd("SELECT").arg(db).query(&mut d).unwrap();
        let v: String = redis::cmd("GET").arg("sel:shared").query(&mut d).unwrap();
        assert_eq!(v, want, "db {db}");
    }
}

fn db_pipeline_check(port: u16, db: i64, tag: &str) {
    let mut c = redis_conn(port, None);
    let _: () = redis::cmd("SELECT").arg(db).query(&mut c).unwrap();
    for round in 0..20 {
        let mut pipe = redis::pipe();
        for i in 0..200 {
            pipe.cmd("SET").arg(format!("selp:{i}")).arg(format!("{tag}{round}:{i}")).ignore();
            pipe.cmd("GET").arg(format!("selp:{i}"));
        }
        let got: Vec<String> = pipe.query(&mut c).unwrap();
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v, &format!("{tag}{round}:{i}"), "db {db} saw another db's value");
        }
    }
}

/// CLIENT SETINFO is the client's own metadata: answered by the proxy (it must not reach a
/// shared upstream connection, nor wait for a primary), shown by CLIENT INFO/LIST, with
/// Redis's errors.
#[test]
fn client_setinfo_is_per_connection_and_shown_by_client_info() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut a = proxy.conn();
    let mut b = proxy.conn();
    for (attr, v) in [("LIB-NAME", "mylib"), ("lib-ver", "1.2.3")] {
        let ok: String = redis::cmd("CLIENT").arg("SETINFO").arg(attr).arg(v).query(&mut a).unwrap();
        assert_eq!(ok, "OK");
    }
    let info: String = redis::cmd("CLIENT").arg("INFO").query(&mut a).unwrap();
    assert!(info.contains(" lib-name=mylib lib-ver=1.2.3"), "{info}");
    let other: String = redis::cmd("CLIENT").arg("INFO").query(&mut b).unwrap();
    assert!(!other.contains("mylib"), "per connection: {other}");
    let err = redis::cmd("CLIENT").arg("SETINFO").arg("lib-name").arg("a b").query::<()>(&mut a).unwrap_err();
    assert!(err.to_string().contains("lib-name cannot contain spaces"), "{err}");
    let err = redis::cmd("CLIENT").arg("SETINFO").arg("color").arg("red").query::<()>(&mut a).unwrap_err();
    assert!(err.to_string().contains("Unrecognized option 'color'"), "{err}");
    let err = redis::cmd("CLIENT").arg("SETINFO").arg("lib-name").query::<()>(&mut a).unwrap_err();
    assert!(err.to_string().contains("wrong number of arguments"), "{err}");
    // Redis itself holds no proxy client's library name.
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut redis.conn()).unwrap();
    assert!(!list.contains("lib-name=mylib"), "{list}");
}

#[test]
fn client_setname_getname_id_and_echo() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut a = proxy.conn();
    let mut b = proxy.conn();
    let none: Option<String> = redis::cmd("CLIENT").arg("GETNAME").query(&mut a).unwrap();
    assert_eq!(none, None);
    let ok: String = redis::cmd("CLIENT").arg("SETNAME").arg("alice").query(&mut a).unwrap();
    assert_eq!(ok, "OK");
    let name: String = redis::cmd("CLIENT").arg("GETNAME").query(&mut a).unwrap();
    assert_eq!(name, "alice");
    let other: Option<String> = redis::cmd("CLIENT").arg("GETNAME").query(&mut b).unwrap();
    assert_eq!(other, None, "names are per connection");
    let err = redis::cmd("CLIENT").arg("SETNAME").arg("has space").query::<()>(&mut a).unwrap_err();
    assert!(err.to_string().contains("Client names cannot contain spaces"), "{err}");

    let ida: i64 = redis::cmd("CLIENT").arg("ID").query(&mut a).unwrap();
    let ida2: i64 = redis::cmd("CLIENT").arg("ID").query(&mut a).unwrap();
    let idb: i64 = redis::cmd("CLIENT").arg("ID").query(&mut b).unwrap();
    assert!(ida > 0 && idb > 0);
    assert_eq!(ida, ida2, "the id of a connection does not change");
    assert_ne!(ida, idb, "two connections have two ids");

    let e: String = redis::cmd("ECHO").arg("hello world").query(&mut a).unwrap();
    assert_eq!(e, "hello world");
    let e: Vec<u8> = redis::cmd("ECHO").arg(b"\x00\xffbin\r\n".as_slice()).query(&mut a).unwrap();
    assert_eq!(e, b"\x00\xffbin\r\n");
    let err = redis::cmd("ECHO").query::<String>(&mut a).unwrap_err();
    assert!(err.to_string().contains("wrong number of arguments"), "{err}");
}

#[test]
fn quit_replies_ok_then_closes() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.raw();
    assert_eq!(text(&c.call(&["SET", "quit:k", "1"])), "+OK\r\n");
    // QUIT in the middle of a pipeline: earlier commands are answered, later ones are not run.
    let mut bytes = encode(&["INCR", "quit:k"]);
    bytes.extend(encode(&["QUIT"]));
    bytes.extend(encode(&["INCR", "quit:k"]));
    c.send(&bytes);
    let r = c.read_replies(2, IO_TIMEOUT).unwrap();
    assert_eq!(text(&r[0]), ":2\r\n");
    assert_eq!(text(&r[1]), "+OK\r\n");
    c.expect_eof(Duration::from_secs(5)).unwrap();
    let v: i64 = redis::cmd("GET").arg("quit:k").query(&mut redis.conn()).unwrap();
    assert_eq!(v, 2, "the command after QUIT must not run");
}

#[test]
fn client_reply_off_skip_on() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.raw();
    let mut bytes = encode(&["CLIENT", "REPLY", "OFF"]);
    bytes.extend(encode(&["SET", "rep:a", "1"]));
    bytes.extend(encode(&["INCR", "rep:a"]));
    bytes.extend(encode(&["PING"]));
    bytes.extend(encode(&["CLIENT", "REPLY", "ON"]));
    bytes.extend(encode(&["GET", "rep:a"]));
    c.send(&bytes);
    let r = c.read_replies(2, IO_TIMEOUT).unwrap();
    assert_eq!(text(&r[0]), "+OK\r\n", "only CLIENT REPLY ON and GET are answered");
    assert_eq!(text(&r[1]), "$1\r\n2\r\n");

    let mut bytes = encode(&["CLIENT", "REPLY", "SKIP"]);
    bytes.extend(encode(&["INCR", "rep:a"]));
    bytes.extend(encode(&["INCR", "rep:a"]));
    c.send(&bytes);
    let r = c.read_reply(IO_TIMEOUT).unwrap();
    assert_eq!(text(&r), ":4\r\n", "SKIP drops exactly the next reply");
    // Nothing else is owed.
    assert_eq!(text(&c.call(&["PING"])), "+PONG\r\n");
    let v: i64 = redis::cmd("GET").arg("rep:a").query(&mut redis.conn()).unwrap();
    assert_eq!(v, 4);
}

#[test]
fn select_range_follows_the_upstream_databases_setting() {
    // Redis with 32 databases: every core of the proxy must accept SELECT 20 and refuse 32;
    // with 4 databases, SELECT 10 must be refused (else a write would land in another db).
    for (databases, ok_db, bad_db) in [(32, 20, 32), (4, 3, 10)] {
        let redis = RedisServer::start_with(&["--databases", &databases.to_string()]);
        let proxy = Proxy::start(&redis, &["--threads", "2"]);
        for i in 0..16 {
            let mut c = proxy.raw();
            assert_eq!(
                text(&c.call(&["SELECT", &ok_db.to_string()])),
                "+OK\r\n",
                "databases {databases}: connection {i}: SELECT {ok_db}"
            );
            assert_eq!(text(&c.call(&["SET", &format!("dbs:{i}"), "v"])), "+OK\r\n");
            assert_eq!(
                text(&c.call(&["SELECT", &bad_db.to_string()])),
                "-ERR DB index is out of range\r\n",
                "databases {databases}: connection {i}: SELECT {bad_db}"
            );
            assert_eq!(text(&c.call(&["GET", &format!("dbs:{i}")])), "$1\r\nv\r\n", "still in db {ok_db}");
        }
        let mut d = redis.conn();
        let _: () = redis::cmd("SELECT").arg(ok_db).query(&mut d).unwrap();
        let n: i64 = redis::cmd("DBSIZE").query(&mut d).unwrap();
        assert_eq!(n, 16, "databases {databases}: every write landed in db {ok_db}");
    }
}
