//! The peer link between sidecars: pipelined RESP over TCP, authenticated with the shared
//! secret. Every request carries a tag and every reply comes back as `*2 :tag <reply>`, so
//! the writer may answer forwarded writes in any order (a blocked pop must not hold up the
//! writes behind it).
//!
//! Requests (after the `peer_auth` handshake, `RS.HELLO` then `RS.PROVE`):
//! - `RS.HB tag <report>`: heartbeat; the reply is the receiver's own report.
//! - `RS.FWD tag db proto client frame`: run a client's request at the writer.
//! - `RS.HANDOVER tag`: the caller (higher priority, in sync) asks for the writer role.
//! - `RS.GONE tag client`: a forwarding client disconnected (drop its WATCH, blocked pops).
//! - `RS.YIELD tag epoch db key db key ...`: a writer that lost a partition yields, naming
//!   the keys it wrote while cut off.
//!
//! This module moves bytes; what the requests mean is its [`PeerHandler`]'s business (mirror
//! mode's replication shell, `replica::Repl`, which this module does not name).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpListener;
use tracing::{debug, info, warn};

use super::conn::{Conn, ConnReader, ConnWriter};
use super::io::read_more;
use super::sink::{Held, ReplyTarget, Sink};
use super::Signal;
use crate::replication::writer_request::WriterRequest;
use crate::resp::{self, ReplySkimmer, Request, RequestParser};

/// What `link_reply` gets for a forwarded request the other side refused because it is not
/// the writer (sent as `*1 :tag`, outside any reply a command could produce).
pub(crate) const NOT_WRITER: &[u8] = b"\0not-writer";

/// Largest request accepted on the peer link (a forwarded frame carries a client's bulk).
const PEER_MAX_BULK: usize = 4 << 30;

fn tagged(tag: u64, reply: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(reply.len() + 24);
    out.extend_from_slice(b"*2\r\n");
    resp::push_int(&mut out, tag as i64);
    out.extend_from_slice(reply);
    out
}

/// Split `*2 :tag <reply>` (or `*1 :tag`: not the writer).
fn untag(frame: &Bytes) -> Option<(u64, Bytes)> {
    if let Some(rest) = frame.strip_prefix(b"*1\r\n:") {
        let eol = memchr::memchr(b'\r', rest)?;
        return Some((resp::parse_int(&rest[..eol])? as u64, Bytes::from_static(NOT_WRITER)));
    }
    let rest = frame.strip_prefix(b"*2\r\n:")?;
    let eol = memchr::memchr(b'\r', rest)?;
    let tag = resp::parse_int(&rest[..eol])? as u64;
    let start = 5 + eol + 2;
    Some((tag, frame.slice(start..)))
}

/// A connection another sidecar opened to us (we serve its requests).
pub(crate) struct PeerConn {
    out: RefCell<BytesMut>,
    wake: Signal,
    dead: Cell<bool>,
    pub node: RefCell<String>,
}

impl PeerConn {
    /// Tell the forwarder this node is not the writer (it routes the request again).
    pub fn reply_not_writer(&self, tag: u64) {
        if self.dead.get() {
            return;
        }
        let mut out = self.out.borrow_mut();
        out.extend_from_slice(b"*1\r\n");
        resp::push_int(&mut out, tag as i64);
        drop(out);
        self.wake.notify();
    }

    /// Queue the reply to request `tag`.
    pub fn reply(&self, tag: u64, reply: &[u8]) {
        if self.dead.get() {
            return;
        }
        self.out.borrow_mut().extend_from_slice(&tagged(tag, reply));
        self.wake.notify();
    }
}

/// What the peer link hands decoded requests and link events to.
pub(crate) trait PeerHandler: 'static {
    /// This node's id, for the handshake.
    fn node_id(&self) -> &str;
    /// The pair's shared secret, for the handshake.
    fn secret(&self) -> &str;
    /// The heartbeat interval (reconnect pacing and connect timeout derive from it).
    fn heartbeat_ms(&self) -> u64;
    /// The TLS of the peer link, when `[replication.tls]` is set: accepting and connecting.
    fn tls(&self) -> (Option<&crate::tls::ServerTls>, Option<&crate::tls::ClientTls>);
    /// A peer's heartbeat report (`RS.HB`).
    fn heard(&self, report: &str);
    /// This node's report, the answer to a heartbeat.
    fn report_text(&self) -> String;
    /// A request a peer forwarded to this node as the writer (`RS.FWD`).
    fn submit_forwarded(&self, h: Held);
    /// A peer asks this node to hand the writer role over (`RS.HANDOVER`): answer `tag` on
    /// `conn` when done.
    fn handover_requested(this: &Rc<Self>, conn: Rc<PeerConn>, tag: u64);
    /// A peer's client went away (`RS.GONE`).
    fn client_key_gone(&self, key: u64);
    /// A peer yields the writer role (`RS.YIELD`), with the keys it wrote while cut off.
    fn yield_received(&self, from: &str, epoch: u64, keys: Option<Vec<(u32, Bytes)>>) -> Bytes;
    /// The answer to something this node sent on `link`.
    fn link_reply(&self, link: &PeerLink, wait: LinkWait, reply: Bytes);
    /// Something this node sent on `link` will get no answer (the link broke).
    fn link_failed(&self, link: &PeerLink, wait: LinkWait);
}

