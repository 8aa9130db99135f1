//! Configuration: one serde struct per section of the TOML file (DESIGN.md, "Configuration"),
//! every field with a constant default, and `validate` that rejects a bad file naming the
//! field and the reason. Reading files and command-line flags happens in `main`; this module
//! only turns text into a checked `Config`.

use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

pub use crate::tls::TlsConfig;

/// A configuration that cannot be used. The text names the field and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML does not parse, has an unknown field, or a value of the wrong type.
    #[error("{0}")]
    Syntax(String),
    /// A field parsed but its value is not acceptable.
    #[error("invalid value for `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A file the configuration names (`replication.secret_file`) cannot be read.
    #[error("cannot read `{field}` file {path}: {reason}")]
    File { field: &'static str, path: String, reason: String },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub redis: RedisConfig,
    pub peers: Vec<PeerConfig>,
    pub replication: ReplicationConfig,
    pub client: ClientConfig,
}

/// Which io driver the runtime threads use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring where the kernel and seccomp profile allow it, else epoll.
    Auto,
    /// io_uring or fail at start.
    IoUring,
    /// epoll even where io_uring works.
    Epoll,
}

/// How writes pick their upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sequencing {
    /// `slot` when the node has peers, `local` when it is alone. (With peers, writes go to
    /// the pair's writer whatever this says; it only orders a lone node's writes.)
    Auto,
    /// Every write goes through its slot's sequencer core (`slot % threads`).
    Slot,
    /// Everything goes through the receiving core's own upstream connection.
    Local,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub id: String,
    pub priority: u32,
    pub listen: SocketAddr,
    pub peer_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    pub io_driver: IoDriver,
    pub sequencing: Sequencing,
    /// On SIGTERM, how long `/readyz` answers 503 while everything still serves, before the
    /// listeners close and in-flight commands finish (Kubernetes: time for the endpoints to
    /// drop the pod). SIGINT stops at once; a second SIGTERM ends the drain early.
    pub drain_ms: u64,
    /// Log filter (`tracing` EnvFilter syntax: `info`, `debug`, `resplica=debug,warn`);
    /// `RUST_LOG`, when set, wins. Changes on SIGHUP.
    pub log_level: String,
    /// When set, the admin port serves status, metrics and `RESPLICA TAKEOVER` only to a
    /// request with this bearer token (HTTP `Authorization: Bearer`, RESP `AUTH <token>`);
    /// `/livez` and `/readyz` stay open for probes. "" = no token.
    pub admin_token: String,
    /// Or read the token from a file (a mounted Secret). "" = none.
    pub admin_token_file: String,
    /// With `[client.tls]`: a second client port serving plaintext (e.g. for a sidecar's
    /// own health checks on loopback). None = TLS only.
    pub plaintext_listen: Option<SocketAddr>,
    /// `[node.admin_tls]`: the admin port serves HTTPS and RESP over TLS.
    pub admin_tls: Option<TlsConfig>,
}

/// `[node] drain_ms` by default: stop at once (set it for Kubernetes; conf/resplica.toml does).
pub const DEFAULT_DRAIN_MS: u64 = 0;

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "a".into(),
            priority: 100,
            listen: ([0, 0, 0, 0], 7380).into(),
            peer_listen: ([0, 0, 0, 0], 7381).into(),
            admin_listen: ([127, 0, 0, 1], 7382).into(),
            threads: 0,
            io_driver: IoDriver::Auto,
            sequencing: Sequencing::Auto,
            drain_ms: DEFAULT_DRAIN_MS,
            log_level: "info".into(),
            admin_token: String::new(),
            admin_token_file: String::new(),
            plaintext_listen: None,
            admin_tls: None,
        }
    }
}

