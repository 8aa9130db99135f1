//! TLS on every link, with real clients and a real redis-server built with TLS: redis-cli
//! `--tls` through the client port on both io drivers, mutual TLS, certificates rotated in
//! place while clients stay connected, a Redis that speaks only TLS, and a pair whose peer
//! link is mutual TLS failing over and resyncing.

mod common;

use std::time::{Duration, Instant};

use common::native::{native, wait_equal, wait_formed};
use common::pair::{Pair, PairOpts};
use common::tls::{redis_cli, Pki, TlsConn};
use common::{drivers, free_port, text, wait_until, Proxy, RawConn, RedisServer};
use redis::Commands;

fn client_tls_toml(
    redis: &RedisServer,
    driver: &str,
    threads: usize,
    plain: u16,
    pki: &Pki,
    cert: &common::tls::CertFiles,
    verify: bool,
) -> String {
    format!(
        "[node]\nio_driver = \"{driver}\"\nthreads = {threads}\nplaintext_listen = \"127.0.0.1:{plain}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
         [redis]\naddress = \"{}\"\n\
         [client.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\nverify_clients = {verify}\n",
        free_port(),
        redis.addr(),
        cert.cert_str(),
        cert.key_str(),
        pki.ca_str(),
    )
}

/// A proxy serving TLS on its client port with `cert` (`verify`: mutual TLS), and the
/// plaintext port beside it.
fn tls_proxy(
    redis: &RedisServer,
    driver: &str,
    threads: usize,
    pki: &Pki,
    cert: &common::tls::CertFiles,
    verify: bool,
) -> (Proxy, u16) {
    let plain = free_port();
    let proxy = Proxy::with_tls_config(&client_tls_toml(redis, driver, threads, plain, pki, cert, verify), plain);
    (proxy, plain)
}

/// redis-cli `--tls` works through the client port on io_uring and epoll; the plaintext port
/// beside it serves the same data; a plaintext client on the TLS port gets no RESP answer;
/// a 1 MiB value crosses intact (many TLS records each way).
#[test]
fn redis_cli_tls_through_the_client_port_on_both_drivers() {
    let pki = Pki::new("client");
    let server = pki.issue("server", "resplica");
    for driver in drivers() {
        let redis = RedisServer::start();
        let (proxy, plain) = tls_proxy(&redis, driver, 2, &pki, &server, false);
        let port = proxy.port.to_string();
        let ca = pki.ca_str();
        let cli = |args: &[&str]| {
            let mut all = vec!["-p", port.as_str(), "--tls", "--cacert", ca.as_str()];
            all.extend_from_slice(args);
            redis_cli(&all)
        };
        assert_eq!(cli(&["SET", "tls:k", "v1"]).unwrap(), "OK", "{driver}");
        assert_eq!(cli(&["GET", "tls:k"]).unwrap(), "v1", "{driver}");
        assert_eq!(cli(&["LPUSH", "tls:l", "a", "b"]).unwrap(), "2", "{driver}");
        // The plaintext port beside it, and Redis itself, see the same data.
        let mut plain_conn =
            redis::Client::open(format!("redis://127.0.0.1:{plain}/")).unwrap().get_connection().unwrap();
        let v: String = plain_conn.get("tls:k").unwrap();
        assert_eq!(v, "v1");
        let v: String = redis.conn().get("tls:k").unwrap();
        assert_eq!(v, "v1");
        // Plaintext RESP on the TLS port is never answered as RESP.
        let mut raw = RawConn::connect(proxy.port);
        raw.send(b"*1\r\n$4\r\nPING\r\n");
        let r = raw.read_reply(Duration::from_secs(5));
        assert!(r.as_ref().map_or(true, |b| !b.starts_with(b"+PONG")), "{driver}: plaintext answered: {r:?}");
        // Big values both ways, and a pipeline, over our own TLS client.
        let mut c = TlsConn::connect(proxy.port, &pki.ca_file(), None).expect("tls connect");
        let big = "x".repeat(1 << 20);
        assert_eq!(text(&c.call(&["SET", "tls:big", big.as_str()]).unwrap()), "+OK\r\n");
        let got = c.call(&["GET", "tls:big"]).unwrap();
        assert_eq!(got.len(), big.len() + format!("${}\r\n\r\n", big.len()).len(), "{driver}: big GET length");
        assert!(got.ends_with(format!("{big}\r\n").as_bytes()));
        // A blocking command takes a dedicated upstream connection; its reply comes back over TLS.
        assert_eq!(text(&c.call(&["BLPOP", "tls:l", "1"]).unwrap()), "*2\r\n$5\r\ntls:l\r\n$1\r\nb\r\n");
    }
}

