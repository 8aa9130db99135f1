//! RESP framing with no I/O: the request parser (RESP multibulk and inline commands, as a
//! client sends them), the reply skimmer (RESP2 and RESP3, as Redis answers) and small
//! encoders for the replies the proxy writes itself.
//!
//! Both parsers are incremental: they keep how far they got, so a 512 MB bulk that arrives in
//! thousands of reads is never rescanned, and they commit only on a whole frame (Pelikan's
//! rule: `Ok(None)` means "incomplete, call again with more bytes"). Frames are cut out of the
//! caller's `BytesMut` with `split_to(..).freeze()`, so arguments and replies are `Bytes`
//! slices of the bytes as read: no copies on the hot path.
//!
//! This module owns byte-level syntax only; what a command means lives in `command`.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

/// Longest inline command or `*`/`$` header line Redis accepts (PROTO_INLINE_MAX_SIZE).
pub const INLINE_MAX: usize = 64 * 1024;
/// Redis's default `proto-max-bulk-len`.
pub const DEFAULT_MAX_BULK: usize = 512 * 1024 * 1024;
/// Redis rejects multibulk counts above this (INT_MAX in 7.0).
pub const MAX_MULTIBULK: i64 = i32::MAX as i64;

/// A malformed request. The `Display` text is exactly what Redis replies (after `-ERR `),
/// and like Redis the proxy closes that client's connection after sending it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// `*` count that is not a number or out of range.
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    /// `$` length that is not a number, negative, or above `proto-max-bulk-len`.
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// Something other than `$` where a bulk string header must be.
    #[error("Protocol error: expected '$', got '{0}'")]
    ExpectedDollar(char),
    /// A `*` header line longer than 64 KiB.
    #[error("Protocol error: too big mbulk count string")]
    TooBigMbulkCount,
    /// A `$` header line longer than 64 KiB.
    #[error("Protocol error: too big bulk count string")]
    TooBigBulkCount,
    /// An inline command longer than 64 KiB.
    #[error("Protocol error: too big inline request")]
    TooBigInline,
    /// More than 10 arguments from a client that has not authenticated yet.
    #[error("Protocol error: unauthenticated multibulk length")]
    UnauthenticatedMultibulkLength,
    /// A bulk over 16 KiB from a client that has not authenticated yet.
    #[error("Protocol error: unauthenticated bulk length")]
    UnauthenticatedBulkLength,
    /// An inline command with a quote that never closes.
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// A reply from Redis that is not valid RESP: the upstream connection cannot be trusted.
    #[error("Protocol error: invalid reply from Redis ({0})")]
    BadReply(&'static str),
}

/// One whole client request: the exact bytes to forward and where each argument lies in them.
#[derive(Debug, Clone)]
pub struct Request {
    /// The request as RESP multibulk (inline commands are re-encoded).
    pub frame: Bytes,
    args: SmallVec<[Range<usize>; 6]>,
}

impl Request {
    /// Build a request from arguments (used for inline commands and by tests).
    pub fn from_args<A: AsRef<[u8]>>(args: &[A]) -> Request {
        let mut out = BytesMut::new();
        let mut ranges = SmallVec::new();
        push_array_header(&mut out, args.len());
        for a in args {
            let a = a.as_ref();
            out.put_u8(b'$');
            push_decimal(&mut out, a.len() as i64);
            out.put_slice(b"\r\n");
            let start = out.len();
            out.put_slice(a);
            ranges.push(start..start + a.len());
            out.put_slice(b"\r\n");
        }
        Request { frame: out.freeze(), args: ranges }
    }

    /// Number of arguments, the command name included.
    pub fn len(&self) -> usize {
        self.args.len()
    }

    /// True for a request with no arguments (never produced by the parser).
    pub fn is_empty(&self) -> bool {
        self.args.is_empty()
    }

    /// Argument `i` (0 = command name).
    pub fn arg(&self, i: usize) -> &[u8] {
        &self.frame[self.args[i].clone()]
    }

