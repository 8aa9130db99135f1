//! Mirror mode: what a client's request becomes on its way to the writer's sequencer.
//!
//! The client's core parses and classifies a request once; the writer's core takes the
//! parsed [`Request`]s as they are (no copy, no second parse, no second lookup). Only a
//! request a follower forwards over the peer link travels as bytes (`RS.FWD`), and is
//! decoded here on the writer. A transaction's WATCH travels as a flag, not inside the
//! frames.

use bytes::{Bytes, BytesMut};

use crate::command::{self, CommandDef};
use crate::resp::{Request, RequestParser};

/// A request for the writer: one command, or a MULTI … EXEC block.
#[derive(Debug, Clone)]
pub enum WriterRequest {
    /// One command. `write`: it must reach every replica Redis (else the primary alone
    /// runs it).
    One { req: Request, write: bool },
    /// MULTI, `queued`, EXEC. `watched`: the client WATCHed keys, so the writer checks that
    /// none of them changed (and aborts the block when it has no record of the WATCH).
    Block { queued: Vec<Request>, watched: bool },
}

impl WriterRequest {
    /// One command, classified by the command table.
    pub fn one(req: Request) -> WriterRequest {
        let def = command::lookup(&req);
        WriterRequest::looked_up(req, def)
    }

    /// One command whose table entry the caller already looked up (`command::lookup(&req)`;
    /// the session has it for every request), so the hot path looks it up once.
    pub fn looked_up(req: Request, def: Option<&CommandDef>) -> WriterRequest {
        let write = command::replicates(def, &req);
        WriterRequest::One { req, write }
    }

    /// From parsed frames: one command, or MULTI, commands…, EXEC (`watched` applies to a
    /// block only). `None` for anything else (no frame; several frames not framed by
    /// MULTI … EXEC).
    pub fn from_frames(mut reqs: Vec<Request>, watched: bool) -> Option<WriterRequest> {
        match reqs.len() {
            0 => None,
            1 => reqs.pop().map(WriterRequest::one),
            n => {
                let framed =
                    reqs[0].arg(0).eq_ignore_ascii_case(b"multi") && reqs[n - 1].arg(0).eq_ignore_ascii_case(b"exec");
                if !framed {
                    return None;
                }
                reqs.pop();
                reqs.remove(0);
                Some(WriterRequest::Block { queued: reqs, watched })
            }
        }
    }

    /// Decode `RS.FWD`'s frame argument (see [`WriterRequest::encode`]).
    pub fn decode(frame: &[u8], watched: bool) -> Option<WriterRequest> {
        let mut buf = BytesMut::from(frame);
        let mut parser = RequestParser::new(usize::MAX >> 1);
        let mut reqs = Vec::new();
        loop {
            match parser.parse(&mut buf) {
                Ok(Some(r)) => reqs.push(r),
                Ok(None) if buf.is_empty() => break,
                Ok(None) | Err(_) => return None,
            }
        }
        WriterRequest::from_frames(reqs, watched)
    }

    /// The frames for `RS.FWD` (MULTI, the commands, EXEC for a block) and the WATCH flag.
    pub fn encode(&self) -> (Bytes, bool) {
        match self {
            WriterRequest::One { req, .. } => (req.frame.clone(), false),
            WriterRequest::Block { queued, watched } => {
                let mut out = BytesMut::new();
                out.extend_from_slice(&Request::from_args(&[b"MULTI"]).frame);
                for q in queued {
                    out.extend_from_slice(&q.frame);
                }
                out.extend_from_slice(&Request::from_args(&[b"EXEC"]).frame);
                (out.freeze(), *watched)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: &[&str]) -> Request {
        Request::from_args(a)
    }

    fn writes(w: WriterRequest) -> bool {
        matches!(w, WriterRequest::One { write: true, .. })
    }

    #[test]
    fn one_command_is_classified_by_the_table() {
        assert!(writes(WriterRequest::one(r(&["SET", "k", "v"]))));
        assert!(!writes(WriterRequest::one(r(&["GET", "k"]))));
        assert!(writes(WriterRequest::one(r(&["PUBLISH", "c", "m"]))));
        let get = r(&["GET", "k"]);
        let def = command::lookup(&get);
        assert!(!writes(WriterRequest::looked_up(get, def)));
    }

    #[test]
    fn a_block_survives_the_wire_with_its_watch_flag() {
        let block = WriterRequest::Block { queued: vec![r(&["INCR", "a"]), r(&["GET", "a"])], watched: true };
        let (frame, watched) = block.encode();
        assert!(watched);
        match WriterRequest::decode(&frame, watched) {
            Some(WriterRequest::Block { queued, watched: true }) => {
                assert_eq!(queued.len(), 2);
                assert_eq!(queued[0].arg(0), b"INCR");
                assert_eq!(queued[1].arg(1), b"a");
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn the_wire_refuses_what_no_client_sends() {
        assert!(WriterRequest::decode(b"", false).is_none(), "no frame");
        assert!(WriterRequest::decode(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n", false).is_none(), "two frames");
        assert!(WriterRequest::decode(b"*1\r\n$4\r\nPI", false).is_none(), "a cut frame");
        assert!(WriterRequest::decode(b"*1\r\n$4\r\nPING\r\n", false).is_some());
    }
}
