//! One connection type for every link the shell opens or accepts: plaintext TCP or TLS over
//! TCP (rustls), read and written through monoio's owned-buffer traits on both io drivers.
//! A connection splits into a reader and a writer that two tasks of one core drive at once;
//! the TLS halves share the rustls session (never borrowed across an await).
//!
//! Owns handshakes and record framing only; what travels is the callers' business.

use std::cell::RefCell;
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use monoio::BufResult;

use crate::tls::{ClientTls, ServerTls};

/// Ciphertext read per system call (a TLS record is at most 16 KiB plus overhead).
const CIPHER_READ: usize = 32 * 1024;

/// Plaintext encrypted before its records go to the socket; also the most the writer's
/// record buffer keeps between writes.
const WRITE_CHUNK: usize = 256 * 1024;

/// How long the other side of an accepted connection has to finish its TLS handshake.
pub(crate) const TLS_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected link, before it is split.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(TlsReader, TlsWriter),
}

/// The reading half of a [`Conn`].
pub(crate) enum ConnReader {
    Plain(OwnedReadHalf<TcpStream>),
    Tls(TlsReader),
}

/// The writing half of a [`Conn`].
pub(crate) enum ConnWriter {
    Plain(OwnedWriteHalf<TcpStream>),
    Tls(TlsWriter),
}

impl Conn {
    /// Connect to `addr` within `timeout_ms`, with TLS when `tls` is given (`host`: the name
    /// or address the certificate is checked against, see `ClientTls::server_name`).
    /// Nagle is off. The error says what failed (connect, timeout, handshake).
    pub(crate) async fn connect(
        addr: SocketAddr,
        timeout_ms: u64,
        tls: Option<(&ClientTls, &str)>,
    ) -> Result<Conn, String> {
        let timeout = Duration::from_millis(timeout_ms);
        let work = async {
            let tcp = TcpStream::connect_addr(addr).await.map_err(|e| format!("connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            match tls {
                None => Ok(Conn::Plain(tcp)),
                Some((tls, host)) => {
                    let name = tls.server_name(host).map_err(|e| e.to_string())?;
                    let session = rustls::ClientConnection::new(tls.current(Instant::now()), name)
                        .map_err(|e| format!("TLS: {e}"))?;
                    Conn::handshake(tcp, rustls::Connection::Client(session))
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))
                }
            }
        };
        match monoio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("connect timed out after {timeout_ms} ms")),
        }
    }

    /// Accept `tcp` as this link's TLS server side within `timeout`.
    pub(crate) async fn accept_tls(tcp: TcpStream, tls: &ServerTls, timeout: Duration) -> Result<Conn, String> {
        let _ = tcp.set_nodelay(true);
        let session = rustls::ServerConnection::new(tls.current(Instant::now())).map_err(|e| format!("TLS: {e}"))?;
        match monoio::time::timeout(timeout, Conn::handshake(tcp, rustls::Connection::Server(session))).await {
            Ok(r) => r.map_err(|e| format!("TLS handshake: {e}")),
            Err(_) => Err(format!("no TLS handshake within {} ms", timeout.as_millis())),
        }
    }

    /// Accept `tcp` as plaintext, or as TLS when `tls` is given.
    pub(crate) async fn accept(tcp: TcpStream, tls: Option<&ServerTls>, timeout: Duration) -> Result<Conn, String> {
        match tls {
            Some(tls) => Conn::accept_tls(tcp, tls, timeout).await,
            None => {
                let _ = tcp.set_nodelay(true);
                Ok(Conn::Plain(tcp))
            }
        }
    }

    async fn handshake(mut tcp: TcpStream, mut tls: rustls::Connection) -> io::Result<Conn> {
        // Whole replies are queued; the writer never needs a partial write.
        tls.set_buffer_limit(None);
        let mut cipher: Vec<u8> = Vec::with_capacity(CIPHER_READ);
        // `cipher[pos..]`: read from the socket, not yet given to rustls.
        let mut pos = 0;
        loop {
            if tls.wants_write() {
                let mut out = Vec::new();
                while tls.wants_write() {
                    tls.write_tls(&mut out)?;
                }
                let (res, _) = tcp.write_all(out).await;
                res?;
            }
            if !tls.is_handshaking() {
                break;
            }
            if pos >= cipher.len() {
                cipher.clear();
                pos = 0;
                let (res, buf) = tcp.read(cipher).await;
                cipher = buf;
                if res? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other side closed the connection"));
                }
            }
            // One record batch at a time, re-checking the state between them: what follows
            // the last handshake message (a client's first request) is the reader's to take,
            // and once the other side closed, rustls takes nothing more.
            let mut rd = &cipher[pos..];
            let taken = tls.read_tls(&mut rd)?;
            pos = cipher.len() - rd.len();
            if taken == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other side closed during the handshake"));
            }
            if let Err(e) = tls.process_new_packets() {
                // Tell the other side why (the alert rustls queued), then give up.
                let mut out = Vec::new();
                let _ = tls.write_tls(&mut out);
                let _ = tcp.write_all(out).await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        let (rd, wr) = tcp.into_split();
        let session = Rc::new(RefCell::new(tls));
        Ok(Conn::Tls(
            TlsReader { tcp: rd, tls: session.clone(), cipher, pos, eof: false, busy: false },
            TlsWriter { tcp: wr, tls: session, out: Vec::new(), busy: false },
        ))
    }

    /// Reader and writer, for two tasks.
    pub(crate) fn into_split(self) -> (ConnReader, ConnWriter) {
        match self {
            Conn::Plain(tcp) => {
                let (r, w) = tcp.into_split();
                (ConnReader::Plain(r), ConnWriter::Plain(w))
            }
            Conn::Tls(r, w) => (ConnReader::Tls(r), ConnWriter::Tls(w)),
        }
    }
}

