//! resplica: a thread-per-core Redis sidecar proxy.
//!
//! Layout, from the wire inwards:
//! - [`resp`]: RESP framing (requests, replies, errors), incremental and zero-copy. No I/O.
//! - [`command`]: the command table generated from Redis 7 and key extraction. No I/O.
//! - [`slot`]: key → slot (CRC16, hashtags). No I/O.
//! - [`session`]: per-client state and the decision for each request (answer locally,
//!   forward on a shared lane or on a dedicated connection, wait). No I/O, no clock.
//! - [`replication`]: the pair's writer election, ordered replication streams, effects,
//!   backlog, resync and merge. No I/O, no clock.
//! - [`route`]: native mode's routing facts (write target, local reads, recorded keys),
//!   published by the control plane for every core. No I/O.
//! - [`config`]: the TOML configuration with defaults and validation.
//! - [`metrics`]: per-core counters and the Prometheus text the admin port serves. No I/O.
//! - [`peer_auth`]: the peer-link handshake (mutual HMAC challenge-response; the secret never
//!   travels). No I/O.
//! - [`server`]: the thin monoio shell that runs all of the above on sockets.

pub mod command;
pub mod config;
pub mod metrics;
pub mod peer_auth;
pub mod replication;
pub mod resp;
pub mod route;
pub mod server;
pub mod session;
pub mod slot;
pub mod tls;