/// `verify_clients = true`: no certificate, or one from another CA, is refused; one signed by
/// `ca_file` is served.
#[test]
fn mutual_tls_refuses_a_client_without_a_certificate() {
    let pki = Pki::new("mtls");
    let other = Pki::new("stranger");
    let server = pki.issue("server", "resplica");
    let client = pki.issue("client", "app");
    let stranger = other.issue("client", "stranger");
    let redis = RedisServer::start();
    let (proxy, _plain) = tls_proxy(&redis, "auto", 2, &pki, &server, true);
    let ping = |cert| TlsConn::connect(proxy.port, &pki.ca_file(), cert).and_then(|mut c| c.call(&["PING"]));
    assert!(ping(None).is_err(), "served a client without a certificate");
    assert!(ping(Some(&stranger)).is_err(), "served a client whose certificate another CA signed");
    assert_eq!(text(&ping(Some(&client)).expect("a client with a good certificate")), "+PONG\r\n");
    let port = proxy.port.to_string();
    let (ca, cert, key) = (pki.ca_str(), client.cert_str(), client.key_str());
    assert!(redis_cli(&["-p", &port, "--tls", "--cacert", &ca, "PING"]).is_err());
    assert_eq!(
        redis_cli(&["-p", &port, "--tls", "--cacert", &ca, "--cert", &cert, "--key", &key, "PING"]).unwrap(),
        "PONG"
    );
}

/// Rotating the certificate files in place (as cert-manager does) changes what new
/// connections are shown, within seconds and without a restart; connections made before
/// keep working.
#[test]
fn certificate_rotation_while_connected() {
    let pki = Pki::new("rotate");
    let server = pki.issue("server", "first");
    let redis = RedisServer::start();
    let (proxy, _plain) = tls_proxy(&redis, "auto", 2, &pki, &server, false);
    let first = server.der();
    let mut old = TlsConn::connect(proxy.port, &pki.ca_file(), None).expect("tls connect");
    assert_eq!(old.server_cert(), first);
    assert_eq!(text(&old.call(&["SET", "rot:k", "1"]).unwrap()), "+OK\r\n");
    pki.rotate(&server, "second");
    let second = server.der();
    assert_ne!(first, second);
    let rotated = wait_until(Duration::from_secs(10), || {
        TlsConn::connect(proxy.port, &pki.ca_file(), None).is_ok_and(|c| c.server_cert() == second)
    });
    assert!(rotated, "new connections still get the old certificate:\n{}", proxy.log_text());
    // The connection made before the rotation still serves.
    assert_eq!(text(&old.call(&["GET", "rot:k"]).unwrap()), "$1\r\n1\r\n");
    // A broken rotation (a key that does not match) keeps the working certificate.
    std::fs::write(&server.key, b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n").unwrap();
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        let c = TlsConn::connect(proxy.port, &pki.ca_file(), None).expect("served after a broken rotation");
        assert_eq!(c.server_cert(), second);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(proxy.log_text().contains("cannot be used yet"), "{}", proxy.log_text());
}

/// A Redis that asks for TLS and a client certificate (`tls-auth-clients yes`, Redis's
/// default): the sidecar reaches it with `[redis.tls]`, for shared lanes and dedicated
/// connections alike.
#[test]
fn redis_behind_tls() {
    let pki = Pki::new("redis");
    let rs = pki.issue("redis", "redis");
    let sidecar = pki.issue("sidecar", "resplica");
    let tls_port = free_port();
    let (tp, rc, rk, ca) = (tls_port.to_string(), rs.cert_str(), rs.key_str(), pki.ca_str());
    // The plaintext port stays for the harness's own checks; the sidecar uses the TLS one.
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tp,
        "--tls-cert-file",
        &rc,
        "--tls-key-file",
        &rk,
        "--tls-ca-cert-file",
        &ca,
    ]);
    for driver in drivers() {
        let toml = format!(
            "[node]\nio_driver = \"{driver}\"\nthreads = 2\nadmin_listen = \"127.0.0.1:{}\"\n\
             [redis]\naddress = \"127.0.0.1:{tls_port}\"\n\
             [redis.tls]\nca_file = \"{ca}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            free_port(),
            sidecar.cert_str(),
            sidecar.key_str()
        );
        let proxy = Proxy::with_config(&toml);
        let mut c = proxy.conn();
        let _: () = c.set(format!("rt:{driver}"), "v").unwrap();
        let v: String = redis.conn().get(format!("rt:{driver}")).unwrap();
        assert_eq!(v, "v");
        // A dedicated connection (blocking pop) over TLS too.
        let _: () = redis.conn().rpush(format!("rl:{driver}"), "x").unwrap();
        let popped: Option<(String, String)> = c.blpop(format!("rl:{driver}"), 1.0).unwrap();
        assert_eq!(popped, Some((format!("rl:{driver}"), "x".to_string())));
        // Redis saw the sidecar on its TLS port only: every client it lists came in on it.
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut redis.conn()).unwrap();
        let laddrs: Vec<&str> = list.lines().filter_map(|l| l.split(' ').find(|f| f.starts_with("laddr="))).collect();
        assert!(laddrs.iter().any(|l| l.ends_with(&format!(":{tls_port}"))), "{list}");
    }
}

