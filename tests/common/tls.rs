//! TLS for the tests: a throw-away CA and certificates (rcgen) written to PEM files, and a
//! RESP client over rustls that can show a client certificate and tells which certificate
//! the server showed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use resplica::resp::ReplySkimmer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::{encode, temp_path};

/// A CA and the files of certificates it signed, in a directory removed on drop.
pub struct Pki {
    pub dir: PathBuf,
    ca_key: KeyPair,
    ca: rcgen::Certificate,
}

/// A certificate and key written as PEM files.
#[derive(Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn cert_str(&self) -> String {
        self.cert.display().to_string()
    }
    pub fn key_str(&self) -> String {
        self.key.display().to_string()
    }
    /// The certificate's DER (to compare with what a server showed).
    pub fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_file(&self.cert).expect("cert pem").to_vec()
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = temp_path(&format!("pki-{name}"), "d");
        std::fs::create_dir_all(&dir).expect("pki dir");
        let ca_key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("resplica test CA {name}"));
        let ca = params.self_signed(&ca_key).expect("ca cert");
        std::fs::write(dir.join("ca.crt"), ca.pem()).expect("write ca");
        Pki { dir, ca_key, ca }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn ca_str(&self) -> String {
        self.ca_file().display().to_string()
    }

    /// A certificate for `localhost` and 127.0.0.1, named `cn`, written as `<file>.crt/.key`.
    pub fn issue(&self, file: &str, cn: &str) -> CertFiles {
        let files = CertFiles { cert: self.dir.join(format!("{file}.crt")), key: self.dir.join(format!("{file}.key")) };
        self.rotate(&files, cn);
        files
    }

    /// Replace `files` in place with a new certificate named `cn` (as cert-manager rotates).
    pub fn rotate(&self, files: &CertFiles, cn: &str) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).expect("sign");
        // Key first: a handshake between the two writes sees a mismatch and keeps the old pair.
        write_atomically(&files.key, key.serialize_pem().as_bytes());
        write_atomically(&files.cert, cert.pem().as_bytes());
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_atomically(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).expect("write pem");
    std::fs::rename(&tmp, path).expect("rename pem");
}

/// A RESP connection over TLS.
pub struct TlsConn {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: BytesMut,
    skim: ReplySkimmer,
}

impl TlsConn {
    /// Connect to 127.0.0.1:`port`, verifying the server against `ca`, showing `client` when
    /// given. The handshake completes before this returns (its error is the `Err`).
    pub fn connect(port: u16, ca: &Path, client: Option<&CertFiles>) -> Result<TlsConn, String> {
        let mut c = TlsConn::unstarted(port, ca, client)?;
        while c.stream.conn.is_handshaking() {
            c.stream.conn.complete_io(&mut c.stream.sock).map_err(|e| format!("handshake: {e}"))?;
        }
        Ok(c)
    }

    /// [`TlsConn::connect`] (no client certificate) sending `first` in the same socket write
    /// as the handshake's last message, as a client that does not wait does.
    pub fn connect_sending(port: u16, ca: &Path, first: &[u8]) -> Result<TlsConn, String> {
        let mut c = TlsConn::unstarted(port, ca, None)?;
        c.stream.conn.set_buffer_limit(None);
        c.stream.conn.writer().write_all(first).map_err(|e| e.to_string())?;
        c.until_last_flight()?;
        c.send_queued(&[])?;
        Ok(c)
    }

    /// Handshake, then in one socket write: the last handshake message, a close_notify
    /// alert and `junk` bytes after it (a misbehaving or hostile client).
    pub fn finish_then_close_with_junk(port: u16, ca: &Path, junk: &[u8]) -> Result<(), String> {
        let mut c = TlsConn::unstarted(port, ca, None)?;
        c.until_last_flight()?;
        c.stream.conn.send_close_notify();
        c.send_queued(junk)
    }

    /// A TCP connection and a client session, nothing sent yet. The session is built by
    /// the proxy's own `tls::client_config` (the same rustls settings a sidecar uses).
    fn unstarted(port: u16, ca: &Path, client: Option<&CertFiles>) -> Result<TlsConn, String> {
        let settings = resplica::tls::TlsConfig {
            ca_file: ca.display().to_string(),
            cert_file: client.map(|c| c.cert_str()).unwrap_or_default(),
            key_file: client.map(|c| c.key_str()).unwrap_or_default(),
            ..Default::default()
        };
        let config = resplica::tls::client_config("test client", &settings).map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").expect("ip name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        Ok(TlsConn { stream: rustls::StreamOwned::new(conn, tcp), buf: BytesMut::new(), skim: ReplySkimmer::new() })
    }

    /// Run the handshake up to the client's last flight, which stays queued (unsent).
    fn until_last_flight(&mut self) -> Result<(), String> {
        while self.stream.conn.is_handshaking() {
            self.send_queued(&[])?;
            if !self.stream.conn.is_handshaking() {
                break;
            }
            self.stream.conn.read_tls(&mut self.stream.sock).map_err(|e| e.to_string())?;
            self.stream.conn.process_new_packets().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Everything the session has queued, then `extra`, in one socket write.
    fn send_queued(&mut self, extra: &[u8]) -> Result<(), String> {
        let mut out = Vec::new();
        while self.stream.conn.wants_write() {
            self.stream.conn.write_tls(&mut out).map_err(|e| e.to_string())?;
        }
        out.extend_from_slice(extra);
        self.stream.sock.write_all(&out).map_err(|e| e.to_string())
    }

    /// The DER of the certificate the server showed.
    pub fn server_cert(&self) -> Vec<u8> {
        self.stream.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default()
    }

    /// Send one command and read its reply (`Err`: the connection failed or closed).
    pub fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Bytes, String> {
        self.stream.write_all(&encode(args)).map_err(|e| format!("write: {e}"))?;
        self.stream.flush().map_err(|e| format!("flush: {e}"))?;
        self.read_reply()
    }

    pub fn read_reply(&mut self) -> Result<Bytes, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.skim.next_reply(&mut self.buf).map_err(|e| e.to_string())? {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return Err("no reply in 10 s".into());
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// Run `redis-cli` with `args`; its stdout (trimmed) or its failure.
pub fn redis_cli(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("redis-cli")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !text.starts_with("Error") && !text.starts_with("Could not") {
        Ok(text)
    } else {
        Err(format!("{text} {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}
