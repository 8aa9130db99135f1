//! Peer-link authentication that never sends the shared secret (`[replication] secret`): a
//! mutual challenge-response, HMAC-SHA256 over both sides' fresh nonces and node ids. Sans-IO:
//! the two link shells (`server::native`, `server::peer`) carry the frames.
//!
//! ```text
//! client → RS.HELLO <client node> <client nonce>
//! server → *2 <server nonce> <server proof>      proof("server", client nonce, server nonce, server node)
//! client → RS.PROVE <client proof>               proof("client", server nonce, client nonce, client node)
//! server → +OK
//! ```
//!
//! Each side proves it holds the secret for nonces the other chose, so nothing seen on the
//! wire can be replayed, and a side that does not hold the secret learns nothing it could use.
//! Nonces and proofs travel as lowercase hex.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 16;

/// Why a peer's authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthError {
    /// The frame is not what this step expects (wrong command, arity or encoding).
    #[error("malformed peer authentication frame: {0}")]
    Malformed(&'static str),
    /// The proof does not match: the other side does not hold the same secret.
    #[error("wrong proof: the peer does not hold the same secret")]
    WrongProof,
    /// No secret is configured (a peer link always needs one).
    #[error("no [replication] secret configured")]
    NoSecret,
}

/// A fresh random nonce (the kernel's `getrandom`).
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < NONCE_LEN {
        // SAFETY: getrandom writes at most the given length into memory we own.
        let r = unsafe { libc::getrandom(n[filled..].as_mut_ptr().cast(), NONCE_LEN - filled, 0) };
        if r > 0 {
            filled += r as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // No kernel randomness (never on Linux >= 3.17): fall back to the clock and pid,
            // still unique per connection.
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let seed = (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32);
            n[..8].copy_from_slice(&seed.to_le_bytes());
            break;
        }
    }
    n
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

fn mac(secret: &[u8], role: &[u8], first: &[u8], second: &[u8], node: &[u8]) -> Result<Hmac<Sha256>, PeerAuthError> {
    if secret.is_empty() {
        return Err(PeerAuthError::NoSecret);
    }
    let mut m = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| PeerAuthError::NoSecret)?;
    for part in [role, first, second, node] {
        // Length-prefixed, so that no two different inputs concatenate alike.
        m.update(&(part.len() as u32).to_be_bytes());
        m.update(part);
    }
    Ok(m)
}

/// The proof `role` ("client" or "server") gives: hex of HMAC(secret, role, first nonce,
/// second nonce, its node id).
pub fn proof(secret: &[u8], role: &[u8], first: &[u8], second: &[u8], node: &[u8]) -> Result<String, PeerAuthError> {
    Ok(hex(&mac(secret, role, first, second, node)?.finalize().into_bytes()))
}

/// Check a proof (constant time).
pub fn verify(
    secret: &[u8],
    role: &[u8],
    first: &[u8],
    second: &[u8],
    node: &[u8],
    given_hex: &[u8],
) -> Result<(), PeerAuthError> {
    let given = unhex(given_hex).ok_or(PeerAuthError::Malformed("proof is not hex"))?;
    mac(secret, role, first, second, node)?.verify_slice(&given).map_err(|_| PeerAuthError::WrongProof)
}

/// What an accepted handshake step asks of the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Answer `RS.HELLO` with these two bulks (our nonce, our proof).
    Challenge([String; 2]),
    /// The peer is authenticated as this node: answer `+OK`.
    Authenticated(String),
}

impl Accepted {
    /// The reply frame.
    pub fn reply(&self) -> bytes::Bytes {
        match self {
            Accepted::Challenge([n, p]) => {
                let mut out = bytes::BytesMut::new();
                crate::resp::push_array_header(&mut out, 2);
                crate::resp::push_bulk(&mut out, n.as_bytes());
                crate::resp::push_bulk(&mut out, p.as_bytes());
                out.freeze()
            }
            Accepted::Authenticated(_) => crate::resp::simple("OK"),
        }
    }
}

/// The accepting side of one connection.
#[derive(Debug)]
pub struct Acceptor {
    node: String,
    nonce: [u8; NONCE_LEN],
    /// After `RS.HELLO`: the client's node id and nonce.
    hello: Option<(String, Vec<u8>)>,
}

impl Acceptor {
    /// `node`: this side's node id.
    pub fn new(node: &str) -> Acceptor {
        Acceptor { node: node.to_string(), nonce: nonce(), hello: None }
    }

    /// `RS.HELLO <node> <nonce>` (arguments after the command name): the reply's two
    /// elements (our nonce and proof).
    pub fn on_hello(
        &mut self,
        secret: &[u8],
        client_node: &[u8],
        client_nonce_hex: &[u8],
    ) -> Result<[String; 2], PeerAuthError> {
        let cn = unhex(client_nonce_hex).filter(|n| n.len() == NONCE_LEN).ok_or(PeerAuthError::Malformed("nonce"))?;
        let p = proof(secret, b"server", &cn, &self.nonce, self.node.as_bytes())?;
        self.hello = Some((String::from_utf8_lossy(client_node).into_owned(), cn));
        Ok([hex(&self.nonce), p])
    }