/// `[redis]`: the local standalone Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub address: SocketAddr,
    pub username: String,
    pub password: String,
    pub connect_timeout_ms: u64,
    /// A client waiting longer than this for Redis gets `-ERR` and the connection is reset.
    pub request_timeout_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// How many batches a shared connection keeps in flight before it holds new requests
    /// back to send them together when one is answered (an idle connection writes at once).
    /// 0 = write whatever arrived every event-loop turn.
    pub pipeline_batches: usize,
    /// `[redis.tls]`: TLS to the Redis (own and, in a pair, the peer's): `ca_file` verifies
    /// it, `cert_file`/`key_file` are the client certificate Redis's `tls-auth-clients` asks for.
    pub tls: Option<TlsConfig>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            address: ([127, 0, 0, 1], 6379).into(),
            username: String::new(),
            password: String::new(),
            connect_timeout_ms: 1000,
            request_timeout_ms: 5000,
            reconnect_backoff_max_ms: 2000,
            pipeline_batches: DEFAULT_PIPELINE_BATCHES,
            tls: None,
        }
    }
}

/// Default `[redis] pipeline_batches`: one batch in flight per shared connection. Measured
/// on the 2-core machine (redis-benchmark -c 50 -P 1 SET, one runtime thread): Redis saw
/// 7.4–8.9 commands per read instead of 5.1–6.7, and the proxy spent 12–13 CPU-s per
/// million requests instead of 15–18.
pub const DEFAULT_PIPELINE_BATCHES: usize = 1;

/// One `[[peers]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: String,
    pub address: String,
    pub redis: String,
    #[serde(default)]
    pub priority: Option<u32>,
}

/// `write_ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteAck {
    All,
    Local,
}

/// `[replication] mode`: how a write reaches both Redis of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationMode {
    /// Redis's own replication, steered by the sidecars (DESIGN.md N1–N7).
    Native,
    /// The sidecars apply every write to every Redis (the writer's sequencer, M1–M7).
    Mirror,
}

/// `[replication] lone_start`: what a native-mode sidecar does when it starts and neither
/// the peer's sidecar nor its Redis answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoneStart {
    /// After `failover_timeout_ms`, serve from the local Redis as primary (its writes are
    /// recorded and merged when the peer returns, as after a partition).
    AfterTimeout,
    /// Wait until the peer's Redis or sidecar answers.
    Never,
}

/// Default `[replication] ack_timeout_ms`: how long `write_ack = "all"` waits for the replica.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 1000;

/// `[replication]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    pub mode: ReplicationMode,
    pub write_ack: WriteAck,
    pub failover_timeout_ms: u64,
    pub backlog_bytes: ByteSize,
    pub secret: String,
    /// A file holding the secret (a mounted Kubernetes Secret), instead of `secret`; read at
    /// start by [`Config::read_files`]; surrounding whitespace is ignored.
    pub secret_file: String,
    /// Native mode: the `WAIT 1 <ack_timeout_ms>` ending each batch that carries writes.
    pub ack_timeout_ms: u64,
    /// Native mode: 1 = refuse writes while the replica is not connected (Redis's own
    /// `min-replicas-to-write`, set on the primary by the sidecar); 0 = acknowledge on the
    /// primary alone and say so.
    pub min_replicas_to_write: u32,
    pub lone_start: LoneStart,
    /// `[replication.tls]`: the peer link over TLS, mutual by default (each sidecar shows
    /// `cert_file` and verifies the other's against `ca_file`).
    pub tls: Option<TlsConfig>,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            mode: ReplicationMode::Native,
            write_ack: WriteAck::All,
            failover_timeout_ms: 1000,
            backlog_bytes: ByteSize(256 << 20),
            secret: String::new(),
            secret_file: String::new(),
            ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
            min_replicas_to_write: 0,
            lone_start: LoneStart::AfterTimeout,
            tls: None,
        }
    }
}

/// Commands refused by default: they would change the topology or stop the server behind
/// the proxy's back, or they only make sense on a direct connection.
pub const DEFAULT_REFUSED: &[&str] = &[
    "replicaof",
    "slaveof",
    "shutdown",
    "failover",
    "cluster",
    "debug",
    "sync",
    "psync",
    "module",
    "migrate",
    "restore-asking",
    "asking",
    "readonly",
    "readwrite",
];

/// `[client]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    pub password: String,
    pub max_clients: usize,
    /// Reply bytes waiting for a slow client beyond which it is disconnected.
    pub output_buffer_limit: ByteSize,
    /// The same for clients in pub/sub or MONITOR mode, whose output is not request-driven.
    pub pubsub_output_buffer_limit: ByteSize,
    pub proto_max_bulk_len: ByteSize,
    pub refuse_commands: Vec<String>,
    /// With a `password`: a connection that has not authenticated within this long is told
    /// so and closed (0: never).
    pub auth_timeout_ms: u64,
    /// `[client.tls]`: `[node] listen` serves TLS only.
    pub tls: Option<TlsConfig>,
}

