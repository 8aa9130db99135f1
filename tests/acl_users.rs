//! Redis ACL users through the proxy (issue 9, item 2): a client that authenticates as a
//! Redis user acts as that user on Redis itself, over shared connections of that user.

mod common;

use common::{wait_until, Proxy, RedisServer};
use std::time::Duration;

fn redis_with_users() -> RedisServer {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    add_user(&mut c, "app", "apppass", "~app:*");
    add_user(&mut c, "other", "otherpass", "~other:*");
    add_narrow_user(&mut c);
    redis
}

/// A user with every command on the keys `keys` (and every channel).
fn add_user(c: &mut redis::Connection, user: &str, pass: &str, keys: &str) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg("on")
        .arg(format!(">{pass}"))
        .arg(keys)
        .arg("&*")
        .arg("+@all")
        .query(c)
        .unwrap();
}

/// A typical application user: reads and writes on `app:*`, nothing administrative (no
/// INFO, no CLIENT LIST/KILL).
fn add_narrow_user(c: &mut redis::Connection) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("narrow")
        .arg("on")
        .arg(">narrowpass")
        .arg("~app:*")
        .arg("+@read")
        .arg("+@write")
        .arg("+@connection")
        .arg("-@dangerous")
        .query(c)
        .unwrap();
}

fn conn_as(proxy: &Proxy, user: &str, pass: &str) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{user}:{pass}@127.0.0.1:{}/", proxy.port)).unwrap();
    client.get_connection_with_timeout(Duration::from_secs(5)).unwrap()
}

fn err_of(r: redis::RedisResult<()>) -> String {
    r.expect_err("expected an error").to_string()
}

/// Two users on one core each get their own permissions, from Redis; the default user keeps
/// the proxy's identity; wrong credentials get Redis's own error.
#[test]
fn acl_users_get_their_own_permissions_on_one_core() {
    let redis = redis_with_users();
    let proxy = Proxy::start(&redis, &["--threads", "1"]);
    let mut app = conn_as(&proxy, "app", "apppass");
    let mut other = conn_as(&proxy, "other", "otherpass");
    let mut anon = proxy.conn();

    let _: () = redis::cmd("SET").arg("app:1").arg("a").query(&mut app).unwrap();
    let e = err_of(redis::cmd("SET").arg("other:1").arg("x").query(&mut app));
    assert!(e.contains("NOPERM"), "app may not touch other:*: {e}");
    let _: () = redis::cmd("SET").arg("other:1").arg("o").query(&mut other).unwrap();
    let e = err_of(redis::cmd("GET").arg("app:1").query(&mut other));
    assert!(e.contains("NOPERM"), "other may not read app:*: {e}");
    // Pipelined, interleaved on the shared connections: each keeps its own permissions.
    for i in 0..50 {
        let _: () = redis::cmd("SET").arg(format!("app:{i}")).arg(i).query(&mut app).unwrap();
        let _: () = redis::cmd("SET").arg(format!("other:{i}")).arg(i).query(&mut other).unwrap();
    }
    let whoami: String = redis::cmd("ACL").arg("WHOAMI").query(&mut app).unwrap();
    assert_eq!(whoami, "app");
    let whoami: String = redis::cmd("ACL").arg("WHOAMI").query(&mut anon).unwrap();
    assert_eq!(whoami, "default");
    // The default user (the proxy's own identity) is unrestricted, as on this Redis.
    let _: () = redis::cmd("SET").arg("free").arg("1").query(&mut anon).unwrap();

    // Transactions and blocking commands run on the user's own connection.
    let e = err_of(redis::cmd("BLPOP").arg("other:list").arg(1).query(&mut app));
    assert!(e.contains("NOPERM"), "{e}");
    let (v,): (i64,) = redis::pipe().atomic().cmd("INCR").arg("app:counter").query(&mut app).unwrap();
    assert_eq!(v, 1);

    // Wrong credentials: Redis's own error, and the connection stays what it was.
    let e = err_of(redis::cmd("AUTH").arg("app").arg("wrong").query(&mut other));
    assert!(e.contains("WRONGPASS"), "{e}");
    let whoami: String = redis::cmd("ACL").arg("WHOAMI").query(&mut other).unwrap();
    assert_eq!(whoami, "other");

    // HELLO 3 AUTH switches user and protocol at once.
    let mut c = proxy.conn();
    let hello: redis::Value = redis::cmd("HELLO").arg(3).arg("AUTH").arg("app").arg("apppass").query(&mut c).unwrap();
    assert!(matches!(hello, redis::Value::Map(_)), "RESP3 map: {hello:?}");
    let whoami: String = redis::cmd("ACL").arg("WHOAMI").query(&mut c).unwrap();
    assert_eq!(whoami, "app");
    let e = err_of(redis::cmd("SET").arg("free").arg("2").query(&mut c));
    assert!(e.contains("NOPERM"), "{e}");
    let e = err_of(redis::cmd("HELLO").arg(3).arg("AUTH").arg("app").arg("nope").query(&mut c));
    assert!(e.contains("WRONGPASS"), "{e}");

    // A client that becomes another user leaves its dedicated connection behind: its next
    // blocking command runs as the new user.
    let mut switch = proxy.conn();
    let _: () = redis::cmd("LPUSH").arg("free:list").arg("x").query(&mut switch).unwrap();
    let got: Option<(String, String)> = redis::cmd("BLPOP").arg("free:list").arg(1).query(&mut switch).unwrap();
    assert!(got.is_some());
    let _: () = redis::cmd("AUTH").arg("app").arg("apppass").query(&mut switch).unwrap();
    let e = err_of(redis::cmd("BLPOP").arg("free:list").arg(1).query(&mut switch));
    assert!(e.contains("NOPERM"), "the old dedicated connection (default user) must not be used: {e}");

    // An administrative command the proxy answers itself is allowed only if Redis would.
    let mut narrow = conn_as(&proxy, "narrow", "narrowpass");
    let _: () = redis::cmd("SET").arg("app:narrow").arg("1").query(&mut narrow).unwrap();
    let e = err_of(redis::cmd("CLIENT").arg("LIST").query::<String>(&mut narrow).map(|_| ()));
    assert!(e.contains("NOPERM"), "{e}");
    let e = err_of(redis::cmd("CLIENT").arg("KILL").arg("USER").arg("app").query::<i64>(&mut narrow).map(|_| ()));
    assert!(e.contains("NOPERM"), "{e}");

    // Redis holds every write made through the proxy, under the right keys.
    let mut direct = redis.conn();
    let v: String = redis::cmd("GET").arg("other:49").query(&mut direct).unwrap();
    assert_eq!(v, "49");
}