    /// One request before the peer is authenticated (`RS.HELLO`, then `RS.PROVE`); anything
    /// else is refused.
    pub fn accept(&mut self, secret: &[u8], req: &crate::resp::Request) -> Result<Accepted, PeerAuthError> {
        let name = req.arg(0);
        if name.eq_ignore_ascii_case(b"rs.hello") && req.len() == 3 {
            self.on_hello(secret, req.arg(1), req.arg(2)).map(Accepted::Challenge)
        } else if name.eq_ignore_ascii_case(b"rs.prove") && req.len() == 2 {
            self.on_prove(secret, req.arg(1)).map(Accepted::Authenticated)
        } else {
            Err(PeerAuthError::Malformed("expected RS.HELLO <node> <nonce>, then RS.PROVE <proof>"))
        }
    }

    /// `RS.PROVE <proof>`: the authenticated peer's node id.
    pub fn on_prove(&self, secret: &[u8], proof_hex: &[u8]) -> Result<String, PeerAuthError> {
        let (node, cn) = self.hello.as_ref().ok_or(PeerAuthError::Malformed("RS.PROVE before RS.HELLO"))?;
        verify(secret, b"client", &self.nonce, cn, node.as_bytes(), proof_hex)?;
        Ok(node.clone())
    }
}

/// The connecting side: the frames to send and the check of the server's answer.
#[derive(Debug)]
pub struct Initiator {
    node: String,
    nonce: [u8; NONCE_LEN],
}

impl Initiator {
    /// `node`: this side's node id.
    pub fn new(node: &str) -> Initiator {
        Initiator { node: node.to_string(), nonce: nonce() }
    }

    /// The `RS.HELLO` arguments.
    pub fn hello(&self) -> Vec<Vec<u8>> {
        vec![b"RS.HELLO".to_vec(), self.node.as_bytes().to_vec(), hex(&self.nonce).into_bytes()]
    }

    /// Check the server's answer (`server_node`: the peer we meant to reach) and give the
    /// `RS.PROVE` arguments.
    pub fn prove(
        &self,
        secret: &[u8],
        server_node: &[u8],
        server_nonce_hex: &[u8],
        server_proof_hex: &[u8],
    ) -> Result<Vec<Vec<u8>>, PeerAuthError> {
        let sn = unhex(server_nonce_hex).filter(|n| n.len() == NONCE_LEN).ok_or(PeerAuthError::Malformed("nonce"))?;
        verify(secret, b"server", &self.nonce, &sn, server_node, server_proof_hex)?;
        let p = proof(secret, b"client", &sn, &self.nonce, self.node.as_bytes())?;
        Ok(vec![b"RS.PROVE".to_vec(), p.into_bytes()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(v: &[Vec<u8>], i: usize) -> &[u8] {
        &v[i]
    }

    #[test]
    fn both_sides_with_the_secret_authenticate_each_other() {
        let c = Initiator::new("b");
        let mut s = Acceptor::new("a");
        let hello = c.hello();
        let [sn, sp] = s.on_hello(b"sekrit", arg(&hello, 1), arg(&hello, 2)).unwrap();
        let prove = c.prove(b"sekrit", b"a", sn.as_bytes(), sp.as_bytes()).unwrap();
        assert_eq!(s.on_prove(b"sekrit", arg(&prove, 1)).unwrap(), "b");
        // Nothing on the wire is the secret.
        for frame in hello.iter().chain(&prove).chain([sn.as_bytes().to_vec(), sp.as_bytes().to_vec()].iter()) {
            assert!(!frame.windows(6).any(|w| w == b"sekrit"));
        }
    }

    #[test]
    fn a_wrong_secret_fails_on_either_side() {
        let c = Initiator::new("b");
        let mut s = Acceptor::new("a");
        let hello = c.hello();
        let [sn, sp] = s.on_hello(b"server-secret", arg(&hello, 1), arg(&hello, 2)).unwrap();
        // The client sees a server without its secret.
        assert_eq!(c.prove(b"client-secret", b"a", sn.as_bytes(), sp.as_bytes()), Err(PeerAuthError::WrongProof));
        // A client without the secret that answers anyway is refused.
        let forged = proof(b"client-secret", b"client", &[0; 16], &[0; 16], b"b").unwrap();
        assert_eq!(s.on_prove(b"server-secret", forged.as_bytes()), Err(PeerAuthError::WrongProof));
        // A proof for another server (node id) does not pass either.
        assert_eq!(c.prove(b"server-secret", b"zz", sn.as_bytes(), sp.as_bytes()), Err(PeerAuthError::WrongProof));
    }

    #[test]
    fn replayed_or_malformed_frames_are_refused() {
        let c = Initiator::new("b");
        let mut s1 = Acceptor::new("a");
        let hello = c.hello();
        let [sn, sp] = s1.on_hello(b"k", arg(&hello, 1), arg(&hello, 2)).unwrap();
        let prove = c.prove(b"k", b"a", sn.as_bytes(), sp.as_bytes()).unwrap();
        // The same client proof on another connection (another server nonce) fails.
        let mut s2 = Acceptor::new("a");
        s2.on_hello(b"k", arg(&hello, 1), arg(&hello, 2)).unwrap();
        assert_eq!(s2.on_prove(b"k", arg(&prove, 1)), Err(PeerAuthError::WrongProof));
        assert!(matches!(s2.on_hello(b"k", b"b", b"xyz"), Err(PeerAuthError::Malformed(_))));
        assert!(matches!(Acceptor::new("a").on_prove(b"k", b"00"), Err(PeerAuthError::Malformed(_))));
        assert!(matches!(s2.on_prove(b"k", b"not hex"), Err(PeerAuthError::Malformed(_))));
        assert_eq!(Acceptor::new("a").on_hello(b"", b"b", arg(&hello, 2)), Err(PeerAuthError::NoSecret));
        assert_ne!(nonce(), nonce());
    }
}
