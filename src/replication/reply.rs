//! Reading the few reply shapes replication needs to look inside: the elements of an array
//! (SPOP's members, EXEC's results, DUMP + PTTL), bulk strings, integers and `INFO` fields. Everything else
//! is passed through as opaque bytes.

use bytes::{Bytes, BytesMut};

use crate::resp::{integer_reply, parse_int, ReplySkimmer};

/// The elements of an aggregate reply (`*`, `~`, `>`; a map's keys and values in turn), or
/// `None` for a null or a non-aggregate.
/// The value of `field` in `INFO` text (`field:value` lines), trimmed.
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).map(str::trim)
}

pub fn elements(reply: &Bytes) -> Option<Vec<Bytes>> {
    let kind = *reply.first()?;
    if !matches!(kind, b'*' | b'~' | b'>' | b'%') {
        return None;
    }
    let eol = memchr::memchr(b'\r', reply)?;
    let n = parse_int(&reply[1..eol])?;
    if n < 0 {
        return None;
    }
    let n = if kind == b'%' { n as usize * 2 } else { n as usize };
    let mut rest = BytesMut::from(&reply[eol + 2..]);
    let mut skim = ReplySkimmer::new();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match skim.next_reply(&mut rest) {
            Ok(Some(e)) => out.push(e),
            _ => return None,
        }
    }
    Some(out)
}

/// The payload of a bulk (or simple/verbatim) string reply; `None` for null or anything else.
pub fn bulk(reply: &[u8]) -> Option<&[u8]> {
    match reply.first()? {
        b'$' | b'=' => {
            let eol = memchr::memchr(b'\r', reply)?;
            let n = parse_int(&reply[1..eol])?;
            if n < 0 {
                return None;
            }
            let start = eol + 2;
            let mut body = reply.get(start..start + n as usize)?;
            if reply[0] == b'=' {
                // Verbatim string: "txt:" prefix.
                body = body.get(4..)?;
            }
            Some(body)
        }
        b'+' => reply.get(1..reply.len().checked_sub(2)?),
        _ => None,
    }
}

/// An integer reply's value.
pub fn int(reply: &[u8]) -> Option<i64> {
    integer_reply(reply)
}

/// True for a null reply of any shape (`$-1`, `*-1`, `_`).
pub fn is_null(reply: &[u8]) -> bool {
    reply.starts_with(b"$-1\r\n") || reply.starts_with(b"*-1\r\n") || reply.starts_with(b"_\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let r = Bytes::from_static(b"*3\r\n$1\r\na\r\n*1\r\n:1\r\n$-1\r\n");
        let e = elements(&r).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(bulk(&e[0]), Some(&b"a"[..]));
        assert_eq!(&e[1][..], b"*1\r\n:1\r\n");
        assert!(is_null(&e[2]));
        assert_eq!(elements(&Bytes::from_static(b"*-1\r\n")), None);
        assert_eq!(elements(&Bytes::from_static(b"~1\r\n+x\r\n")).unwrap().len(), 1);
        assert_eq!(int(b":-2\r\n"), Some(-2));
        assert_eq!(bulk(b"+OK\r\n"), Some(&b"OK"[..]));
    }
}