/// CLIENT LIST shows each proxy client's user; CLIENT KILL USER closes that user's clients.
#[test]
fn client_list_and_kill_know_the_user() {
    let redis = redis_with_users();
    let proxy = Proxy::start(&redis, &["--threads", "2"]);
    let mut app = conn_as(&proxy, "app", "apppass");
    let mut other = conn_as(&proxy, "other", "otherpass");
    let _: () = redis::cmd("SET").arg("app:x").arg(1).query(&mut app).unwrap();
    let mut admin = proxy.conn();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
    assert!(list.lines().any(|l| l.contains(" user=app ")), "{list}");
    assert!(list.lines().any(|l| l.contains(" user=other ")), "{list}");
    assert!(list.lines().any(|l| l.contains(" user=default ")), "{list}");
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("USER").arg("other").query(&mut admin).unwrap();
    assert_eq!(killed, 1);
    let gone = wait_until(Duration::from_secs(5), || redis::cmd("PING").query::<String>(&mut other).is_err());
    assert!(gone, "the killed client's connection is closed");
    let pong: String = redis::cmd("PING").query(&mut app).unwrap();
    assert_eq!(pong, "PONG", "other users' clients are untouched");
}

/// A native pair: an ACL user (defined on both Redis) writes through the replica's sidecar
/// to the primary with its own permissions.
#[test]
fn acl_users_through_a_native_pair() {
    use common::native::{native, wait_formed, FORM_TIMEOUT};
    use common::pair::Pair;
    let pair = Pair::start_unsynced(native("all"));
    wait_formed(&pair, "a", FORM_TIMEOUT);
    for r in [&pair.a.redis, &pair.b.redis] {
        add_narrow_user(&mut r.conn());
    }
    // (The narrow user may not run INFO: the sidecars learn which Redis run its connections
    // reach with their own identity.)
    for node in [&pair.a, &pair.b] {
        let client = redis::Client::open(format!("redis://narrow:narrowpass@127.0.0.1:{}/", node.port)).unwrap();
        let mut c = client.get_connection_with_timeout(Duration::from_secs(5)).unwrap();
        let _: () = redis::cmd("SET").arg(format!("app:{}", node.port)).arg("v").query(&mut c).unwrap();
        let e = err_of(redis::cmd("SET").arg("elsewhere").arg("v").query(&mut c));
        assert!(e.contains("NOPERM"), "{e}");
    }
    let mut b = pair.b.redis.conn();
    let ok = wait_until(Duration::from_secs(10), || {
        redis::cmd("EXISTS")
            .arg(format!("app:{}", pair.a.port))
            .arg(format!("app:{}", pair.b.port))
            .query::<i64>(&mut b)
            == Ok(2)
    });
    assert!(ok, "both writes replicated to b's Redis");
}

