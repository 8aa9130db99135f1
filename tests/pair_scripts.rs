//! Pair mode paths off the common one: scripts and functions (shipped verbatim to every
//! Redis, with the script cache kept the same everywhere so EVALSHA works on every replica)
//! and clients whose reads stay on a dedicated connection (CLIENT TRACKING).

mod common;

use common::pair::Pair;

fn on_both(pair: &Pair, key: &str) -> Vec<Option<String>> {
    pair.nodes().iter().map(|n| redis::cmd("GET").arg(key).query(&mut n.redis_conn()).expect("GET on Redis")).collect()
}

#[test]
fn eval_evalsha_and_functions_reach_both_redis() {
    let pair = Pair::start();
    let (mut ca, mut cb) = (pair.a.conn(), pair.b.conn());
    let script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])";
    let n: i64 = redis::cmd("EVAL").arg(script).arg(2).arg("sc:k").arg("sc:n").arg("v1").query(&mut cb).expect("EVAL");
    assert_eq!(n, 1);
    assert_eq!(on_both(&pair, "sc:k"), vec![Some("v1".to_string()); 2]);

    let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(script).query(&mut ca).expect("SCRIPT LOAD");
    let n: i64 =
        redis::cmd("EVALSHA").arg(&sha).arg(2).arg("sc:k").arg("sc:n").arg("v2").query(&mut cb).expect("EVALSHA");
    assert_eq!(n, 2);
    assert_eq!(
        on_both(&pair, "sc:n"),
        vec![Some("2".to_string()); 2],
        "EVALSHA applied on both (script cache replicated)"
    );

    let lib = "#!lua name=sclib\nredis.register_function('bump', function(keys, args) return redis.call('INCRBY', keys[1], args[1]) end)";
    let _: String = redis::cmd("FUNCTION").arg("LOAD").arg(lib).query(&mut cb).expect("FUNCTION LOAD");
    let v: i64 = redis::cmd("FCALL").arg("bump").arg(1).arg("sc:f").arg(5).query(&mut ca).expect("FCALL");
    assert_eq!(v, 5);
    assert_eq!(on_both(&pair, "sc:f"), vec![Some("5".to_string()); 2]);
    pair.assert_converged();
}

#[test]
fn writes_of_a_tracking_client_still_reach_both_redis() {
    let pair = Pair::start();
    let mut cb = pair.b.conn();
    let _: () = redis::cmd("CLIENT").arg("TRACKING").arg("ON").query(&mut cb).expect("CLIENT TRACKING ON");
    let _: () = redis::cmd("SET").arg("tr:k").arg("v").query(&mut cb).expect("SET");
    let v: Option<String> = redis::cmd("GET").arg("tr:k").query(&mut cb).expect("GET");
    assert_eq!(v.as_deref(), Some("v"), "read-your-writes on the tracking connection");
    assert_eq!(on_both(&pair, "tr:k"), vec![Some("v".to_string()); 2]);
}

#[test]
fn publish_counts_the_subscribers_of_every_node() {
    let pair = Pair::start();
    let mut subs: Vec<redis::Connection> = pair.nodes().iter().map(|n| n.conn()).collect();
    let mut pubsubs: Vec<redis::PubSub> = subs
        .iter_mut()
        .map(|c| {
            let mut ps = c.as_pubsub();
            ps.subscribe("cnt:ch").expect("SUBSCRIBE");
            ps
        })
        .collect();
    for n in pair.nodes() {
        let receivers: i64 = redis::cmd("PUBLISH").arg("cnt:ch").arg("m").query(&mut n.conn()).expect("PUBLISH");
        assert_eq!(receivers, 2, "PUBLISH through {} counts the subscribers on both nodes", n.id);
    }
    for ps in &mut pubsubs {
        ps.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        for _ in 0..2 {
            let m = ps.get_message().expect("message");
            assert_eq!(m.get_payload::<String>().expect("payload"), "m");
        }
    }
}
