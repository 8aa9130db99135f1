//! The admin port (`[node] admin_listen`), on core 0 in every mode. One listener speaks two
//! protocols, told apart by the first line:
//! - RESP: `RESPLICA STATUS` (or `STATUS`) and `PING`, for `resplica status` and redis-cli;
//!   `RESPLICA TAKEOVER` (native mode, `resplica takeover`): the operator lifts a hold the
//!   pair keeps while the copy holding the most is unreachable (see `NativeNode::take_over`);
//! - HTTP/1.1 `GET`/`HEAD`, for Kubernetes and Prometheus:
//!   `/livez` (200 while the process serves), `/readyz` (200 only when this sidecar can serve
//!   reads and writes correctly now; 503 with the reason otherwise: draining after SIGTERM, the
//!   pair forming or failing over, the Redis unreachable), `/status` (the status text;
//!   `?format=json` as a JSON object), `/metrics` (Prometheus text format, see `metrics`).
//!
//! With `[node] admin_token`, everything but `/livez`, `/readyz` and `PING` needs the token
//! (HTTP `Authorization: Bearer <token>`, RESP `AUTH <token>` first).
//!
//! It reads shared state only (the status text, the route, the counters) and decides nothing;
//! a takeover is handed to the native shell, whose control plane decides.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpListener;

use super::conn::Conn;
use super::io::read_more;
use super::upstream::{connect_redis, roundtrip};
use super::Core;
use crate::resp::{self, Request, RequestParser};
use crate::route::WriteTarget;

/// The longest HTTP request head accepted.
const MAX_HTTP_HEAD: usize = 8 * 1024;
/// How long `/readyz` waits for the local Redis to answer PING (single node and mirror mode).
const READY_PING_TIMEOUT_MS: u64 = 500;
/// An admin connection that sends nothing for this long is closed (probes and scrapers send
/// their request at once; this bounds what an idle or trickling client holds).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once, at most; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;

/// Accept admin connections forever.
pub(crate) async fn serve(core: Rc<Core>, listener: TcpListener) {
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            monoio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if open.get() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        open.set(open.get() + 1);
        let core = core.clone();
        let open = open.clone();
        monoio::spawn(async move {
            let tls = core.shared.tls.admin.clone();
            match Conn::accept(stream, tls.as_deref(), super::conn::TLS_ACCEPT_TIMEOUT).await {
                Ok(conn) => serve_conn(core, conn).await,
                Err(e) => tracing::debug!("admin port: {e}"),
            }
            open.set(open.get() - 1);
        });
    }
}

async fn serve_conn(core: Rc<Core>, stream: Conn) {
    let (mut rd, mut wr) = stream.into_split();
    let mut parser = RequestParser::new(1 << 20);
    let mut buf = BytesMut::with_capacity(4096);
    let token = core.shared.cfg.node.admin_token.clone();
    let mut authed = token.is_empty();
    parser.set_unauthenticated(!authed);
    loop {
        let Ok((res, b)) = monoio::time::timeout(IDLE_TIMEOUT, read_more(&mut rd, buf, 0)).await else {
            return;
        };
        buf = b;
        if !matches!(res, Ok(n) if n > 0) {
            return;
        }
        if is_http(&buf) {
            let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") else {
                if buf.len() > MAX_HTTP_HEAD {
                    let _ = wr.write_all(http(431, "text/plain", "request header too large\n", false)).await;
                    return;
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let reply = answer_http(&core, &head).await;
            let _ = wr.write_all(reply).await;
            // One request per connection (Connection: close): probes and scrapes
            // open a new one each time anyway.
            return;
        }
        loop {
            let req: Request = match parser.parse(&mut buf) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    let _ = wr.write_all(resp::error(&format!("ERR {e}"))).await;
                    return;
                }
            };
            let is_auth = req.arg(0).eq_ignore_ascii_case(b"auth");
            let reply = if is_auth && req.len() == 2 {
                authed = !token.is_empty() && same_secret(req.arg(1), token.as_bytes());
                parser.set_unauthenticated(!authed);
                if authed {
                    resp::simple("OK")
                } else if token.is_empty() {
                    resp::error("ERR the admin port has no token ([node] admin_token)")
                } else {
                    resp::error("WRONGPASS invalid admin token")
                }
            } else if !authed && !req.arg(0).eq_ignore_ascii_case(b"ping") {
                resp::error("NOAUTH Authentication required (AUTH <[node] admin_token>).")
            } else {
                answer_resp(&core, &req)
            };
            if wr.write_all(reply).await.0.is_err() {
                return;
            }
        }
    }
}

