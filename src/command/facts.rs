//! Facts about commands that the table's flags do not carry: which forms really block,
//! which commands put a connection in pub/sub (or MONITOR) mode, and the null replies a
//! blocking command or an aborted transaction gets. One home, so the session, the
//! sequencer and the shells agree.

use bytes::Bytes;

use super::F_BLOCKING;
use crate::resp::{self, Request};

/// Commands that put a connection into pub/sub or MONITOR mode or take it out of it
/// (`name` lowercased): they need a connection of their own upstream.
pub fn is_pubsub_mode(name: &[u8]) -> bool {
    matches!(
        name,
        b"subscribe" | b"psubscribe" | b"ssubscribe" | b"unsubscribe" | b"punsubscribe" | b"sunsubscribe" | b"monitor"
    )
}

/// Whether `req` (with table flags `flags`) blocks its connection (so it needs a dedicated
/// upstream connection: on a shared one it would stall every other client's commands): commands flagged
/// blocking, `WAIT`/`WAITAOF`, and `XREAD`/`XREADGROUP` only in their `BLOCK` form.
pub fn blocks(req: &Request, flags: u64) -> bool {
    let name = req.arg(0);
    if name.eq_ignore_ascii_case(b"xread") || name.eq_ignore_ascii_case(b"xreadgroup") {
        return req.args().skip(1).any(|a| a.eq_ignore_ascii_case(b"block"));
    }
    flags & F_BLOCKING != 0 || name.eq_ignore_ascii_case(b"wait") || name.eq_ignore_ascii_case(b"waitaof")
}

/// What a blocking command answers when its timeout passes with nothing to take: a null
/// bulk for the single-element moves (`BLMOVE`, `BRPOPLPUSH`), a null array otherwise.
pub fn timeout_reply(req: &Request, proto: u8) -> Bytes {
    let name = req.arg(0);
    if name.eq_ignore_ascii_case(b"blmove") || name.eq_ignore_ascii_case(b"brpoplpush") {
        resp::null(proto)
    } else {
        null_array(proto)
    }
}

/// A null array in protocol `proto` (an aborted `EXEC`, a timed-out `BLPOP`).
pub fn null_array(proto: u8) -> Bytes {
    Bytes::from_static(if proto >= 3 { b"_\r\n" } else { b"*-1\r\n" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(args: &[&str]) -> Request {
        Request::from_args(args)
    }

    #[test]
    fn blocking_forms() {
        assert!(blocks(&req(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]), 0));
        assert!(!blocks(&req(&["XREAD", "STREAMS", "s", "0"]), 0));
        assert!(blocks(&req(&["wait", "1", "0"]), 0));
        assert!(blocks(&req(&["BLPOP", "l", "0"]), F_BLOCKING));
        assert!(!blocks(&req(&["GET", "k"]), 0));
    }

    #[test]
    fn timeout_replies() {
        assert_eq!(&timeout_reply(&req(&["BLPOP", "l", "1"]), 2)[..], b"*-1\r\n");
        assert_eq!(&timeout_reply(&req(&["brpoplpush", "a", "b", "1"]), 2)[..], b"$-1\r\n");
        assert_eq!(&timeout_reply(&req(&["BZPOPMIN", "z", "1"]), 3)[..], b"_\r\n");
    }
}
