//! Criterion benches for the RESP framers: requests per second the parser cuts out of a
//! pipelined buffer, and replies per second the skimmer finds, for small and large values.
//!
//! What they do not measure: sockets, the kernel, cross-core hops, or the session's routing;
//! `perf/bench` measures the proxy end to end against direct Redis.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use resplica::resp::{ReplySkimmer, Request, RequestParser, DEFAULT_MAX_BULK};

fn pipeline(n: usize, value: usize) -> Vec<u8> {
    let v = vec![b'x'; value];
    let mut out = Vec::new();
    for i in 0..n {
        let key = format!("key:{i:06}");
        out.extend_from_slice(&Request::from_args(&[b"SET".as_slice(), key.as_bytes(), &v]).frame);
    }
    out
}

fn replies(n: usize, value: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.extend_from_slice(format!("${value}\r\n").as_bytes());
        out.extend(std::iter::repeat_n(b'v', value));
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("framer");
    for (n, value) in [(1000usize, 3usize), (1000, 1024), (10, 1 << 20)] {
        let input = pipeline(n, value);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("parse_requests/{n}x{value}B"), |b| {
            b.iter(|| {
                let mut p = RequestParser::new(DEFAULT_MAX_BULK);
                let mut buf = BytesMut::from(&input[..]);
                let mut count = 0;
                while let Ok(Some(_)) = p.parse(&mut buf) {
                    count += 1;
                }
                assert_eq!(count, n);
            })
        });
        let input = replies(n, value);
        g.bench_function(format!("skim_replies/{n}x{value}B"), |b| {
            b.iter(|| {
                let mut s = ReplySkimmer::new();
                let mut buf = BytesMut::from(&input[..]);
                let mut count = 0;
                while let Ok(Some(_)) = s.next_reply(&mut buf) {
                    count += 1;
                }
                assert_eq!(count, n);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
