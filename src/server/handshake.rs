//! The connecting side of the peer-link handshake (`peer_auth`), for both pair modes' peer
//! links: the shared secret never travels.

use super::conn::Conn;

use super::upstream::roundtrip;
use crate::resp;

/// Authenticate `s` (just connected to peer `peer`) as node `me`.
pub(crate) async fn authenticate_to_peer(
    s: &mut Conn,
    me: &str,
    peer: &str,
    secret: &str,
    timeout: u64,
) -> Result<(), String> {
    let hs = crate::peer_auth::Initiator::new(me);
    let r = roundtrip(s, &[hs.hello()], timeout).await?;
    let answer = r.into_iter().next().ok_or("no answer to RS.HELLO")?;
    if resp::is_error(&answer) {
        return Err(format!("the peer refused us: {}", String::from_utf8_lossy(&answer).trim()));
    }
    let parts = crate::replication::reply::elements(&answer).unwrap_or_default();
    let field = |i: usize| parts.get(i).and_then(|p| crate::replication::reply::bulk(p)).unwrap_or(b"");
    let prove = hs
        .prove(secret.as_bytes(), peer.as_bytes(), field(0), field(1))
        .map_err(|e| format!("the peer at this address is not {peer} with our secret: {e}"))?;
    let r = roundtrip(s, &[prove], timeout).await?;
    match r.first() {
        Some(r) if !resp::is_error(r) => Ok(()),
        Some(r) => Err(format!("the peer refused us: {}", String::from_utf8_lossy(r).trim())),
        None => Err("no answer to RS.PROVE".into()),
    }
}
