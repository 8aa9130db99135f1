//! Property tests for the RESP framers: however a byte stream is split into reads, the
//! request parser and the reply skimmer cut exactly the same frames as from one buffer.

use bytes::BytesMut;
use proptest::prelude::*;
use resplica::resp::{ReplySkimmer, Request, RequestParser, DEFAULT_MAX_BULK};

fn arg() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        "[a-z]{1,8}".prop_map(|s| s.into_bytes()),
        proptest::collection::vec(any::<u8>(), 200..3000),
    ]
}

fn command() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(arg(), 1..6)
}

/// Feed `stream` in pieces cut at `cuts`, collecting every parsed request's arguments.
fn parse_in_pieces(stream: &[u8], cuts: &[usize]) -> Vec<Vec<Vec<u8>>> {
    let mut p = RequestParser::new(DEFAULT_MAX_BULK);
    let mut buf = BytesMut::new();
    let mut out = vec![];
    let mut last = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.sort_unstable();
    points.push(stream.len());
    for c in points {
        buf.extend_from_slice(&stream[last..c]);
        last = c;
        while let Some(r) = p.parse(&mut buf).expect("valid stream") {
            out.push(r.args().map(|a| a.to_vec()).collect());
        }
    }
    assert!(buf.is_empty(), "bytes left over");
    out
}

/// A reply stream built from nested RESP2/RESP3 values.
fn reply() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(b"+OK\r\n".to_vec()),
        Just(b"-ERR bad\r\n".to_vec()),
        any::<i64>().prop_map(|i| format!(":{i}\r\n").into_bytes()),
        Just(b"$-1\r\n".to_vec()),
        Just(b"_\r\n".to_vec()),
        Just(b",3.25\r\n".to_vec()),
        Just(b"#t\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..100).prop_map(|v| {
            let mut o = format!("${}\r\n", v.len()).into_bytes();
            o.extend_from_slice(&v);
            o.extend_from_slice(b"\r\n");
            o
        }),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(|items| {
                let mut o = format!("*{}\r\n", items.len()).into_bytes();
                items.iter().for_each(|i| o.extend_from_slice(i));
                o
            }),
            proptest::collection::vec((inner.clone(), inner.clone()), 0..4).prop_map(|pairs| {
                let mut o = format!("%{}\r\n", pairs.len()).into_bytes();
                pairs.iter().for_each(|(k, v)| {
                    o.extend_from_slice(k);
                    o.extend_from_slice(v)
                });
                o
            }),
            (inner.clone(), inner.clone(), inner.clone()).prop_map(|(k, v, value)| {
                let mut o = b"|1\r\n".to_vec();
                o.extend_from_slice(&k);
                o.extend_from_slice(&v);
                o.extend_from_slice(&value);
                o
            }),
            proptest::collection::vec(inner, 1..4).prop_map(|items| {
                let mut o = format!(">{}\r\n", items.len()).into_bytes();
                items.iter().for_each(|i| o.extend_from_slice(i));
                o
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_split_of_requests_yields_the_same_frames(cmds in proptest::collection::vec(command(), 1..20),
                                                    cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let mut stream = Vec::new();
        for c in &cmds {
            stream.extend_from_slice(&Request::from_args(c).frame);
        }
        let whole = parse_in_pieces(&stream, &[]);
        prop_assert_eq!(&whole, &cmds);
        let pieces = parse_in_pieces(&stream, &cuts);
        prop_assert_eq!(pieces, cmds);
    }

    #[test]
    fn any_split_of_replies_yields_the_same_frames(replies in proptest::collection::vec(reply(), 1..20),
                                                   cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let stream: Vec<u8> = replies.concat();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.sort_unstable();
        points.push(stream.len());
        let mut skim = ReplySkimmer::new();
        let mut buf = BytesMut::new();
        let mut got = vec![];
        let mut last = 0;
        for c in points {
            buf.extend_from_slice(&stream[last..c]);
            last = c;
            while let Some(f) = skim.next_reply(&mut buf).expect("valid replies") {
                got.push(f.to_vec());
            }
        }
        prop_assert_eq!(got, replies);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut p = RequestParser::new(1 << 20);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = p.parse(&mut buf) {}
        let mut s = ReplySkimmer::new();
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = s.next_reply(&mut buf) {}
    }
}