/// Redis replicates no ACL rule: a native pair compares both Redis's users at start and
/// says which differ, in the status and the log.
#[test]
fn a_native_pair_names_acl_users_only_one_redis_holds() {
    use common::native::{native, status_of, wait_formed, FORM_TIMEOUT};
    use common::pair::Pair;
    let mut pair = Pair::prepare(native("all"));
    add_narrow_user(&mut pair.a.redis.conn());
    add_user(&mut pair.b.redis.conn(), "ops", "opspass", "~*");
    pair.a.spawn_proxy();
    pair.b.spawn_proxy();
    for n in [&mut pair.a, &mut pair.b] {
        n.wait_proxy_ready(Duration::from_secs(10)).unwrap();
    }
    wait_formed(&pair, "a", FORM_TIMEOUT);
    let shown = |port: u16| status_of(port).map(|st| st.get("acl_users").to_string()).unwrap_or_default();
    let ok = wait_until(Duration::from_secs(10), || {
        shown(pair.a.port) == "differ users=narrow,ops" && shown(pair.b.port) == "differ users=narrow,ops"
    });
    assert!(ok, "status: {} / {}", shown(pair.a.port), shown(pair.b.port));
    assert!(pair.a.log_text().contains("different ACL users"), "{}", pair.a.log_text());
}

/// Mirror mode cannot apply a user's permissions to the sequencer's writes: it refuses ACL
/// users with a clear error, and the client stays the default user.
#[test]
fn mirror_mode_refuses_acl_users() {
    use common::pair::Pair;
    let pair = Pair::start();
    let mut c = pair.a.conn();
    let e = err_of(redis::cmd("AUTH").arg("app").arg("apppass").query(&mut c));
    assert!(e.contains("not in mirror mode"), "{e}");
    let e = err_of(redis::cmd("HELLO").arg(3).arg("AUTH").arg("app").arg("apppass").query(&mut c));
    assert!(e.contains("not in mirror mode"), "{e}");
    let whoami: String = redis::cmd("ACL").arg("WHOAMI").query(&mut c).unwrap();
    assert_eq!(whoami, "default");
}

/// A user deleted on Redis (which closes its connections there) loses its proxy clients too;
/// recreated, it connects again (its shared connection is made anew).
#[test]
fn a_deleted_user_loses_its_clients_and_can_come_back() {
    let redis = redis_with_users();
    let proxy = Proxy::start(&redis, &["--threads", "1"]);
    let mut app = conn_as(&proxy, "app", "apppass");
    let _: () = redis::cmd("SET").arg("app:1").arg("a").query(&mut app).unwrap();
    let _: () = redis::cmd("ACL").arg("DELUSER").arg("app").query(&mut redis.conn()).unwrap();
    let gone =
        wait_until(Duration::from_secs(10), || redis::cmd("SET").arg("app:2").arg("b").query::<()>(&mut app).is_err());
    assert!(gone, "a deleted user's client keeps writing");
    let exists: bool = redis::cmd("EXISTS").arg("app:2").query(&mut redis.conn()).unwrap();
    assert!(!exists, "nothing written as a deleted user");
    add_user(&mut redis.conn(), "app", "apppass", "~app:*");
    let mut again = conn_as(&proxy, "app", "apppass");
    let _: () = redis::cmd("SET").arg("app:3").arg("c").query(&mut again).unwrap();
    let whoami: String = redis::cmd("ACL").arg("WHOAMI").query(&mut again).unwrap();
    assert_eq!(whoami, "app");
}
