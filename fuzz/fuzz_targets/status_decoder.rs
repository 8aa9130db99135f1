//! Fuzz target for the status decoders: `INFO` text from a Redis (`ReplInfo::parse`) and the
//! heartbeat reports of both pair modes (`PeerReport`, `Report`). Nothing may panic, and a
//! decoded report survives its own encoding unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resplica::replication::membership::Report;
use resplica::replication::native::{PeerReport, ReplInfo};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(info) = ReplInfo::parse(&text) {
        let _ = info.history();
    }
    if let Some(r) = PeerReport::decode(&text) {
        let again = PeerReport::decode(&r.encode()).expect("an encoded report decodes");
        assert_eq!(again.encode(), r.encode());
    }
    if let Some(r) = Report::decode(&text) {
        let again = Report::decode(&r.encode()).expect("an encoded report decodes");
        assert_eq!(again.encode(), r.encode());
    }
});
