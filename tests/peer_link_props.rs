//! Property tests for the peer link's decoders (the fuzz targets `peer_link` and
//! `status_decoder` in `fuzz/` explore the same properties without bounds; these run in CI):
//! arbitrary bytes through the handshake never authenticate and never panic; `INFO` text and
//! both modes' heartbeat reports decode without panicking, and a decoded report survives its
//! own encoding unchanged.

use bytes::BytesMut;
use proptest::prelude::*;
use resplica::peer_auth::{Accepted, Acceptor, Initiator};
use resplica::replication::membership::Report;
use resplica::replication::native::{PeerReport, ReplInfo};
use resplica::resp::{Request, RequestParser};

/// Lines that look like the real ones, with arbitrary values, mixed with noise.
fn report_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("id"),
        Just("epoch"),
        Just("primary"),
        Just("redis_up"),
        Just("priority"),
        Just("confirmed"),
        Just("confirmed_replid"),
        Just("role"),
        Just("writer"),
        Just("boot"),
        Just("replica"),
        Just("master_replid"),
        Just("master_repl_offset"),
        Just("second_repl_offset"),
        Just("run_id"),
        Just("role"),
        Just("db0"),
    ];
    let value = prop_oneof![".{0,12}", "[0-9]{1,20}", "-?[0-9]{1,3}", "[a-z]+ [a-z_]+ [0-9a-f]{0,8}"];
    proptest::collection::vec((key, value, prop_oneof![Just("\n"), Just("\r\n"), Just(":"), Just("")]), 0..20)
        .prop_map(|lines| lines.into_iter().map(|(k, v, end)| format!("{k}:{v}{end}")).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn status_decoders_never_panic_and_reports_round_trip(text in prop_oneof![report_text(), ".{0,300}"]) {
        let _ = ReplInfo::parse(&text).map(|i| i.history());
        if let Some(r) = PeerReport::decode(&text) {
            let again = PeerReport::decode(&r.encode()).expect("an encoded report decodes");
            prop_assert_eq!(again.encode(), r.encode());
        }
        if let Some(r) = Report::decode(&text) {
            let again = Report::decode(&r.encode()).expect("an encoded report decodes");
            prop_assert_eq!(again.encode(), r.encode());
        }
    }

    #[test]
    fn random_frames_never_pass_the_handshake(data in proptest::collection::vec(any::<u8>(), 0..600),
                                              args in proptest::collection::vec(".{0,70}", 0..4)) {
        let mut acceptor = Acceptor::new("a");
        // Raw bytes through the framer, then well-formed commands with random arguments.
        let mut parser = RequestParser::new(1 << 20);
        parser.set_unauthenticated(true);
        let mut buf = BytesMut::from(&data[..]);
        let mut reqs: Vec<Request> = Vec::new();
        while let Ok(Some(r)) = parser.parse(&mut buf) {
            reqs.push(r);
        }
        for name in ["RS.HELLO", "RS.PROVE"] {
            let mut all: Vec<&[u8]> = vec![name.as_bytes()];
            all.extend(args.iter().map(|a| a.as_bytes()));
            reqs.push(Request::from_args(&all));
        }
        for r in &reqs {
            if let Ok(step) = acceptor.accept(b"the-secret", r) {
                let _ = step.reply();
                prop_assert!(!matches!(step, Accepted::Authenticated(_)), "authenticated without the secret");
            }
        }
    }
}

/// The honest path through real frames: each side's frames, encoded and parsed as on the
/// wire, authenticate.
#[test]
fn the_handshake_works_through_the_framer() {
    let secret = b"shared";
    let client = Initiator::new("b");
    let mut server = Acceptor::new("a");
    let parse = |args: &[Vec<u8>]| {
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        let mut buf = BytesMut::from(&Request::from_args(&refs).frame[..]);
        RequestParser::new(1 << 20).parse(&mut buf).unwrap().unwrap()
    };
    let Accepted::Challenge([nonce, proof]) = server.accept(secret, &parse(&client.hello())).unwrap() else {
        panic!("RS.HELLO answers a challenge")
    };
    let prove = client.prove(secret, b"a", nonce.as_bytes(), proof.as_bytes()).unwrap();
    assert_eq!(server.accept(secret, &parse(&prove)).unwrap(), Accepted::Authenticated("b".into()));
}