impl ReplyTarget for PeerConn {
    fn deliver(&self, tag: u64, reply: Bytes) {
        self.reply(tag, &reply)
    }

    fn not_writer(&self, tag: u64) {
        self.reply_not_writer(tag)
    }
}

/// Accept peers on `peer_listen`.
pub(crate) async fn serve<R: PeerHandler>(repl: Rc<R>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let repl = repl.clone();
                monoio::spawn(async move {
                    match Conn::accept(stream, repl.tls().0, super::conn::TLS_ACCEPT_TIMEOUT).await {
                        Ok(conn) => serve_conn(repl, conn, addr.to_string()).await,
                        Err(e) => warn!(from = %addr, "peer link refused: {e}"),
                    }
                });
            }
            Err(e) => {
                warn!("peer accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn<R: PeerHandler>(repl: Rc<R>, stream: Conn, addr: String) {
    let conn = Rc::new(PeerConn {
        out: RefCell::new(BytesMut::new()),
        wake: Signal::default(),
        dead: Cell::new(false),
        node: RefCell::new(String::new()),
    });
    let (mut rd, mut wr) = stream.into_split();
    let writer = {
        let conn = conn.clone();
        async move {
            loop {
                let chunk = std::mem::take(&mut *conn.out.borrow_mut());
                if chunk.is_empty() {
                    if conn.dead.get() {
                        return;
                    }
                    conn.wake.wait().await;
                    continue;
                }
                if wr.write_all(chunk.freeze()).await.0.is_err() {
                    conn.dead.set(true);
                    return;
                }
            }
        }
    };
    let writer = monoio::spawn(writer);
    let mut parser = RequestParser::new(PEER_MAX_BULK);
    // Redis's limits for clients that have not authenticated: nobody without the secret
    // makes this node buffer much.
    parser.set_unauthenticated(true);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut authed = false;
    let mut handshake = crate::peer_auth::Acceptor::new(repl.node_id());
    'conn: loop {
        loop {
            let req = match parser.parse(&mut buf) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    conn.reply(0, &resp::error(&format!("ERR {e}")));
                    break 'conn;
                }
            };
            if !authed {
                match handshake.accept(repl.secret().as_bytes(), &req) {
                    Ok(step) => {
                        if let crate::peer_auth::Accepted::Authenticated(node) = &step {
                            authed = true;
                            parser.set_unauthenticated(false);
                            *conn.node.borrow_mut() = node.clone();
                            debug!(peer = %addr, node = %node, "peer authenticated");
                        }
                        conn.out.borrow_mut().extend_from_slice(&step.reply());
                        conn.wake.notify();
                        continue;
                    }
                    Err(e) => {
                        warn!(peer = %addr, "peer link refused: {e}");
                        conn.out
                            .borrow_mut()
                            .extend_from_slice(&resp::error(&format!("ERR resplica: peer authentication failed: {e}")));
                        conn.wake.notify();
                        break 'conn;
                    }
                }
            }
            handle(&repl, &conn, req);
        }
        let (res, b) = read_more(&mut rd, buf, parser.bytes_hint(0)).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    conn.dead.set(true);
    conn.wake.notify();
    let _ = writer.await;
}

