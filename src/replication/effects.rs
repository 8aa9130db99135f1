//! Invariant 3 ("effects, not guesses"): how a client's write is shipped so that every
//! replica ends in the same state. Relative expiry becomes absolute (EXPIRE → PEXPIREAT,
//! SET EX → SET PXAT, RESTORE ttl → ABSTTL) using the sequencer's clock, passed in; SPOP is
//! run on one replica and the others get SREM of what it popped. Pure functions: no I/O, no
//! clock of their own.

use bytes::Bytes;

use super::reply;
use crate::resp::{parse_int, Request};

/// One command as the replicas get it.
#[derive(Debug, Clone)]
pub struct Shipped {
    /// What the replicas run (the source replica runs this one in every case).
    pub req: Request,
    /// Set when the outcome is not a function of the key's state: the other replicas get
    /// what the source replica's reply says happened instead of `req`.
    pub from_reply: Option<FromReply>,
}

/// How the other replicas' command is made from the source replica's reply.
#[derive(Debug, Clone)]
pub enum FromReply {
    /// SPOP: `SREM key <popped members>`.
    Spop { key: Bytes },
    /// XADD with an automatic id (`*`): the same XADD with the id the source chose.
    XaddId { index: usize },
}

impl FromReply {
    /// The command for the other replicas given the source's reply (None: nothing to do).
    pub fn effect(&self, req: &Request, reply: &Bytes) -> Option<Request> {
        match self {
            FromReply::Spop { key } => spop_effect(key, reply),
            FromReply::XaddId { index } => {
                let id = reply::bulk(reply)?;
                let args: Vec<&[u8]> = req.args().enumerate().map(|(i, a)| if i == *index { id } else { a }).collect();
                Some(Request::from_args(&args))
            }
        }
    }
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// `now_ms + n * unit_ms`, when `n` parses and nothing overflows; `None` otherwise (then the
/// command is shipped verbatim and fails or succeeds the same way everywhere).
fn absolute(n: &[u8], unit_ms: i64, now_ms: u64, positive_only: bool) -> Option<Vec<u8>> {
    let n = parse_int(n)?;
    if positive_only && n <= 0 {
        return None;
    }
    let abs = n.checked_mul(unit_ms)?.checked_add(now_ms as i64)?;
    Some(abs.to_string().into_bytes())
}

/// Rewrite `req` (a write) for shipping at time `now_ms` (Unix milliseconds).
pub fn rewrite(req: Request, now_ms: u64) -> Shipped {
    let name = req.arg(0);
    // Hot path: most writes are none of the commands below (and SET without options).
    let candidate = matches!(name.len(), 3..=9)
        && matches!(name[0].to_ascii_lowercase(), b'e' | b'p' | b's' | b'g' | b'r' | b'x')
        && !(eq(name, "set") && req.len() <= 3);
    if !candidate {
        return Shipped { req, from_reply: None };
    }
    let args: Vec<&[u8]> = req.args().collect();
    let rebuilt: Option<Vec<Vec<u8>>> = if eq(name, "expire") || eq(name, "pexpire") {
        let unit = if eq(name, "expire") { 1000 } else { 1 };
        (args.len() >= 3).then(|| absolute(args[2], unit, now_ms, false)).flatten().map(|abs| {
            let mut v = vec![b"PEXPIREAT".to_vec(), args[1].to_vec(), abs];
            v.extend(args[3..].iter().map(|a| a.to_vec()));
            v
        })
    } else if eq(name, "setex") || eq(name, "psetex") {
        let unit = if eq(name, "setex") { 1000 } else { 1 };
        (args.len() == 4)
            .then(|| absolute(args[2], unit, now_ms, true))
            .flatten()
            .map(|abs| vec![b"SET".to_vec(), args[1].to_vec(), args[3].to_vec(), b"PXAT".to_vec(), abs])
    } else if eq(name, "set") && args.len() > 3 {
        relative_option(&args, 3, now_ms)
    } else if eq(name, "getex") && args.len() > 2 {
        relative_option(&args, 2, now_ms)
    } else if eq(name, "restore") && args.len() >= 4 && !args[4..].iter().any(|a| eq(a, "absttl")) {
        match parse_int(args[2]) {
            Some(ttl) if ttl > 0 => absolute(args[2], 1, now_ms, true).map(|abs| {
                let mut v: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
                v[2] = abs;
                v.push(b"ABSTTL".to_vec());
                v
            }),
            _ => None,
        }
    } else {
        None
    };
    let from_reply = if eq(name, "spop") && (args.len() == 2 || args.len() == 3) {
        Some(FromReply::Spop { key: req.arg_bytes(1) })
    } else if eq(name, "xadd") {
        xadd_star(&args).map(|index| FromReply::XaddId { index })
    } else {
        None
    };
    match rebuilt {
        Some(v) => Shipped { req: Request::from_args(&v), from_reply },
        None => Shipped { req, from_reply },
    }
}

/// The index of XADD's `*` id argument, after the key and its options.
fn xadd_star(args: &[&[u8]]) -> Option<usize> {
    let mut i = 2;
    while i < args.len() {
        let a = args[i];
        if eq(a, "nomkstream") {
            i += 1;
        } else if eq(a, "maxlen") || eq(a, "minid") {
            i += 1;
            if i < args.len() && (args[i] == b"=" || args[i] == b"~") {
                i += 1;
            }
            i += 1;
        } else if eq(a, "limit") {
            i += 2;
        } else {
            return (a == b"*").then_some(i);
        }
    }
    None
}

/// SET/GETEX with exactly one `EX n` or `PX n` among the options from `from`: replace it
/// with `PXAT abs`.
fn relative_option(args: &[&[u8]], from: usize, now_ms: u64) -> Option<Vec<Vec<u8>>> {
    let mut found = None;
    let mut i = from;
    while i < args.len() {
        let a = args[i];
        if eq(a, "ex") || eq(a, "px") {
            if found.is_some() || i + 1 >= args.len() {
                return None;
            }
            found = Some(i);
            i += 2;
            continue;
        }
        if eq(a, "exat") || eq(a, "pxat") || eq(a, "keepttl") || eq(a, "persist") {
            return None;
        }
        i += 1;
    }
    let at = found?;
    let unit = if eq(args[at], "ex") { 1000 } else { 1 };
    let abs = absolute(args[at + 1], unit, now_ms, true)?;
    let mut v: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
    v[at] = b"PXAT".to_vec();
    v[at + 1] = abs;
    Some(v)
}

/// What the other replicas run after SPOP on `key` answered `reply` on the source replica:
/// SREM of the popped members, or nothing when nothing was popped (or SPOP failed).
pub fn spop_effect(key: &Bytes, reply: &Bytes) -> Option<Request> {
    let members: Vec<Bytes> = match reply.first() {
        Some(b'$') => vec![Bytes::copy_from_slice(reply::bulk(reply)?)],
        Some(b'*') | Some(b'~') => {
            reply::elements(reply)?.iter().filter_map(|e| reply::bulk(e).map(Bytes::copy_from_slice)).collect()
        }
        _ => return None,
    };
    if members.is_empty() {
        return None;
    }
    let mut v: Vec<&[u8]> = vec![b"SREM", key];
    v.extend(members.iter().map(|m| &m[..]));
    Some(Request::from_args(&v))
}

/// What copies one key (invariant 6): given the source's replies to `DUMP key` and
/// `PTTL key` taken at the same point of the key's stream, the command that makes the
/// target hold the same value and absolute expiry (`now_ms` when the replies arrived).
pub fn copy_effect(key: &[u8], dump: &Bytes, pttl: &Bytes, now_ms: u64) -> Request {
    let ttl = reply::int(pttl).unwrap_or(-1);
    match reply::bulk(dump) {
        // PTTL 0: it expires this very millisecond; treat it as gone.
        Some(payload) if ttl != -2 && ttl != 0 => {
            let at = if ttl > 0 { (now_ms as i64 + ttl).to_string() } else { "0".to_string() };
            let mut v: Vec<&[u8]> = vec![b"RESTORE", key, at.as_bytes(), payload, b"REPLACE"];
            if ttl > 0 {
                v.push(b"ABSTTL");
            }
            Request::from_args(&v)
        }
        _ => Request::from_args(&[b"DEL".as_slice(), key]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(r: &Request) -> Vec<String> {
        r.args().map(|a| String::from_utf8_lossy(a).into_owned()).collect()
    }

    #[test]
    fn relative_expiry_becomes_absolute() {
        let now = 1_000_000;
        let r = |a: &[&str]| args(&rewrite(Request::from_args(a), now).req);
        assert_eq!(r(&["EXPIRE", "k", "10"]), ["PEXPIREAT", "k", "1010000"]);
        assert_eq!(r(&["pexpire", "k", "5", "NX"]), ["PEXPIREAT", "k", "1000005", "NX"]);
        assert_eq!(r(&["SETEX", "k", "2", "v"]), ["SET", "k", "v", "PXAT", "1002000"]);
        assert_eq!(r(&["SETEX", "k", "0", "v"]), ["SETEX", "k", "0", "v"], "invalid: verbatim, same error everywhere");
        assert_eq!(r(&["SET", "k", "v", "NX", "EX", "1", "GET"]), ["SET", "k", "v", "NX", "PXAT", "1001000", "GET"]);
        assert_eq!(r(&["SET", "k", "v", "EX", "1", "PX", "2"]), ["SET", "k", "v", "EX", "1", "PX", "2"]);
        assert_eq!(r(&["GETEX", "k", "PX", "7"]), ["GETEX", "k", "PXAT", "1000007"]);
        assert_eq!(r(&["RESTORE", "k", "50", "x"]), ["RESTORE", "k", "1000050", "x", "ABSTTL"]);
        assert_eq!(r(&["RESTORE", "k", "0", "x", "REPLACE"]), ["RESTORE", "k", "0", "x", "REPLACE"]);
        assert_eq!(r(&["EXPIRE", "k", "notanumber"]), ["EXPIRE", "k", "notanumber"]);
    }

    #[test]
    fn spop_ships_its_effect() {
        let s = rewrite(Request::from_args(&["SPOP", "s", "2"]), 0);
        let Some(FromReply::Spop { key }) = s.from_reply else { panic!("spop") };
        let e = spop_effect(&key, &Bytes::from_static(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n")).unwrap();
        assert_eq!(args(&e), ["SREM", "s", "a", "b"]);
        assert!(spop_effect(&key, &Bytes::from_static(b"$-1\r\n")).is_none());
        assert!(spop_effect(&key, &Bytes::from_static(b"*0\r\n")).is_none());
        assert_eq!(args(&spop_effect(&key, &Bytes::from_static(b"$1\r\nz\r\n")).unwrap()), ["SREM", "s", "z"]);
    }

    #[test]
    fn xadd_auto_id_ships_the_chosen_id() {
        let r = Request::from_args(&["XADD", "st", "MAXLEN", "~", "10", "*", "f", "v"]);
        let s = rewrite(r.clone(), 0);
        let fr = s.from_reply.unwrap();
        let e = fr.effect(&s.req, &Bytes::from_static(b"$3\r\n1-0\r\n")).unwrap();
        assert_eq!(args(&e), ["XADD", "st", "MAXLEN", "~", "10", "1-0", "f", "v"]);
        assert!(rewrite(Request::from_args(&["XADD", "st", "5-1", "f", "v"]), 0).from_reply.is_none());
    }

    #[test]
    fn copy_uses_absolute_ttl_or_deletes() {
        let d = Bytes::from_static(b"$3\r\nabc\r\n");
        assert_eq!(
            args(&copy_effect(b"k", &d, &Bytes::from_static(b":500\r\n"), 1000)),
            ["RESTORE", "k", "1500", "abc", "REPLACE", "ABSTTL"]
        );
        assert_eq!(
            args(&copy_effect(b"k", &d, &Bytes::from_static(b":-1\r\n"), 1000)),
            ["RESTORE", "k", "0", "abc", "REPLACE"]
        );
        assert_eq!(
            args(&copy_effect(b"k", &Bytes::from_static(b"$-1\r\n"), &Bytes::from_static(b":-2\r\n"), 0)),
            ["DEL", "k"]
        );
    }
}
