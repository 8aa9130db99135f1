//! Upstream set-up: connecting to a Redis with the proxy's (or an ACL user's) credentials in
//! a protocol and database, one-shot round trips on such a connection, and learning which run
//! of a Redis a connection reaches. Used by the lanes, dedicated connections, the pair shells
//! and the admin port; it knows nothing of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;

use super::conn::Conn;
use super::io::read_more;
use super::Core;
use crate::config::RedisConfig;
use crate::resp::{self, ReplySkimmer};
use crate::session::AclUser;
use crate::tls::ClientTls;

/// How to reach a Redis of this node or its pair: the `[redis]` settings (every Redis of a
/// pair uses the same credentials and TLS) and the TLS built from them.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub cfg: RedisConfig,
    pub tls: Option<Arc<ClientTls>>,
    /// The peers' Redis and the host names their certificates are checked against
    /// (`[[peers]] redis` may be a DNS name; any other Redis is checked by its IP address).
    pub names: Vec<(SocketAddr, String)>,
}

impl Upstream {
    /// The name `addr`'s certificate must carry.
    fn host_for(&self, addr: SocketAddr) -> String {
        match self.names.iter().find(|(a, _)| *a == addr) {
            Some((_, host)) => host.clone(),
            None => addr.ip().to_string(),
        }
    }

    /// This upstream with `addr`'s certificate checked against `host` (a `[[peers]] redis`
    /// name resolved just now, whose address may have moved since start).
    pub(crate) fn naming(&self, addr: SocketAddr, host: &str) -> Upstream {
        let mut up = self.clone();
        up.names.retain(|(a, _)| *a != addr);
        up.names.push((addr, host.to_string()));
        up
    }

    /// A TCP (or TLS) connection to `addr`, nothing sent yet.
    pub(crate) async fn open(&self, addr: SocketAddr) -> Result<Conn, String> {
        let host = self.host_for(addr);
        Conn::connect(addr, self.cfg.connect_timeout_ms, self.tls.as_deref().map(|t| (t, host.as_str()))).await
    }
}

/// Native mode: which run of the Redis at `addr` `stream` reaches (`route::run_id_hash` of its
/// `run_id`; 0 when unknown). An ACL user without `INFO` permission asks over a connection
/// of the proxy's own identity to the same address (a Redis restart in between would have
/// closed `stream` too). `None`: `stream` did not answer and must not be used (a late answer
/// would be taken for the next request's).
pub(crate) async fn run_of(up: &Upstream, addr: SocketAddr, stream: &mut Conn) -> Option<u64> {
    let info_cmd = [vec![b"INFO".to_vec(), b"server".to_vec()]];
    let reply = roundtrip(stream, &info_cmd, up.cfg.connect_timeout_ms).await.ok()?.into_iter().next()?;
    Some(if resp::is_error(&reply) { run_via_own_identity(up, addr).await } else { run_from_info(&reply) })
}

/// [`run_of`] over a connection of the proxy's own identity.
pub(crate) async fn run_via_own_identity(up: &Upstream, addr: SocketAddr) -> u64 {
    let info_cmd = [vec![b"INFO".to_vec(), b"server".to_vec()]];
    let Ok(mut own) = connect_redis(up, addr, 2, 0).await else { return 0 };
    match roundtrip(&mut own, &info_cmd, up.cfg.connect_timeout_ms).await.ok().and_then(|r| r.into_iter().next()) {
        Some(r) => run_from_info(&r),
        None => 0,
    }
}

/// `route::run_id_hash` of the `run_id` in an `INFO server` reply (0: none).
pub(crate) fn run_from_info(reply: &[u8]) -> u64 {
    let info = String::from_utf8_lossy(reply);
    crate::route::run_id_hash(crate::replication::reply::info_field(&info, "run_id").unwrap_or(""))
}

/// Connect, authenticate and prepare a connection to the local Redis in protocol `proto`.
pub(crate) async fn connect_upstream(core: &Core, proto: u8, db: u32) -> Result<Conn, String> {
    connect_redis(&core.shared.upstream, core.shared.cfg.redis.address, proto, db).await
}

/// Connect to the Redis at `addr` with the `[redis]` credentials (every Redis of a pair
/// uses the same ones), in protocol `proto` and database `db`.
pub(crate) async fn connect_redis(up: &Upstream, addr: SocketAddr, proto: u8, db: u32) -> Result<Conn, String> {
    connect_redis_as(up, addr, proto, db, None).await
}

/// [`connect_redis`], authenticating as Redis ACL user `user` when given (its `AUTH` error,
/// e.g. WRONGPASS, is the error).
pub(crate) async fn connect_redis_as(
    up: &Upstream,
    addr: SocketAddr,
    proto: u8,
    db: u32,
    user: Option<&AclUser>,
) -> Result<Conn, String> {
    let cfg = &up.cfg;
    let mut stream = up.open(addr).await?;
    let mut setup: Vec<Vec<Vec<u8>>> = Vec::new();
    if let Some(u) = user {
        setup.push(vec![b"AUTH".to_vec(), u.name.to_vec(), u.pass.to_vec()]);
    } else if !cfg.password.is_empty() {
        if cfg.username.is_empty() {
            setup.push(vec![b"AUTH".to_vec(), cfg.password.as_bytes().to_vec()]);
        } else {
            setup.push(vec![b"AUTH".to_vec(), cfg.username.as_bytes().to_vec(), cfg.password.as_bytes().to_vec()]);
        }
    }
    if proto >= 3 {
        setup.push(crate::command::frames::hello_args(3));
    }
    if db != 0 {
        setup.push(crate::command::frames::select_args(db));
    }
    if setup.is_empty() {
        return Ok(stream);
    }
    let replies = roundtrip(&mut stream, &setup, cfg.connect_timeout_ms).await?;
    for (cmd, reply) in setup.iter().zip(&replies) {
        if resp::is_error(reply) {
            let text = String::from_utf8_lossy(reply).trim().to_string();
            return Err(format!("{} rejected: {text}", String::from_utf8_lossy(&cmd[0])));
        }
    }
    Ok(stream)
}

/// Send commands and read one reply each, with a deadline.
pub(crate) async fn roundtrip(stream: &mut Conn, cmds: &[Vec<Vec<u8>>], timeout_ms: u64) -> Result<Vec<Bytes>, String> {
    let mut out = BytesMut::new();
    for c in cmds {
        out.extend_from_slice(&crate::resp::Request::from_args(c).frame);
    }
    let work = async {
        let (res, _) = stream.write_all(out.freeze()).await;
        res.map_err(|e| format!("write: {e}"))?;
        let mut buf = BytesMut::with_capacity(4096);
        let mut replies = Vec::new();
        let mut skim = ReplySkimmer::new();
        while replies.len() < cmds.len() {
            while let Some(r) = skim.next_reply(&mut buf).map_err(|e| e.to_string())? {
                replies.push(r);
            }
            if replies.len() == cmds.len() {
                break;
            }
            let (res, b) = read_more(stream, buf, 0).await;
            buf = b;
            match res {
                Ok(0) => return Err("Redis closed the connection during setup".to_string()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok(replies)
    };
    match monoio::time::timeout(Duration::from_millis(timeout_ms), work).await {
        Ok(r) => r,
        Err(_) => Err(format!("Redis did not answer setup within {timeout_ms} ms")),
    }
}
