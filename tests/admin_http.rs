//! The admin port's HTTP side (Kubernetes probes, Prometheus) against real redis-server
//! processes: `/livez`, `/readyz` (follows the Redis, the pair and the drain), `/status`
//! (`?format=json`), `/metrics` counting what went over the wire, and the SIGTERM drain
//! (503 first, still serving, then exit 0).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::native::{native, wait_formed, FORM_TIMEOUT};
use common::pair::Pair;
use common::{free_port, wait_until, Proxy, RedisServer};

/// `GET path` on 127.0.0.1:`port`: (status code, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

fn single(redis: &RedisServer, admin: u16, drain_ms: u64) -> Proxy {
    Proxy::with_config(&format!(
        "[node]\nadmin_listen = \"127.0.0.1:{admin}\"\nthreads = 2\ndrain_ms = {drain_ms}\n\n[redis]\naddress = \"{}\"\n",
        redis.addr()
    ))
}

/// The value of a sample line `name value` (labels included in `name`).
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[test]
fn probes_status_and_metrics_of_a_single_node() {
    let redis = RedisServer::start();
    let admin = free_port();
    let proxy = single(&redis, admin, 0);
    assert_eq!(get(admin, "/livez").map(|r| r.0), Some(200));
    assert!(wait_until(Duration::from_secs(5), || get(admin, "/readyz").is_some_and(|r| r.0 == 200)));

    let mut c = proxy.conn();
    for i in 0..5 {
        let _: () = redis::cmd("SET").arg(format!("k{i}")).arg(i).query(&mut c).unwrap();
    }
    let _: Option<String> = redis::cmd("GET").arg("k1").query(&mut c).unwrap();
    let err = redis::cmd("INCR").arg("k1").arg("extra").query::<i64>(&mut c);
    assert!(err.is_err());

    let (code, m) = get(admin, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert_eq!(sample(&m, "resplica_commands_total{cmd=\"set\"}"), Some(5.0), "{m}");
    assert_eq!(sample(&m, "resplica_commands_total{cmd=\"get\"}"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "resplica_command_errors_total{cmd=\"incr\"}"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "resplica_command_duration_seconds_count{cmd=\"set\"}"), Some(5.0), "{m}");
    assert!(sample(&m, "resplica_connected_clients").is_some_and(|v| v >= 1.0), "{m}");
    assert!(sample(&m, "resplica_net_input_bytes_total").is_some_and(|v| v > 0.0), "{m}");
    assert!(sample(&m, "resplica_upstream_commands_total{redis=\"local\"}").is_some_and(|v| v >= 6.0), "{m}");
    assert!(m.contains("resplica_info{version="), "{m}");

    let (code, json) = get(admin, "/status?format=json").expect("status");
    assert_eq!(code, 200);
    assert!(json.starts_with('{') && json.contains("\"mode\":\"single\""), "{json}");
    assert_eq!(get(admin, "/nope").map(|r| r.0), Some(404));

    // The Redis gone: not ready (live still), and ready again when it returns.
    redis.stop();
    assert!(wait_until(Duration::from_secs(5), || get(admin, "/readyz").is_some_and(|r| r.0 == 503)));
    assert_eq!(get(admin, "/livez").map(|r| r.0), Some(200));
    redis.cont();
    assert!(wait_until(Duration::from_secs(5), || get(admin, "/readyz").is_some_and(|r| r.0 == 200)));
}

#[test]
fn sigterm_turns_readiness_off_first_keeps_serving_then_exits_zero() {
    let redis = RedisServer::start();
    let admin = free_port();
    let mut proxy = single(&redis, admin, 3000);
    assert!(wait_until(Duration::from_secs(5), || get(admin, "/readyz").is_some_and(|r| r.0 == 200)));
    let mut c = proxy.conn();
    proxy.terminate();
    assert!(wait_until(Duration::from_secs(2), || get(admin, "/readyz").is_some_and(|r| r.0 == 503)));
    let body = get(admin, "/readyz").map(|r| r.1).unwrap_or_default();
    assert!(body.contains("draining"), "{body}");
    // Still serving: the open connection and a new one.
    let _: () = redis::cmd("SET").arg("during-drain").arg("1").query(&mut c).unwrap();
    let mut fresh = proxy.conn();
    let v: String = redis::cmd("GET").arg("during-drain").query(&mut fresh).unwrap();
    assert_eq!(v, "1");
    let st = proxy.wait_exit(Duration::from_secs(15)).expect("resplica did not exit after the drain");
    assert!(st.success(), "exit status {st}");
}

#[test]
fn a_native_pair_is_ready_once_formed_and_reports_its_role() {
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    for (node, role) in [(&pair.a, "primary"), (&pair.b, "replica")] {
        let admin = node.admin_port;
        assert!(wait_until(Duration::from_secs(5), || get(admin, "/readyz").is_some_and(|r| r.0 == 200)));
        let (_, m) = get(admin, "/metrics").expect("metrics");
        assert_eq!(sample(&m, &format!("resplica_role{{role=\"{role}\"}}")), Some(1.0), "{m}");
        assert_eq!(sample(&m, "resplica_replica_link_up"), Some(1.0), "{m}");
        assert!(m.contains("mode=\"native\""), "{m}");
    }
}

#[test]
fn sighup_applies_live_settings_and_keeps_the_config_when_the_file_is_bad() {
    let redis = RedisServer::start();
    let admin = free_port();
    let base = format!(
        "[node]\nadmin_listen = \"127.0.0.1:{admin}\"\nthreads = 2\n\n[redis]\naddress = \"{}\"\n",
        redis.addr()
    );
    let proxy = Proxy::with_config(&base);
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();

    // A password and a refused command, live.
    proxy
        .reload_with(&format!("{base}\n[client]\npassword = \"s3cret\"\nrefuse_commands = [\"FLUSHALL\", \"KEYS\"]\n"));
    assert!(
        wait_until(Duration::from_secs(5), || proxy.log_text().contains("configuration reloaded")),
        "{}",
        proxy.log_text()
    );
    let log = proxy.log_text();
    assert!(log.contains("client.password") && log.contains("client.refuse_commands"), "{log}");
    let mut fresh = proxy.conn();
    let denied = redis::cmd("GET").arg("k").query::<String>(&mut fresh).unwrap_err();
    assert!(denied.to_string().contains("NOAUTH"), "{denied}");
    let _: () = redis::cmd("AUTH").arg("s3cret").query(&mut fresh).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut fresh).unwrap();
    assert_eq!(v, "v");
    let refused = redis::cmd("KEYS").arg("*").query::<Vec<String>>(&mut fresh).unwrap_err();
    assert!(!refused.to_string().is_empty());
    // The client authenticated before the change keeps working.
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");

    // A bad file: refused, logged, the running settings stay.
    proxy.reload_with("[node]\nthreads = \"many\"\n");
    assert!(wait_until(Duration::from_secs(5), || proxy.log_text().contains("reload refused")), "{}", proxy.log_text());
    let mut again = proxy.conn();
    let _: () = redis::cmd("AUTH").arg("s3cret").query(&mut again).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut again).unwrap();
    assert_eq!(v, "v");

    // A change that needs a restart is named, not applied.
    proxy.reload_with(&format!("{base}\n[client]\npassword = \"s3cret\"\nproto_max_bulk_len = \"1mb\"\n"));
    assert!(
        wait_until(Duration::from_secs(5), || proxy.log_text().contains("needs_restart=[client]")),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn a_native_pair_counts_the_resyncs_its_primary_served() {
    let pair = Pair::start_unsynced(native("local"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let admin = pair.a.admin_port;
    // b's Redis synced once from a's (a full sync: it started empty with its own history).
    assert!(
        wait_until(Duration::from_secs(5), || get(admin, "/metrics").is_some_and(|(_, m)| sample(
            &m,
            "resplica_replication_full_resyncs_total"
        )
        .is_some_and(|v| v >= 1.0))),
        "{:?}",
        get(admin, "/metrics").map(|r| r.1)
    );
}

/// `GET path` with `Authorization: Bearer <token>`: the status code.
fn get_with(port: u16, path: &str, token: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nauthorization: Bearer {token}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

/// With `[node] admin_token_file`: probes stay open; status, metrics and RESP commands need the
/// token (HTTP bearer, RESP AUTH, the CLI's --token-file or RESPLICA_ADMIN_TOKEN).
#[test]
fn an_admin_token_guards_status_metrics_and_commands() {
    use common::{text, RawConn};
    let redis = RedisServer::start();
    let admin = free_port();
    let token_file = std::env::temp_dir().join(format!("resplica-admin-token-{admin}"));
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let _proxy = Proxy::with_config(&format!(
        "[node]\nadmin_listen = \"127.0.0.1:{admin}\"\nadmin_token_file = \"{}\"\n\n[redis]\naddress = \"{}\"\n",
        token_file.display(),
        redis.addr()
    ));
    assert_eq!(get(admin, "/livez").map(|r| r.0), Some(200));
    assert!(wait_until(Duration::from_secs(5), || get(admin, "/readyz").is_some_and(|r| r.0 == 200)));
    assert_eq!(get(admin, "/metrics").map(|r| r.0), Some(401));
    assert_eq!(get(admin, "/status").map(|r| r.0), Some(401));
    assert_eq!(get_with(admin, "/metrics", "wrong"), Some(401));
    assert_eq!(get_with(admin, "/metrics", "s3cret-token"), Some(200));
    assert_eq!(get_with(admin, "/status", "s3cret-token"), Some(200));

    let mut raw = RawConn::connect(admin);
    assert_eq!(text(&raw.call(&["PING"])), "+PONG\r\n");
    assert!(text(&raw.call(&["RESPLICA", "STATUS"])).starts_with("-NOAUTH"));
    assert!(text(&raw.call(&["AUTH", "nope"])).starts_with("-WRONGPASS"));
    assert_eq!(text(&raw.call(&["AUTH", "s3cret-token"])), "+OK\r\n");
    assert!(text(&raw.call(&["RESPLICA", "STATUS"])).starts_with('$'));

    let cli = |args: &[&str], env_token: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_resplica"));
        c.arg("status").arg("--admin").arg(format!("127.0.0.1:{admin}")).args(args).env_remove("RESPLICA_ADMIN_TOKEN");
        if let Some(t) = env_token {
            c.env("RESPLICA_ADMIN_TOKEN", t);
        }
        c.output().unwrap()
    };
    let out = cli(&[], None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NOAUTH"), "{out:?}");
    let out = cli(&["--token-file", &token_file.display().to_string()], None);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("mode:single"), "{out:?}");
    let out = cli(&[], Some("s3cret-token"));
    assert!(out.status.success(), "{out:?}");
    let _ = std::fs::remove_file(&token_file);
}