    /// Argument `i` as a zero-copy `Bytes`.
    pub fn arg_bytes(&self, i: usize) -> Bytes {
        self.frame.slice(self.args[i].clone())
    }

    /// Iterate over the arguments.
    pub fn args(&self) -> impl Iterator<Item = &[u8]> {
        self.args.iter().map(move |r| &self.frame[r.clone()])
    }
}

/// Incremental parser of client requests.
#[derive(Debug)]
pub struct RequestParser {
    max_bulk: usize,
    /// Until the client authenticates, Redis (6.2.6+) caps requests at 10 arguments and
    /// 16 KiB bulks, so that nobody can make it buffer much without the password.
    unauthenticated: bool,
    /// Multibulk in progress: how many args remain, where we are in the buffer.
    pending: Option<Multibulk>,
}

#[derive(Debug)]
struct Multibulk {
    remaining: usize,
    pos: usize,
    args: SmallVec<[Range<usize>; 6]>,
    /// Length of the bulk whose header was read at `pos` (its data starts at `pos`).
    bulk_len: Option<usize>,
}

impl RequestParser {
    /// A parser rejecting bulk strings longer than `max_bulk` bytes.
    pub fn new(max_bulk: usize) -> RequestParser {
        RequestParser { max_bulk, unauthenticated: false, pending: None }
    }

    /// Apply (or lift) the limits for clients that have not authenticated.
    pub fn set_unauthenticated(&mut self, unauthenticated: bool) {
        self.unauthenticated = unauthenticated;
    }

    /// How many more bytes are known to be needed before the next frame can complete
    /// (lets the caller reserve a big bulk at once instead of growing by doubling).
    pub fn bytes_hint(&self, buffered: usize) -> usize {
        match &self.pending {
            Some(Multibulk { pos, bulk_len: Some(n), .. }) => (pos + n + 2).saturating_sub(buffered),
            _ => 0,
        }
    }

    /// Parse the next request from `buf`, removing it from `buf` on success. `Ok(None)`:
    /// incomplete (or only empty inline lines were consumed); call again with more bytes.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ProtoError> {
        loop {
            if self.pending.is_none() {
                match buf.first() {
                    None => return Ok(None),
                    Some(b'*') => {
                        let Some((line_end, next)) = find_line(buf, 1) else {
                            if buf.len() > INLINE_MAX {
                                return Err(ProtoError::TooBigMbulkCount);
                            }
                            return Ok(None);
                        };
                        let n = parse_int(&buf[1..line_end]).ok_or(ProtoError::InvalidMultibulkLength)?;
                        if n > MAX_MULTIBULK {
                            return Err(ProtoError::InvalidMultibulkLength);
                        }
                        if self.unauthenticated && n > 10 {
                            return Err(ProtoError::UnauthenticatedMultibulkLength);
                        }
                        if n <= 0 {
                            // Redis skips empty multibulks silently.
                            let _ = buf.split_to(next);
                            continue;
                        }
                        self.pending =
                            Some(Multibulk { remaining: n as usize, pos: next, args: SmallVec::new(), bulk_len: None });
                    }
                    Some(_) => match parse_inline(buf)? {
                        Inline::Incomplete => return Ok(None),
                        Inline::Empty => continue,
                        Inline::Request(r) => return Ok(Some(r)),
                    },
                }
            }
            return self.continue_multibulk(buf);
        }
    }

    fn continue_multibulk(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ProtoError> {
        let Some(mb) = self.pending.as_mut() else { return Ok(None) };
        while mb.remaining > 0 {
            let n = match mb.bulk_len {
                Some(n) => n,
                None => {
                    let Some(&first) = buf.get(mb.pos) else { return Ok(None) };
                    if first != b'$' {
                        return Err(ProtoError::ExpectedDollar(first as char));
                    }
                    let Some((line_end, next)) = find_line(buf, mb.pos + 1) else {
                        if buf.len() - mb.pos > INLINE_MAX {
                            return Err(ProtoError::TooBigBulkCount);
                        }
                        return Ok(None);
                    };
                    let n = parse_int(&buf[mb.pos + 1..line_end]).ok_or(ProtoError::InvalidBulkLength)?;
                    if self.unauthenticated && n > 16384 {
                        return Err(ProtoError::UnauthenticatedBulkLength);
                    }
                    if n < 0 || n as u64 > self.max_bulk as u64 {
                        return Err(ProtoError::InvalidBulkLength);
                    }
                    mb.pos = next;
                    mb.bulk_len = Some(n as usize);
                    n as usize
                }
            };
            if buf.len() < mb.pos + n + 2 {
                return Ok(None);
            }
            // Redis does not check the CRLF after a bulk; neither do we (it is skipped).
            mb.args.push(mb.pos..mb.pos + n);
            mb.pos += n + 2;
            mb.bulk_len = None;
            mb.remaining -= 1;
        }
        let Some(mb) = self.pending.take() else { return Ok(None) };
        let frame = buf.split_to(mb.pos).freeze();
        Ok(Some(Request { frame, args: mb.args }))
    }
}

