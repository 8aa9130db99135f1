//! Fuzz target for the peer link's input side: arbitrary bytes from an unauthenticated
//! connection go through the request framer (held to the unauthenticated limits) and the
//! handshake (`peer_auth::Acceptor`), and every argument through both modes' heartbeat
//! decoders. Nothing may panic; a handshake never accepts a peer that did not prove the
//! secret.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use resplica::peer_auth::{Accepted, Acceptor};
use resplica::replication::membership::Report;
use resplica::replication::native::PeerReport;
use resplica::resp::RequestParser;

fuzz_target!(|data: &[u8]| {
    let mut parser = RequestParser::new(64 << 20);
    parser.set_unauthenticated(true);
    let mut buf = BytesMut::from(data);
    let mut acceptor = Acceptor::new("a");
    while let Ok(Some(req)) = parser.parse(&mut buf) {
        if let Ok(step) = acceptor.accept(b"the-secret", &req) {
            let _ = step.reply();
            // Random bytes cannot carry an HMAC of our fresh nonce under the secret.
            assert!(!matches!(step, Accepted::Authenticated(_)), "authenticated without the secret");
        }
        for i in 0..req.len() {
            let text = String::from_utf8_lossy(req.arg(i));
            if let Some(r) = PeerReport::decode(&text) {
                let _ = PeerReport::decode(&r.encode());
            }
            if let Some(r) = Report::decode(&text) {
                let _ = Report::decode(&r.encode());
            }
        }
    }
});