fn handle<R: PeerHandler>(repl: &Rc<R>, conn: &Rc<PeerConn>, req: Request) {
    let name = req.arg(0).to_ascii_lowercase();
    let tag = if req.len() > 1 { resp::parse_int(req.arg(1)).unwrap_or(0) as u64 } else { 0 };
    match name.as_slice() {
        b"rs.hb" if req.len() == 3 => {
            repl.heard(&String::from_utf8_lossy(req.arg(2)));
            let mine = repl.report_text();
            conn.reply(tag, &resp::bulk(mine.as_bytes()));
        }
        b"rs.fwd" if req.len() == 6 || req.len() == 7 => {
            let num = |i: usize| resp::parse_int(req.arg(i)).unwrap_or(0);
            let watched = req.len() == 7 && req.arg(6).eq_ignore_ascii_case(b"watched");
            let Some(work) = WriterRequest::decode(req.arg(5), watched) else {
                conn.reply(tag, &resp::error("ERR resplica: RS.FWD carries no request"));
                return;
            };
            let node = conn.node.borrow().clone();
            let held = Held {
                sink: Sink::To(conn.clone(), tag),
                client_key: client_key(&node, num(4) as u64),
                db: num(2) as u32,
                proto: num(3) as u8,
                work,
                deadline_ms: 0,
            };
            repl.submit_forwarded(held);
        }
        b"rs.handover" => R::handover_requested(repl, conn.clone(), tag),
        b"rs.gone" if req.len() == 3 => {
            let node = conn.node.borrow().clone();
            repl.client_key_gone(client_key(&node, resp::parse_int(req.arg(2)).unwrap_or(0) as u64));
            conn.reply(tag, &resp::simple("OK"));
        }
        b"rs.yield" if req.len() >= 3 => {
            let epoch = resp::parse_int(req.arg(2)).unwrap_or(0) as u64;
            let keys = if req.len() > 3 && req.arg(3) == b"unknown" {
                None
            } else {
                Some(
                    (3..req.len())
                        .step_by(2)
                        .filter(|&i| i + 1 < req.len())
                        .map(|i| (resp::parse_int(req.arg(i)).unwrap_or(0) as u32, req.arg_bytes(i + 1)))
                        .collect(),
                )
            };
            let node = conn.node.borrow().clone();
            let reply = repl.yield_received(&node, epoch, keys);
            conn.reply(tag, &reply);
        }
        _ => conn.reply(tag, &resp::error("ERR resplica: unknown peer request")),
    }
}

/// A client's identity at the writer: its id on its own node, salted with the node.
pub(crate) fn client_key(node: &str, id: u64) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in node.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    id ^ (h << 40)
}

/// What a request on our outgoing link waits for.
pub(crate) enum LinkWait {
    Heartbeat,
    Forward(Held),
    Handover,
    Yield,
    /// Nothing to do with the reply.
    Ignore,
}

/// Our outgoing connection to one peer: heartbeats, forwarded requests, handover/yield.
pub(crate) struct PeerLink {
    pub node: String,
    pub addr: String,
    pub connected: Cell<bool>,
    out: RefCell<BytesMut>,
    wake: Signal,
    waiting: RefCell<crate::slot::IdMap<u64, LinkWait>>,
    next_tag: Cell<u64>,
}

impl PeerLink {
    pub fn new(node: &str, addr: &str) -> Rc<PeerLink> {
        Rc::new(PeerLink {
            node: node.to_string(),
            addr: addr.to_string(),
            connected: Cell::new(false),
            out: RefCell::new(BytesMut::new()),
            wake: Signal::default(),
            waiting: RefCell::new(Default::default()),
            next_tag: Cell::new(1),
        })
    }

    /// Send a request whose first argument after the name is the tag.
    pub fn send(&self, name: &[u8], args: &[&[u8]], wait: LinkWait) -> bool {
        if !self.connected.get() {
            return false;
        }
        let tag = self.next_tag.get();
        self.next_tag.set(tag + 1);
        let tag_s = tag.to_string();
        let mut v: Vec<&[u8]> = vec![name, tag_s.as_bytes()];
        v.extend_from_slice(args);
        self.out.borrow_mut().extend_from_slice(&Request::from_args(&v).frame);
        self.waiting.borrow_mut().insert(tag, wait);
        self.wake.notify();
        true
    }

    /// Forwarded requests waiting for their replies.
    pub fn forwards_in_flight(&self) -> bool {
        self.waiting.borrow().values().any(|w| matches!(w, LinkWait::Forward(_)))
    }

    /// Give up on every forwarded request still waiting for its reply.
    pub fn fail_forwards(&self, repl: &impl PeerHandler) {
        let tags: Vec<u64> =
            self.waiting.borrow().iter().filter(|(_, w)| matches!(w, LinkWait::Forward(_))).map(|(t, _)| *t).collect();
        for t in tags {
            let w = self.waiting.borrow_mut().remove(&t);
            if let Some(w) = w {
                repl.link_failed(self, w);
            }
        }
    }