/// A native pair whose peer link is mutual TLS forms, replicates, fails over when the
/// primary Redis dies and brings it back as a replica, losing no acknowledged write; the
/// peer port answers no plaintext.
#[test]
fn native_pair_with_a_tls_peer_link_fails_over_and_resyncs() {
    let pki = Pki::new("pair");
    let node = pki.issue("node", "resplica-node");
    let extra = format!(
        "[replication.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        node.cert_str(),
        node.key_str(),
        pki.ca_str()
    );
    let mut pair = Pair::start_unsynced(PairOpts { extra_toml: extra, ..native("all") });
    wait_formed(&pair, "a", Duration::from_secs(20));
    let linked = |port: u16, peer: &str| {
        common::native::status_of(port)
            .is_some_and(|st| st.raw.lines().any(|l| l.starts_with(&format!("peer:{peer} link=up"))))
    };
    assert!(wait_until(Duration::from_secs(10), || linked(pair.a.port, "b") && linked(pair.b.port, "a")));
    // Plaintext on the peer port opens nothing.
    let mut raw = RawConn::connect(pair.a.peer_port);
    raw.send_cmd(&["RS.HELLO", "b", "0123456789abcdef"]);
    assert!(raw.read_reply(Duration::from_secs(3)).map_or(true, |r| !r.starts_with(b"*")));
    let mut cb = pair.b.conn();
    let mut acked = Vec::new();
    for i in 0..200 {
        let _: () = cb.set(format!("t{i}"), i).unwrap();
        acked.push(i);
    }
    pair.a.redis.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 200;
    while Instant::now() < deadline && acked.len() < 400 {
        let Ok(mut c) = pair.b.try_conn(Duration::from_secs(6)) else { continue };
        match c.set::<_, _, ()>(format!("t{i}"), i) {
            Ok(()) => {
                acked.push(i);
                i += 1;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    assert!(acked.len() >= 400, "writes did not resume after the failover: {}", common::native::statuses(&pair));
    pair.a.redis.restart();
    wait_formed(&pair, "b", Duration::from_secs(20));
    wait_equal(&pair, Duration::from_secs(15));
    let mut ra = pair.a.redis.conn();
    for &i in &acked {
        let v: Option<i64> = ra.get(format!("t{i}")).unwrap();
        assert_eq!(v, Some(i), "acknowledged write t{i} lost");
    }
}

/// A client whose first request follows its last handshake message at once (one segment
/// on loopback), larger than rustls' plaintext buffer: the handshake hands the rest to the
/// reader instead of failing. Repeated on fresh connections, both drivers.
#[test]
fn a_big_first_request_right_behind_the_handshake() {
    let pki = Pki::new("first");
    let server = pki.issue("server", "resplica");
    let big = "y".repeat(100 * 1024);
    for driver in drivers() {
        let redis = RedisServer::start();
        let (proxy, _plain) = tls_proxy(&redis, driver, 2, &pki, &server, false);
        for i in 0..20 {
            let key = format!("first:{i}");
            let first = common::encode(&["SET", key.as_str(), big.as_str()]);
            let mut c = TlsConn::connect_sending(proxy.port, &pki.ca_file(), &first).expect("tls connect");
            assert_eq!(text(&c.read_reply().unwrap()), "+OK\r\n", "{driver}");
        }
        let n: usize = redis::cmd("STRLEN").arg("first:19").query(&mut redis.conn()).unwrap();
        assert_eq!(n, big.len());
    }
}

/// A client that ends its handshake with a close_notify and junk behind it, in one segment,
/// gets its connection closed; the core it landed on keeps serving everyone else.
#[test]
fn close_notify_and_junk_in_the_handshake_do_not_stall_the_core() {
    let pki = Pki::new("junk");
    let server = pki.issue("server", "resplica");
    let redis = RedisServer::start();
    let (proxy, plain) = tls_proxy(&redis, "auto", 1, &pki, &server, false);
    for _ in 0..3 {
        TlsConn::finish_then_close_with_junk(proxy.port, &pki.ca_file(), &[0x17; 8192]).expect("handshake");
    }
    // One core: if it were stuck, nobody would be answered.
    let mut c = TlsConn::connect(proxy.port, &pki.ca_file(), None).expect("tls connect after the junk");
    assert_eq!(text(&c.call(&["PING"]).unwrap()), "+PONG\r\n");
    let mut p = RawConn::connect(plain);
    assert_eq!(text(&p.call(&["PING"])), "+PONG\r\n");
}