/// Whether the bytes so far start an HTTP request (`GET /… HTTP/1.x`), not a RESP inline one.
fn is_http(buf: &[u8]) -> bool {
    (buf.starts_with(b"GET /") || buf.starts_with(b"HEAD /"))
        && buf.split(|&b| b == b'\n').next().is_some_and(|line| memchr::memmem::find(line, b" HTTP/1.").is_some())
}

/// Constant-time comparison of a presented secret with the configured one.
fn same_secret(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len() && want.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn answer_resp(core: &Core, req: &Request) -> bytes::Bytes {
    let name = req.arg(0).to_ascii_lowercase();
    let is_status =
        name == b"status" || (name == b"resplica" && req.len() == 2 && req.arg(1).eq_ignore_ascii_case(b"status"));
    let is_takeover = name == b"resplica" && req.len() == 2 && req.arg(1).eq_ignore_ascii_case(b"takeover");
    if is_status {
        resp::bulk(status_text(core).as_bytes())
    } else if is_takeover {
        let shell = core.native_shell.borrow().clone();
        match shell {
            Some(shell) => shell.take_over(),
            None => resp::error("ERR resplica: RESPLICA TAKEOVER is for a native-mode pair"),
        }
    } else if name == b"ping" {
        resp::simple("PONG")
    } else {
        resp::error(
            "ERR the admin port answers RESPLICA STATUS, RESPLICA TAKEOVER and PING (and HTTP GET /livez /readyz /status /metrics)",
        )
    }
}

async fn answer_http(core: &Rc<Core>, head: &str) -> bytes::Bytes {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("/");
    let with_body = method != "HEAD";
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let token = &core.shared.cfg.node.admin_token;
    let bearer_ok = token.is_empty()
        || head.lines().skip(1).any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("authorization")
                    && value
                        .trim()
                        .strip_prefix("Bearer ")
                        .is_some_and(|t| same_secret(t.trim().as_bytes(), token.as_bytes()))
            })
        });
    if !bearer_ok && matches!(path, "/status" | "/metrics") {
        return http(401, "text/plain", "a bearer token is required ([node] admin_token)\n", with_body);
    }
    match path {
        "/livez" => http(200, "text/plain", "ok\n", with_body),
        "/readyz" => match readiness(core).await {
            Ok(()) => http(200, "text/plain", "ready\n", with_body),
            Err(why) => http(503, "text/plain", &format!("not ready: {why}\n"), with_body),
        },
        "/status" => {
            let text = status_text(core);
            if query.split('&').any(|q| q == "format=json") {
                http(200, "application/json", &status_json(&text), with_body)
            } else {
                http(200, "text/plain", &text, with_body)
            }
        }
        "/metrics" => {
            let body = metrics_text(core).await;
            http(200, "text/plain; version=0.0.4; charset=utf-8", &body, with_body)
        }
        _ => http(404, "text/plain", "not found: /livez /readyz /status /metrics\n", with_body),
    }
}

fn http(code: u16, content_type: &str, body: &str, with_body: bool) -> bytes::Bytes {
    let reason = match code {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if code == 401 { "WWW-Authenticate: Bearer\r\n" } else { "" }
    );
    if with_body {
        out.push_str(body);
    }
    bytes::Bytes::from(out)
}