    /// Forward a client's request to the writer at the other end.
    pub fn forward(&self, h: Held, client_id: u64) -> Result<(), Held> {
        if !self.connected.get() {
            return Err(h);
        }
        let (db, proto, id) = (h.db.to_string(), h.proto.to_string(), client_id.to_string());
        // `RS.FWD <tag> <db> <proto> <client> <frames> [WATCHED]`: a block's WATCH travels
        // as its own argument, not inside the frames.
        let (frame, watched) = h.work.encode();
        let mut args: Vec<&[u8]> = vec![db.as_bytes(), proto.as_bytes(), id.as_bytes(), &frame];
        if watched {
            args.push(b"WATCHED");
        }
        self.send(b"RS.FWD", &args, LinkWait::Forward(h));
        Ok(())
    }
}

/// Keep the outgoing link to `link`'s peer up: connect, authenticate, then pump requests and
/// dispatch replies; on loss, fail whatever waited on it.
pub(crate) async fn run_link<R: PeerHandler>(repl: Rc<R>, link: Rc<PeerLink>) {
    let mut was_up = true;
    loop {
        match connect_peer(&*repl, &link).await {
            Ok(stream) => {
                if !was_up {
                    info!(peer = %link.node, addr = %link.addr, "peer link up");
                }
                was_up = true;
                link.connected.set(true);
                link.out.borrow_mut().clear();
                let (rd, wr) = stream.into_split();
                let reason = monoio::select! {
                    r = link_reader(&repl, &link, rd) => r,
                    r = link_writer(&link, wr) => r,
                };
                link.connected.set(false);
                warn!(peer = %link.node, addr = %link.addr, "peer link lost: {reason}");
                let waiting: Vec<LinkWait> = link.waiting.borrow_mut().drain().map(|(_, w)| w).collect();
                for w in waiting {
                    repl.link_failed(&link, w);
                }
            }
            Err(e) => {
                if was_up {
                    warn!(peer = %link.node, addr = %link.addr, "cannot reach peer: {e}");
                    was_up = false;
                }
            }
        }
        monoio::time::sleep(Duration::from_millis(repl.heartbeat_ms().min(100))).await;
    }
}

async fn connect_peer(repl: &impl PeerHandler, link: &PeerLink) -> Result<Conn, String> {
    use std::net::ToSocketAddrs;
    let addr = link
        .addr
        .to_socket_addrs()
        .map_err(|e| format!("resolve {}: {e}", link.addr))?
        .next()
        .ok_or_else(|| format!("{} resolves to nothing", link.addr))?;
    let timeout = Duration::from_millis(repl.heartbeat_ms() * 2);
    let tls = repl.tls().1.map(|t| (t, crate::tls::host_of(&link.addr)));
    let mut stream = Conn::connect(addr, timeout.as_millis() as u64, tls).await?;
    super::handshake::authenticate_to_peer(
        &mut stream,
        repl.node_id(),
        &link.node,
        repl.secret(),
        timeout.as_millis() as u64,
    )
    .await?;
    Ok(stream)
}

async fn link_writer(link: &PeerLink, mut wr: ConnWriter) -> String {
    loop {
        let chunk = std::mem::take(&mut *link.out.borrow_mut());
        if chunk.is_empty() {
            link.wake.wait().await;
            continue;
        }
        if let Err(e) = wr.write_all(chunk.freeze()).await.0 {
            return format!("write: {e}");
        }
    }
}

async fn link_reader<R: PeerHandler>(repl: &Rc<R>, link: &PeerLink, mut rd: ConnReader) -> String {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut skim = ReplySkimmer::new();
    loop {
        let (res, b) = read_more(&mut rd, buf, skim.bytes_hint(0)).await;
        buf = b;
        match res {
            Ok(0) => return "closed by peer".into(),
            Err(e) => return format!("read: {e}"),
            Ok(_) => {}
        }
        loop {
            match skim.next_reply(&mut buf) {
                Ok(Some(frame)) => {
                    let Some((tag, reply)) = untag(&frame) else {
                        return format!("unexpected reply: {}", String::from_utf8_lossy(&frame[..frame.len().min(80)]));
                    };
                    let wait = link.waiting.borrow_mut().remove(&tag);
                    if let Some(w) = wait {
                        repl.link_reply(link, w, reply);
                    }
                }
                Ok(None) => break,
                Err(e) => return e.to_string(),
            }
        }
    }
}