/// Default `[client] auth_timeout_ms`.
pub const DEFAULT_AUTH_TIMEOUT_MS: u64 = 10_000;

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            password: String::new(),
            max_clients: 10000,
            output_buffer_limit: ByteSize(256 << 20),
            pubsub_output_buffer_limit: ByteSize(32 << 20),
            proto_max_bulk_len: ByteSize(512 << 20),
            refuse_commands: DEFAULT_REFUSED.iter().map(|s| s.to_string()).collect(),
            auth_timeout_ms: DEFAULT_AUTH_TIMEOUT_MS,
            tls: None,
        }
    }
}

/// A size written as a number of bytes or a string with a unit (`"256MiB"`, `"1gb"`, `"64k"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 =
            num.parse().map_err(|_| format!("`{s}` is not a size (examples: 1048576, \"64KiB\", \"256MiB\")"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => return Err(format!("unknown size unit `{other}` (use B, KiB, MiB or GiB)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The trimmed content of a file holding a secret (`None`: no file named).
fn read_secret_file(field: &'static str, path: &str) -> Result<Option<String>, ConfigError> {
    if path.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        field,
        path: path.to_string(),
        reason: e.to_string(),
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(ConfigError::File { field, path: path.to_string(), reason: "the file is empty".into() });
    }
    Ok(Some(secret.to_string()))
}

impl Config {
    /// Read the files the configuration names (`replication.secret_file` into `secret`,
    /// `node.admin_token_file` into `admin_token`).
    pub fn read_files(&mut self) -> Result<(), ConfigError> {
        if let Some(s) = read_secret_file("replication.secret_file", &self.replication.secret_file)? {
            self.replication.secret = s;
            self.replication.secret_file.clear();
        }
        if let Some(s) = read_secret_file("node.admin_token_file", &self.node.admin_token_file)? {
            self.node.admin_token = s;
            self.node.admin_token_file.clear();
        }
        Ok(())
    }

    /// Parse and validate a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.node.id.is_empty() {
            return bad("node.id", "must not be empty".into());
        }
        if self.node.threads > 1024 {
            return bad(
                "node.threads",
                format!(
                    "{} is more threads than makes sense (0 = chosen from the cores, see conf/resplica.toml)",
                    self.node.threads
                ),
            );
        }
        if self.redis.request_timeout_ms == 0 {
            return bad("redis.request_timeout_ms", "must be greater than 0".into());
        }
        if self.redis.connect_timeout_ms == 0 {
            return bad("redis.connect_timeout_ms", "must be greater than 0".into());
        }
        if self.client.max_clients == 0 {
            return bad("client.max_clients", "must be greater than 0".into());
        }
        if self.client.proto_max_bulk_len.0 < 1024 || self.client.proto_max_bulk_len.0 > (i32::MAX as u64) * 2 {
            return bad("client.proto_max_bulk_len", "must be between 1KiB and 4GiB".into());
        }
        if self.client.output_buffer_limit.0 < 1 << 16 {
            return bad("client.output_buffer_limit", "must be at least 64KiB".into());
        }
        if self.client.pubsub_output_buffer_limit.0 < 1 << 16 {
            return bad("client.pubsub_output_buffer_limit", "must be at least 64KiB".into());
        }
        let mut seen = std::collections::HashSet::new();
        seen.insert(self.node.id.as_str());
        for p in &self.peers {
            if !seen.insert(p.id.as_str()) {
                return bad("peers.id", format!("`{}` is used twice (node ids must be unique in the group)", p.id));
            }
        }
        for p in &self.peers {
            if p.address.is_empty() {
                return bad("peers.address", format!("peer `{}` needs the address of its peer_listen", p.id));
            }
            if p.redis.is_empty() {
                return bad("peers.redis", format!("peer `{}` needs the address of its Redis", p.id));
            }
        }
        if !self.node.admin_token.is_empty() && !self.node.admin_token_file.is_empty() {
            return bad("node.admin_token_file", "give `admin_token` or `admin_token_file`, not both".into());
        }
        if !self.replication.secret.is_empty() && !self.replication.secret_file.is_empty() {
            return bad("replication.secret_file", "give `secret` or `secret_file`, not both".into());
        }
        if !self.peers.is_empty() && self.replication.secret.is_empty() && self.replication.secret_file.is_empty() {
            return bad(
                "replication.secret",
                "must be set when [[peers]] are configured (the peer link refuses anyone without it)".into(),
            );
        }
        if self.replication.min_replicas_to_write > 1 {
            return bad("replication.min_replicas_to_write", "must be 0 or 1 (a pair has one replica)".into());
        }
        if self.replication.ack_timeout_ms == 0
            || (self.native() && self.replication.ack_timeout_ms >= self.redis.request_timeout_ms)
        {
            return bad(
                "replication.ack_timeout_ms",
                format!(
                    "must be greater than 0 and below [redis] request_timeout_ms ({})",
                    self.redis.request_timeout_ms
                ),
            );
        }
        if self.native() && self.peers.len() > 1 {
            return bad("peers", "native mode runs pairs: exactly one [[peers]] entry".into());
        }
        if self.node.plaintext_listen.is_some() && self.client.tls.is_none() {
            return bad(
                "node.plaintext_listen",
                "is a plaintext port beside [client.tls]; without TLS use `listen`".into(),
            );
        }
        if self.node.plaintext_listen == Some(self.node.listen) {
            return bad("node.plaintext_listen", "must differ from `listen`".into());
        }
        if self.replication.failover_timeout_ms < 100 {
            return bad("replication.failover_timeout_ms", "must be at least 100".into());
        }
        Ok(())
    }

    /// Runtime threads to start: `node.threads`; with 0, the CPUs this process may use when
    /// a CPU quota or affinity mask limits it (a Kubernetes container with `limits: cpu`),
    /// else one per core but one, which the Redis beside it uses. Measured on the 2-core
    /// machine with Redis and redis-benchmark on the same cores (-c 50 -P 1, perf/bench):
    /// one thread reached 0.94x (SET) and 0.91x (GET) direct Redis at 12-13 CPU-s per
    /// million requests, two threads 0.72x and 0.84x at 16-17.
    pub fn thread_count(&self) -> usize {
        if self.node.threads > 0 {
            return self.node.threads;
        }
        let available = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        // SAFETY: sysconf only reads a system value.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let online = usize::try_from(online).unwrap_or(available).max(1);
        if available < online {
            available
        } else {
            (online - 1).max(1)
        }
    }

    /// Whether writes take the hop to their slot's sequencer core.
    pub fn slot_sequencing(&self) -> bool {
        match self.node.sequencing {
            Sequencing::Slot => true,
            Sequencing::Local => false,
            Sequencing::Auto => self.mirror(),
        }
    }

    /// A pair on Redis's own replication.
    pub fn native(&self) -> bool {
        !self.peers.is_empty() && self.replication.mode == ReplicationMode::Native
    }

    /// A pair (or group) on the sidecars' own sequencer.
    pub fn mirror(&self) -> bool {
        !self.peers.is_empty() && self.replication.mode == ReplicationMode::Mirror
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_sizes() {
        let c = Config::from_toml("[client]\noutput_buffer_limit = \"1MiB\"\n").unwrap();
        assert_eq!(c.client.output_buffer_limit, ByteSize(1 << 20));
        assert_eq!(c.redis.address.port(), 6379);
        assert!(c.client.refuse_commands.iter().any(|c| c == "shutdown"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::from_toml("[node]\nthreds = 2\n").unwrap_err().to_string();
        assert!(e.contains("threds"), "{e}");
        let e = Config::from_toml("[redis]\naddress = \"nowhere\"\n").unwrap_err().to_string();
        assert!(e.contains("address"), "{e}");
        let e = Config::from_toml("[client]\nmax_clients = 0\n").unwrap_err().to_string();
        assert!(e.contains("client.max_clients"), "{e}");
        let e = Config::from_toml("[replication]\nbacklog_bytes = \"12 parsecs\"\n").unwrap_err().to_string();
        assert!(e.contains("backlog_bytes") || e.contains("parsecs"), "{e}");
    }
}
