//! Fuzz target for the RESP framers: arbitrary bytes, fed in arbitrary pieces, must never
//! panic, and a valid request stream must parse the same whole or split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use resplica::resp::{ReplySkimmer, RequestParser};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // First byte picks the read size so splits vary too.
    let step = (data[0] as usize % 17) + 1;
    let body = &data[1..];

    let mut whole = RequestParser::new(1 << 20);
    let mut buf = BytesMut::from(body);
    let mut expected = Vec::new();
    let whole_err = loop {
        match whole.parse(&mut buf) {
            Ok(Some(r)) => expected.push(r.frame.to_vec()),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };

    let mut split = RequestParser::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut split_err = None;
    'outer: for chunk in body.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match split.parse(&mut buf) {
                Ok(Some(r)) => got.push(r.frame.to_vec()),
                Ok(None) => break,
                Err(e) => {
                    split_err = Some(e);
                    break 'outer;
                }
            }
        }
    }
    if whole_err.is_none() && split_err.is_none() {
        assert_eq!(expected, got);
    }

    let mut skim = ReplySkimmer::new();
    let mut buf = BytesMut::new();
    for chunk in body.chunks(step) {
        buf.extend_from_slice(chunk);
        while let Ok(Some(_)) = skim.next_reply(&mut buf) {}
    }
});