enum Inline {
    Incomplete,
    Empty,
    Request(Request),
}

fn parse_inline(buf: &mut BytesMut) -> Result<Inline, ProtoError> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        if buf.len() > INLINE_MAX {
            return Err(ProtoError::TooBigInline);
        }
        return Ok(Inline::Incomplete);
    };
    if nl > INLINE_MAX {
        return Err(ProtoError::TooBigInline);
    }
    let line = buf.split_to(nl + 1);
    let mut text = &line[..nl];
    if text.last() == Some(&b'\r') {
        text = &text[..text.len() - 1];
    }
    let args = split_args(text).ok_or(ProtoError::UnbalancedQuotes)?;
    if args.is_empty() {
        return Ok(Inline::Empty);
    }
    Ok(Inline::Request(Request::from_args(&args)))
}

/// Split an inline command line as Redis's `sdssplitargs` does: whitespace separated,
/// "double quotes" with \n \r \t \b \a \\ \" \xHH escapes, 'single quotes' with \' only.
/// `None` for unbalanced quotes (or a closing quote not followed by a space).
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && is_space(line[i]) {
            i += 1;
        }
        if i >= n {
            return Some(out);
        }
        let mut cur = Vec::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            if in_dq {
                if i >= n {
                    return None;
                }
                if line[i] == b'\\' && i + 3 < n && line[i + 1] == b'x' && is_hex(line[i + 2]) && is_hex(line[i + 3]) {
                    cur.push(hex_val(line[i + 2]) * 16 + hex_val(line[i + 3]));
                    i += 3;
                } else if line[i] == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        c => c,
                    });
                } else if line[i] == b'"' {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return None;
                    }
                    in_dq = false;
                    i += 1;
                    break;
                } else {
                    cur.push(line[i]);
                }
            } else if in_sq {
                if i >= n {
                    return None;
                }
                if line[i] == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if line[i] == b'\'' {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return None;
                    }
                    in_sq = false;
                    i += 1;
                    break;
                } else {
                    cur.push(line[i]);
                }
            } else {
                if i >= n {
                    break;
                }
                match line[i] {
                    c if is_space(c) => break,
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        let _ = (in_dq, in_sq);
        out.push(cur);
    }
}

/// `isspace()` in the C locale, as sdssplitargs uses.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn is_hex(c: u8) -> bool {
    c.is_ascii_hexdigit()
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Find the CRLF-terminated line starting at `from`: (index of '\r', index after '\n').
#[inline]
fn find_line(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let rel = memchr::memchr(b'\r', buf.get(from..)?)?;
    let cr = from + rel;
    if cr + 1 < buf.len() {
        Some((cr, cr + 2))
    } else {
        None
    }
}

/// Parse a signed decimal as Redis's `string2ll` does (no spaces, no '+', no leading zeros
/// beyond "0").
pub fn parse_int(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let (neg, digits) = if s[0] == b'-' { (true, &s[1..]) } else { (false, s) };
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?;
        v = if neg { v.checked_sub((c - b'0') as i64)? } else { v.checked_add((c - b'0') as i64)? };
    }
    Some(v)
}