/// The reading side of a TLS connection: ciphertext from the socket, plaintext out.
pub(crate) struct TlsReader {
    tcp: OwnedReadHalf<TcpStream>,
    tls: Rc<RefCell<rustls::Connection>>,
    /// Ciphertext read but not yet handed to rustls (`pos..`).
    cipher: Vec<u8>,
    pos: usize,
    eof: bool,
    /// A socket read is in flight. Still set when a read begins: an earlier read future
    /// was dropped mid-flight and took ciphertext with it, so the stream cannot continue.
    busy: bool,
}

fn cancelled_earlier() -> io::Error {
    io::Error::other("TLS connection unusable: an earlier read or write on it was cancelled")
}

impl TlsReader {
    /// Copy plaintext into `dst` (at most `cap` bytes); `Ok(0)` = end of stream.
    async fn read_into(&mut self, dst: *mut u8, cap: usize) -> io::Result<usize> {
        if cap == 0 {
            return Ok(0);
        }
        if self.busy {
            return Err(cancelled_earlier());
        }
        loop {
            {
                let mut tls = self.tls.borrow_mut();
                let mut reader = tls.reader();
                match reader.fill_buf() {
                    Ok([]) => return Ok(0),
                    Ok(avail) => {
                        let n = avail.len().min(cap);
                        // SAFETY: `dst` is the caller's buffer with `cap` writable bytes,
                        // owned by the read future for its whole life.
                        unsafe { std::ptr::copy_nonoverlapping(avail.as_ptr(), dst, n) };
                        reader.consume(n);
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The socket closed without close_notify: for RESP (self-delimiting)
                    // the same as a close.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if self.pos < self.cipher.len() || self.eof {
                    let mut rd = &self.cipher[self.pos..];
                    let before = rd.len();
                    tls.read_tls(&mut rd)?;
                    self.pos += before - rd.len();
                    tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if self.eof && self.pos >= self.cipher.len() {
                        // rustls has seen the end: the next fill_buf says how it ended.
                        let mut tail = tls.reader();
                        return match tail.fill_buf() {
                            Ok(avail) if !avail.is_empty() => {
                                let n = avail.len().min(cap);
                                // SAFETY: as above.
                                unsafe { std::ptr::copy_nonoverlapping(avail.as_ptr(), dst, n) };
                                tail.consume(n);
                                Ok(n)
                            }
                            _ => Ok(0),
                        };
                    }
                    continue;
                }
            }
            let mut buf = std::mem::take(&mut self.cipher);
            buf.clear();
            self.pos = 0;
            self.busy = true;
            let (res, buf) = self.tcp.read(buf).await;
            self.busy = false;
            self.cipher = buf;
            if res? == 0 {
                self.eof = true;
            }
        }
    }
}

impl AsyncReadRent for TlsReader {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        let (dst, cap) = (buf.write_ptr(), buf.bytes_total());
        match self.read_into(dst, cap).await {
            Ok(n) => {
                // SAFETY: `n` bytes were just written at the start of the buffer.
                unsafe { buf.set_init(n) };
                (Ok(n), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // Fills the first non-empty slice (nothing in the shell reads vectored).
        let (ptr, len) = (buf.write_iovec_ptr(), buf.write_iovec_len());
        // SAFETY: IoVecBufMut promises `len` valid iovecs at `ptr`.
        let first = unsafe { std::slice::from_raw_parts(ptr, len) }.iter().find(|v| v.iov_len > 0).copied();
        let Some(v) = first else { return (Ok(0), buf) };
        match self.read_into(v.iov_base as *mut u8, v.iov_len).await {
            Ok(n) => {
                // SAFETY: `n` bytes were written into the first non-empty slice.
                unsafe { buf.set_init(n) };
                (Ok(n), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }
}

/// The writing side of a TLS connection: plaintext in, records out.
pub(crate) struct TlsWriter {
    tcp: OwnedWriteHalf<TcpStream>,
    tls: Rc<RefCell<rustls::Connection>>,
    /// Records waiting for the socket (reused between writes, kept at most
    /// [`WRITE_CHUNK`] large between them).
    out: Vec<u8>,
    /// A socket write is in flight (see `TlsReader::busy`).
    busy: bool,
}

impl TlsWriter {
    /// Encrypt `data` (whole) and send every record rustls has queued, [`WRITE_CHUNK`]
    /// bytes of plaintext at a time (a huge reply is never held twice in memory at once).
    async fn send(&mut self, data: &[&[u8]]) -> io::Result<()> {
        if self.busy {
            return Err(cancelled_earlier());
        }
        for d in data {
            for chunk in d.chunks(WRITE_CHUNK) {
                {
                    let mut tls = self.tls.borrow_mut();
                    // Several small parts share records; a chunk ends them.
                    tls.writer().write_all(chunk)?;
                    while tls.wants_write() {
                        tls.write_tls(&mut self.out)?;
                    }
                }
                if self.out.len() >= WRITE_CHUNK {
                    self.flush_records().await?;
                }
            }
        }
        self.flush_records().await
    }

    async fn flush_records(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            // Records the reader's side queued (a key update's answer) leave with the next write.
            let mut tls = self.tls.borrow_mut();
            while tls.wants_write() {
                tls.write_tls(&mut self.out)?;
            }
        }
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        self.busy = true;
        let (res, mut out) = self.tcp.write_all(out).await;
        self.busy = false;
        out.clear();
        out.shrink_to(WRITE_CHUNK);
        self.out = out;
        res.map(|_| ())
    }
}

impl AsyncWriteRent for TlsWriter {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: IoBuf promises `bytes_init` readable bytes at `read_ptr`.
        let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let n = data.len();
        match self.send(&[data]).await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: IoVecBuf promises `read_iovec_len` valid iovecs at `read_iovec_ptr`.
        let vecs = unsafe { std::slice::from_raw_parts(buf.read_iovec_ptr(), buf.read_iovec_len()) };
        // SAFETY: each iovec names readable memory the buffer owns.
        let parts: Vec<&[u8]> =
            vecs.iter().map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }).collect();
        let n = parts.iter().map(|p| p.len()).sum();
        match self.send(&parts).await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.flush_records().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.tls.borrow_mut().send_close_notify();
        let _ = self.flush_records().await;
        self.tcp.shutdown().await
    }
}

impl AsyncReadRent for ConnReader {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            ConnReader::Plain(r) => r.read(buf).await,
            ConnReader::Tls(r) => r.read(buf).await,
        }
    }
    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            ConnReader::Plain(r) => r.readv(buf).await,
            ConnReader::Tls(r) => r.readv(buf).await,
        }
    }
}

impl AsyncReadRent for Conn {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(r, _) => r.read(buf).await,
        }
    }
    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.readv(buf).await,
            Conn::Tls(r, _) => r.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for ConnWriter {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            ConnWriter::Plain(w) => w.write(buf).await,
            ConnWriter::Tls(w) => w.write(buf).await,
        }
    }
    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            ConnWriter::Plain(w) => w.writev(buf).await,
            ConnWriter::Tls(w) => w.writev(buf).await,
        }
    }
    async fn flush(&mut self) -> io::Result<()> {
        match self {
            ConnWriter::Plain(w) => w.flush().await,
            ConnWriter::Tls(w) => w.flush().await,
        }
    }
    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            ConnWriter::Plain(w) => w.shutdown().await,
            ConnWriter::Tls(w) => w.shutdown().await,
        }
    }
}

impl AsyncWriteRent for Conn {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.write(buf).await,
            Conn::Tls(_, w) => w.write(buf).await,
        }
    }
    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.writev(buf).await,
            Conn::Tls(_, w) => w.writev(buf).await,
        }
    }
    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush().await,
            Conn::Tls(_, w) => w.flush().await,
        }
    }
    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(_, w) => w.shutdown().await,
        }
    }
}
