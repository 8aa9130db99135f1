//! Slot sequencing under concurrency: with `sequencing = "slot"` and two cores, a client's
//! writes travel to their slot's sequencer core while its reads start on its own core. Every
//! client must still read its own writes, in order, and no increment may be lost.

mod common;

use std::collections::HashMap;

use common::*;
use redis::Value;
use resplica::slot::key_slot;

const CLIENTS: usize = 8;
const OPS: usize = 2000;
const BATCH: usize = 100;
const SHARED_COUNTERS: usize = 8;
const SHARED_KEYS: usize = 8;
const OWN_KEYS: usize = 24;

/// What a reply must be.
enum Expect {
    Exact(Value),
    /// INCR of a shared counter: larger than anything this client saw before on it.
    SharedCounter(usize),
    /// Any integer (DEL of a key other clients also write).
    AnyInt,
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

/// One client's run; returns how many times it incremented each shared counter.
fn client_run(port: u16, w: usize) -> Vec<u64> {
    let mut con = redis_conn(port, None);
    let mut rng = Lcg(w as u64 * 7919 + 1);
    let own: Vec<String> = (0..OWN_KEYS).map(|j| format!("seq:{w}:k{j}")).collect();
    // Pairs of own keys whose slots belong to different sequencer cores (2 threads).
    let cross: Vec<(usize, usize)> = (0..OWN_KEYS)
        .flat_map(|a| (0..OWN_KEYS).map(move |b| (a, b)))
        .filter(|&(a, b)| key_slot(own[a].as_bytes()) % 2 != key_slot(own[b].as_bytes()) % 2)
        .collect();
    assert!(!cross.is_empty());
    let ctr = format!("seq:{w}:ctr");
    let mut model: HashMap<usize, String> = HashMap::new();
    let mut own_ctr = 0i64;
    let mut shared_seen = [0i64; SHARED_COUNTERS];
    let mut shared_incrs = vec![0u64; SHARED_COUNTERS];
    let mut done = 0;
    let mut version = 0u64;
    while done < OPS {
        let mut pipe = redis::pipe();
        let mut expect: Vec<(String, Expect)> = Vec::new();
        while expect.len() < BATCH && done < OPS {
            done += 1;
            version += 1;
            let k = rng.next(OWN_KEYS);
            match rng.next(9) {
                0 | 1 => {
                    // Read-your-writes: SET and the GET right behind it in the same pipeline.
                    let v = format!("v{w}-{version}");
                    pipe.cmd("SET").arg(&own[k]).arg(&v);
                    pipe.cmd("GET").arg(&own[k]);
                    expect.push((format!("SET {}", own[k]), Expect::Exact(Value::Okay)));
                    expect.push((format!("GET {} after SET", own[k]), Expect::Exact(bulk(&v))));
                    model.insert(k, v);
                }
                2 => {
                    pipe.cmd("GET").arg(&own[k]);
                    let e = model.get(&k).map_or(Value::Nil, |v| bulk(v));
                    expect.push((format!("GET {}", own[k]), Expect::Exact(e)));
                }
                3 => {
                    own_ctr += 1;
                    pipe.cmd("INCR").arg(&ctr);
                    expect.push((format!("INCR {ctr}"), Expect::Exact(Value::Int(own_ctr))));
                }
                4 => {
                    let n = rng.next(SHARED_COUNTERS);
                    shared_incrs[n] += 1;
                    pipe.cmd("INCR").arg(format!("seq:shared:c{n}"));
                    expect.push((format!("INCR seq:shared:c{n}"), Expect::SharedCounter(n)));
                }
                5 => {
                    // MSET across slots of both cores, then read each key (GET and MGET).
                    let (a, b) = cross[rng.next(cross.len())];
                    let (va, vb) = (format!("ma{w}-{version}"), format!("mb{w}-{version}"));
                    pipe.cmd("MSET").arg(&own[a]).arg(&va).arg(&own[b]).arg(&vb);
                    model.insert(a, va);
                    model.insert(b, vb);
                    expect.push((format!("MSET {} {}", own[a], own[b]), Expect::Exact(Value::Okay)));
                    pipe.cmd("GET").arg(&own[b]);
                    expect.push((format!("GET {} after MSET", own[b]), Expect::Exact(bulk(&model[&b]))));
                    pipe.cmd("MGET").arg(&own[a]).arg(&own[b]);
                    expect.push((
                        format!("MGET {} {} after MSET", own[a], own[b]),
                        Expect::Exact(Value::Array(vec![bulk(&model[&a]), bulk(&model[&b])])),
                    ));
                }
                6 => {
                    let existed = model.remove(&k).is_some();
                    pipe.cmd("DEL").arg(&own[k]);
                    expect.push((format!("DEL {}", own[k]), Expect::Exact(Value::Int(existed as i64))));
                    pipe.cmd("EXISTS").arg(&own[k]);
                    expect.push((format!("EXISTS {} after DEL", own[k]), Expect::Exact(Value::Int(0))));
                }
                7 => {
                    // Keys every client writes and deletes.
                    let n = rng.next(SHARED_KEYS);
                    pipe.cmd("SET").arg(format!("seq:shared:s{n}")).arg(w);
                    expect.push((format!("SET seq:shared:s{n}"), Expect::Exact(Value::Okay)));
                    pipe.cmd("DEL")
                        .arg(format!("seq:shared:s{n}"))
                        .arg(format!("seq:shared:s{}", (n + 1) % SHARED_KEYS));
                    expect.push((format!("DEL seq:shared:s{n}"), Expect::AnyInt));
                }
                _ => {
                    // A multi-key delete over own keys in several slots, then a read of one.
                    let (a, b) = cross[rng.next(cross.len())];
                    let n = model.remove(&a).is_some() as i64 + model.remove(&b).is_some() as i64;
                    pipe.cmd("DEL").arg(&own[a]).arg(&own[b]);
                    expect.push((format!("DEL {} {}", own[a], own[b]), Expect::Exact(Value::Int(n))));
                    pipe.cmd("GET").arg(&own[a]);
                    expect.push((format!("GET {} after DEL", own[a]), Expect::Exact(Value::Nil)));
                }
            }
        }
        let replies: Vec<Value> = pipe.query(&mut con).unwrap_or_else(|e| panic!("client {w}: pipeline failed: {e}"));
        assert_eq!(replies.len(), expect.len(), "client {w}");
        for (i, (r, (what, e))) in replies.iter().zip(&expect).enumerate() {
            match e {
                Expect::Exact(v) => assert_eq!(r, v, "client {w}: reply {i} of batch ({what})"),
                Expect::SharedCounter(n) => match r {
                    Value::Int(x) => {
                        assert!(*x > shared_seen[*n], "client {w}: {what} went back from {} to {x}", shared_seen[*n]);
                        shared_seen[*n] = *x;
                    }
                    other => panic!("client {w}: {what}: {other:?}"),
                },
                Expect::AnyInt => assert!(matches!(r, Value::Int(0..=2)), "client {w}: {what}: {r:?}"),
            }
        }
    }
    let final_ctr: i64 = redis::cmd("GET").arg(&ctr).query(&mut con).unwrap();
    assert_eq!(final_ctr, own_ctr, "client {w}");
    shared_incrs
}

#[test]
fn slot_sequencing_keeps_each_clients_order() {
    let redis = RedisServer::start();
    for driver in drivers() {
        let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
        let proxy = Proxy::with_config(&format!(
            "[node]\nthreads = 2\nio_driver = \"{driver}\"\nsequencing = \"slot\"\n[redis]\naddress = \"{}\"\n",
            redis.addr()
        ));
        assert!(proxy.log_text().contains("slot_sequencing=true"), "{driver}: {}", proxy.log_text());
        let t = std::time::Instant::now();
        let handles: Vec<_> = (0..CLIENTS)
            .map(|w| {
                let port = proxy.port;
                std::thread::spawn(move || client_run(port, w))
            })
            .collect();
        let mut totals = [0u64; SHARED_COUNTERS];
        for h in handles {
            let incrs = h.join().unwrap_or_else(|_| panic!("{driver}: a client failed"));
            for (t, n) in totals.iter_mut().zip(incrs) {
                *t += n;
            }
        }
        eprintln!("{driver}: {} clients x {OPS} ops in {:?}", CLIENTS, t.elapsed());
        let mut d = redis.conn();
        for (n, want) in totals.iter().enumerate() {
            let got: Option<u64> = redis::cmd("GET").arg(format!("seq:shared:c{n}")).query(&mut d).unwrap();
            assert_eq!(got.unwrap_or(0), *want, "{driver}: shared counter {n} lost increments");
        }
        assert!(totals.iter().sum::<u64>() > 0);
    }
}