/// Incremental skimmer of Redis replies (RESP2 and RESP3): finds where each reply ends
/// without building it.
#[derive(Debug, Default)]
pub struct ReplySkimmer {
    /// Bytes of the current reply already walked.
    pos: usize,
    /// Elements still expected at each open aggregate level; `true` marks an attribute,
    /// whose completion does not count as an element of its parent.
    stack: SmallVec<[(u64, bool); 8]>,
    /// Length of a bulk whose header ended at `pos`.
    bulk_len: Option<usize>,
}

impl ReplySkimmer {
    /// A skimmer at the start of a reply.
    pub fn new() -> ReplySkimmer {
        ReplySkimmer::default()
    }

    /// Bytes known to be still missing for the current reply (big bulk replies).
    pub fn bytes_hint(&self, buffered: usize) -> usize {
        match self.bulk_len {
            Some(n) => (self.pos + n + 2).saturating_sub(buffered),
            None => 0,
        }
    }

    /// Cut the next whole reply out of `buf`. `Ok(None)`: incomplete.
    pub fn next_reply(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, ProtoError> {
        match self.skim(buf)? {
            Some(len) => Ok(Some(buf.split_to(len).freeze())),
            None => Ok(None),
        }
    }

    /// Length of the next whole reply at the start of `buf`, if complete. After `Some`,
    /// the caller must remove that many bytes before calling again.
    pub fn skim(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtoError> {
        loop {
            if let Some(n) = self.bulk_len {
                if buf.len() < self.pos + n + 2 {
                    return Ok(None);
                }
                self.pos += n + 2;
                self.bulk_len = None;
                if let Some(done) = self.element_done() {
                    return Ok(Some(done));
                }
                continue;
            }
            let Some(&ty) = buf.get(self.pos) else { return Ok(None) };
            let Some((cr, next)) = find_line(buf, self.pos + 1) else { return Ok(None) };
            let line = &buf[self.pos + 1..cr];
            match ty {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    self.pos = next;
                    if let Some(done) = self.element_done() {
                        return Ok(Some(done));
                    }
                }
                b'$' | b'!' | b'=' => {
                    let n = parse_int(line).ok_or(ProtoError::BadReply("bulk length"))?;
                    self.pos = next;
                    if n < 0 {
                        if let Some(done) = self.element_done() {
                            return Ok(Some(done));
                        }
                    } else {
                        self.bulk_len = Some(n as usize);
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = parse_int(line).ok_or(ProtoError::BadReply("aggregate length"))?;
                    self.pos = next;
                    if n <= 0 {
                        if ty == b'|' {
                            continue;
                        }
                        if let Some(done) = self.element_done() {
                            return Ok(Some(done));
                        }
                    } else {
                        let count = if ty == b'%' || ty == b'|' { (n as u64).saturating_mul(2) } else { n as u64 };
                        self.stack.push((count, ty == b'|'));
                    }
                }
                _ => return Err(ProtoError::BadReply("unknown type byte")),
            }
        }
    }

    /// One element finished at `self.pos`; returns the reply length when the whole reply is.
    fn element_done(&mut self) -> Option<usize> {
        loop {
            match self.stack.last_mut() {
                None => {
                    let len = self.pos;
                    self.pos = 0;
                    return Some(len);
                }
                Some((remaining, is_attr)) => {
                    *remaining -= 1;
                    if *remaining > 0 {
                        return None;
                    }
                    let was_attr = *is_attr;
                    self.stack.pop();
                    if was_attr {
                        // An attribute is followed by the value it annotates.
                        return None;
                    }
                }
            }
        }
    }
}

/// Append the decimal form of `v`, without allocating (i64::MIN needs all 20 bytes).
fn push_decimal(out: &mut BytesMut, v: i64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut u = v.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    out.put_slice(&buf[i..]);
}

/// Append `*n\r\n`.
pub fn push_array_header(out: &mut BytesMut, n: usize) {
    out.put_u8(b'*');
    push_decimal(out, n as i64);
    out.put_slice(b"\r\n");
}

/// Append a bulk string.
pub fn push_bulk(out: &mut BytesMut, s: &[u8]) {
    out.put_u8(b'$');
    push_decimal(out, s.len() as i64);
    out.put_slice(b"\r\n");
    out.put_slice(s);
    out.put_slice(b"\r\n");
}

/// Append an integer reply.
pub fn push_int(out: &mut BytesMut, v: i64) {
    out.put_u8(b':');
    push_decimal(out, v);
    out.put_slice(b"\r\n");
}

/// An error reply. `msg` starts with its code (`ERR ...`, `NOAUTH ...`); CR/LF are replaced
/// by spaces as Redis does.
pub fn error(msg: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(msg.len() + 3);
    out.put_u8(b'-');
    for b in msg.bytes() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// A simple string reply.
pub fn simple(msg: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(msg.len() + 3);
    out.put_u8(b'+');
    out.put_slice(msg.as_bytes());
    out.put_slice(b"\r\n");
    out.freeze()
}

/// A bulk string reply.
pub fn bulk(s: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(s.len() + 16);
    push_bulk(&mut out, s);
    out.freeze()
}

/// An integer reply.
pub fn int(v: i64) -> Bytes {
    let mut out = BytesMut::with_capacity(24);
    push_int(&mut out, v);
    out.freeze()
}

/// The null bulk string in the client's protocol (`$-1` for RESP2, `_` for RESP3).
pub fn null(proto: u8) -> Bytes {
    Bytes::from_static(if proto >= 3 { b"_\r\n" } else { b"$-1\r\n" })
}

/// The value of an integer reply (`:<n>\r\n`), if that is what `reply` is.
pub fn integer_reply(reply: &[u8]) -> Option<i64> {
    parse_int(reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?)
}

/// True when a reply is an error (`-...` or RESP3 `!...` blob error).
pub fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-') | Some(b'!'))
}

/// Frames larger than this join a [`WriteBatch`] as their own buffer (shared, not copied).
pub const BATCH_COPY_LIMIT: usize = 16 * 1024;

/// Frames gathered for one write to a socket: small frames are copied into one buffer, a
/// frame larger than [`BATCH_COPY_LIMIT`] is kept as its own `Bytes` (a reference count,
/// not a copy), so a batch holding a 100 MB value costs no 100 MB copy.
#[derive(Debug, Default)]
pub struct WriteBatch {
    chunks: std::collections::VecDeque<Bytes>,
    current: BytesMut,
    len: usize,
}

impl WriteBatch {
    /// Add a frame (shared when large).
    pub fn push(&mut self, frame: &Bytes) {
        if frame.len() > BATCH_COPY_LIMIT {
            self.seal();
            self.chunks.push_back(frame.clone());
        } else {
            self.current.extend_from_slice(frame);
        }
        self.len += frame.len();
    }

    /// Add bytes that are not a `Bytes` of their own (always copied).
    pub fn push_slice(&mut self, bytes: &[u8]) {
        self.current.extend_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Bytes gathered.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drop everything gathered.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.current.clear();
        self.len = 0;
    }

    /// Everything gathered, as buffers to write in order; the batch is empty after.
    pub fn take(&mut self) -> std::collections::VecDeque<Bytes> {
        self.seal();
        self.len = 0;
        std::mem::take(&mut self.chunks)
    }

    fn seal(&mut self) {
        if !self.current.is_empty() {
            self.chunks.push_back(self.current.split().freeze());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtoError> {
        let mut p = RequestParser::new(DEFAULT_MAX_BULK);
        let mut buf = BytesMut::from(input);
        let mut out = vec![];
        while let Some(r) = p.parse(&mut buf)? {
            out.push(r.args().map(|a| a.to_vec()).collect());
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_inline() {
        let got = parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\nPING\r\n\r\nset k \"a b\\x41\"\r\n").unwrap();
        assert_eq!(
            got,
            vec![
                vec![b"GET".to_vec(), b"a".to_vec()],
                vec![b"PING".to_vec()],
                vec![b"set".to_vec(), b"k".to_vec(), b"a bA".to_vec()]
            ]
        );
    }

    #[test]
    fn protocol_errors_match_redis() {
        assert_eq!(parse_all(b"*x\r\n").unwrap_err().to_string(), "Protocol error: invalid multibulk length");
        assert_eq!(parse_all(b"*1\r\n+x\r\n").unwrap_err().to_string(), "Protocol error: expected '$', got '+'");
        assert_eq!(parse_all(b"*1\r\n$-5\r\n").unwrap_err().to_string(), "Protocol error: invalid bulk length");
        assert_eq!(parse_all(b"set \"a\r\n").unwrap_err().to_string(), "Protocol error: unbalanced quotes in request");
        let long = vec![b'a'; INLINE_MAX + 10];
        assert_eq!(parse_all(&long).unwrap_err(), ProtoError::TooBigInline);
    }

    #[test]
    fn unauthenticated_limits_like_redis() {
        let mut p = RequestParser::new(DEFAULT_MAX_BULK);
        p.set_unauthenticated(true);
        let mut big = BytesMut::from(&b"*11\r\n"[..]);
        assert_eq!(p.parse(&mut big).unwrap_err(), ProtoError::UnauthenticatedMultibulkLength);
        let mut p = RequestParser::new(DEFAULT_MAX_BULK);
        p.set_unauthenticated(true);
        let mut big = BytesMut::from(&b"*2\r\n$4\r\nAUTH\r\n$16385\r\n"[..]);
        assert_eq!(p.parse(&mut big).unwrap_err(), ProtoError::UnauthenticatedBulkLength);
        p.set_unauthenticated(false);
        let mut ok = BytesMut::from(&b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"[..]);
        assert!(p.parse(&mut ok).unwrap().is_some());
    }

    #[test]
    fn integers_encode_like_redis() {
        for v in [0, 7, -1, 1234567890, i64::MAX, i64::MIN] {
            assert_eq!(&int(v)[..], format!(":{v}\r\n").as_bytes());
        }
    }

    #[test]
    fn replies_resp2_resp3() {
        let input: &[u8] = b"+OK\r\n$5\r\nhello\r\n*2\r\n:1\r\n*1\r\n$-1\r\n%1\r\n+a\r\n~2\r\n,1.5\r\n#t\r\n|1\r\n+ttl\r\n:3\r\n+v\r\n>2\r\n+x\r\n_\r\n*0\r\n";
        let mut buf = BytesMut::from(input);
        let mut s = ReplySkimmer::new();
        let mut frames = vec![];
        while let Some(f) = s.next_reply(&mut buf).unwrap() {
            frames.push(f);
        }
        assert_eq!(frames.len(), 7);
        assert_eq!(&frames[3][..], b"%1\r\n+a\r\n~2\r\n,1.5\r\n#t\r\n");
        assert_eq!(&frames[4][..], b"|1\r\n+ttl\r\n:3\r\n+v\r\n");
        assert!(buf.is_empty());
    }

    #[test]
    fn a_write_batch_copies_small_frames_and_shares_large_ones() {
        let mut b = WriteBatch::default();
        let big = Bytes::from(vec![b'x'; BATCH_COPY_LIMIT + 1]);
        b.push(&Bytes::from_static(b"+a\r\n"));
        b.push_slice(b"+b\r\n");
        b.push(&big);
        b.push(&Bytes::from_static(b"+c\r\n"));
        assert_eq!(b.len(), 12 + big.len());
        let chunks = b.take();
        assert!(b.is_empty());
        assert_eq!(chunks.len(), 3);
        assert_eq!(&chunks[0][..], b"+a\r\n+b\r\n");
        assert_eq!(chunks[1].as_ptr(), big.as_ptr(), "the large frame is shared, not copied");
        assert_eq!(&chunks[2][..], b"+c\r\n");
    }
}