/// Why this sidecar cannot serve correctly now, if it cannot.
async fn readiness(core: &Core) -> Result<(), String> {
    let shared = &core.shared;
    if shared.draining.load(Ordering::SeqCst) {
        return Err("draining (SIGTERM received)".into());
    }
    if let Some(route) = &shared.native {
        return match route.writes() {
            WriteTarget::Hold => Err("no primary Redis now (the pair is forming, failing over or merging)".into()),
            WriteTarget::Local | WriteTarget::Peer => Ok(()),
        };
    }
    // Single node and mirror mode: the local Redis must answer.
    let up = &shared.upstream;
    let ping = async {
        let mut s = connect_redis(up, up.cfg.address, 2, 0).await?;
        let r = roundtrip(&mut s, &[vec![b"PING".to_vec()]], READY_PING_TIMEOUT_MS).await?;
        match r.first() {
            Some(r) if !resp::is_error(r) => Ok(()),
            Some(r) => Err(String::from_utf8_lossy(r).trim().to_string()),
            None => Err("no answer".to_string()),
        }
    };
    match monoio::time::timeout(Duration::from_millis(READY_PING_TIMEOUT_MS), ping).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the Redis at {} does not answer: {e}", up.cfg.address)),
        Err(_) => Err(format!("the Redis at {} did not answer PING in {READY_PING_TIMEOUT_MS} ms", up.cfg.address)),
    }
}

/// The status text; a single node (no control plane) gets a short one.
fn status_text(core: &Core) -> String {
    let shared = &core.shared;
    let text = shared.status.lock().map(|s| s.clone()).unwrap_or_default();
    if !text.is_empty() {
        return text;
    }
    format!(
        "mode:single\nnode:{}\nredis:{}\nio_driver:{}\nconnected_clients:{}\ndraining:{}\n",
        shared.cfg.node.id,
        shared.cfg.redis.address,
        shared.driver_name.get().copied().unwrap_or("?"),
        shared.clients.load(Ordering::Relaxed),
        shared.draining.load(Ordering::Relaxed) as u8
    )
}

/// `key:value` lines as one JSON object; a key seen twice becomes an array.
fn status_json(text: &str) -> String {
    let mut keys: Vec<(&str, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        match keys.iter_mut().find(|(key, _)| *key == k) {
            Some((_, vs)) => vs.push(v),
            None => keys.push((k, vec![v])),
        }
    }
    let value = |v: &str| {
        if !v.is_empty() && v.len() < 19 && v.bytes().all(|b| b.is_ascii_digit()) {
            v.to_string()
        } else {
            json_string(v)
        }
    };
    let mut out = String::from("{");
    for (i, (k, vs)) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(k));
        out.push(':');
        if vs.len() == 1 {
            out.push_str(&value(vs[0]));
        } else {
            out.push('[');
            out.push_str(&vs.iter().map(|v| value(v)).collect::<Vec<_>>().join(","));
            out.push(']');
        }
    }
    out.push_str("}\n");
    out
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

async fn metrics_text(core: &Core) -> String {
    let shared = &core.shared;
    let ready = readiness(core).await.is_ok();
    let status = status_text(core);
    let cores: Vec<&crate::metrics::CoreMetrics> = shared.metrics.iter().map(|m| m.as_ref()).collect();
    let mode = if shared.cfg.native() {
        "native"
    } else if shared.cfg.mirror() {
        "mirror"
    } else {
        "single"
    };
    crate::metrics::render(
        &cores,
        &crate::metrics::Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            io_driver: shared.driver_name.get().copied().unwrap_or("?"),
            mode,
            threads: shared.metrics.len(),
            clients_connected: shared.clients.load(Ordering::Relaxed),
            draining: shared.draining.load(Ordering::Relaxed),
            ready,
            status: &status,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_http_from_resp_and_renders_status_json() {
        assert!(is_http(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_http(b"HEAD /readyz HTTP/1.0\r\n"));
        assert!(!is_http(b"*1\r\n$4\r\nPING\r\n"));
        assert!(!is_http(b"GET key\r\n"));
        let j = status_json("mode:native\nepoch:3\nredis:a up\nredis:b \"x\"\n");
        assert_eq!(j, "{\"mode\":\"native\",\"epoch\":3,\"redis\":[\"a up\",\"b \\\"x\\\"\"]}\n");
    }
}
