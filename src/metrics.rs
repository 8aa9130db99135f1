//! Prometheus metrics: the counters the data path keeps, and the text exposition that
//! `/metrics` on the admin port serves.
//!
//! Each core owns one [`CoreMetrics`] and is its only writer: an increment is a relaxed load
//! and store in that core's own allocations (no lock prefix, no read-modify-write shared with
//! another core). A scrape sums
//! every core's values, so counters never reset while the process lives. Replication figures
//! (role, epoch, lag, merges) come from the status text the control plane publishes: one
//! source for `RESPLICA STATUS`, `/status` and `/metrics`. No I/O here.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::command::{table::COMMANDS, CommandDef};

/// Upper bounds of the command latency histogram, in microseconds (request parsed to reply
/// ready, as the proxy sees it).
pub const LATENCY_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

/// Commands not in the table (unknown names) are counted under this index.
pub fn unknown_command() -> u16 {
    COMMANDS.len() as u16
}

/// The metrics index of a top-level command.
pub fn command_index(def: &'static CommandDef) -> u16 {
    let base = COMMANDS.as_ptr() as usize;
    let at = def as *const CommandDef as usize;
    let i = at.wrapping_sub(base) / std::mem::size_of::<CommandDef>();
    if at >= base && i < COMMANDS.len() {
        i as u16
    } else {
        unknown_command()
    }
}

fn command_name(i: usize) -> &'static str {
    COMMANDS.get(i).map_or("unknown", |c| c.name)
}

/// A counter with one writer (its core) and any number of readers (scrapes).
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add `n` (only the owning core calls this).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Which Redis an upstream figure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// The local Redis.
    Local = 0,
    /// The peer's Redis (native mode).
    Peer = 1,
}

/// Per-upstream counters.
#[derive(Default)]
pub struct UpstreamMetrics {
    /// Writes (syscalls' worth of batches) sent on shared connections.
    pub batches: Counter,
    /// Commands carried by those batches.
    pub commands: Counter,
    /// Connections to this Redis that failed or were lost.
    pub errors: Counter,
    /// Connections opened (shared and dedicated).
    pub connects: Counter,
}

/// One core's counters.
#[repr(align(128))]
pub struct CoreMetrics {
    calls: Box<[Counter]>,
    errors: Box<[Counter]>,
    /// `calls.len() * (LATENCY_BUCKETS_US.len() + 1)`: per command, the count per bucket
    /// (non-cumulative; the last is +Inf).
    latency: Box<[Counter]>,
    latency_sum_us: Box<[Counter]>,
    /// Client connections accepted.
    pub clients_accepted: Counter,
    /// Client connections refused (`max_clients`).
    pub clients_rejected: Counter,
    /// Client connections whose TLS handshake failed or timed out (`[client.tls]`).
    pub tls_handshake_failures: Counter,
    /// Bytes read from clients.
    pub bytes_in: Counter,
    /// Bytes written to clients.
    pub bytes_out: Counter,
    /// Shared and dedicated connections to each Redis.
    pub upstream: [UpstreamMetrics; 2],
}

impl Default for CoreMetrics {
    fn default() -> Self {
        let n = COMMANDS.len() + 1;
        let mk = |len: usize| (0..len).map(|_| Counter::default()).collect::<Box<[Counter]>>();
        CoreMetrics {
            calls: mk(n),
            errors: mk(n),
            latency: mk(n * (LATENCY_BUCKETS_US.len() + 1)),
            latency_sum_us: mk(n),
            clients_accepted: Counter::default(),
            clients_rejected: Counter::default(),
            tls_handshake_failures: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            upstream: Default::default(),
        }
    }
}

impl CoreMetrics {
    /// A request for command `cmd` was parsed.
    #[inline]
    pub fn call(&self, cmd: u16) {
        if let Some(c) = self.calls.get(cmd as usize) {
            c.inc();
        }
    }

    /// The reply to a `cmd` request is ready after `took`; `error` when it is an error reply.
    #[inline]
    pub fn replied(&self, cmd: u16, took: Duration, error: bool) {
        let i = cmd as usize;
        if i >= self.calls.len() {
            return;
        }
        if error {
            self.errors[i].inc();
        }
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        let b = LATENCY_BUCKETS_US.iter().position(|&le| us <= le).unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[i * (LATENCY_BUCKETS_US.len() + 1) + b].inc();
        self.latency_sum_us[i].add(us);
    }
}

/// What a scrape reports besides the per-core counters.
pub struct Snapshot<'a> {
    pub version: &'a str,
    pub io_driver: &'a str,
    pub mode: &'a str,
    pub threads: usize,
    pub clients_connected: usize,
    pub draining: bool,
    pub ready: bool,
    /// The status text (`key:value` lines), for the replication figures.
    pub status: &'a str,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sum(cores: &[&CoreMetrics], f: impl Fn(&CoreMetrics) -> u64) -> u64 {
    cores.iter().map(|c| f(c)).fold(0u64, u64::wrapping_add)
}

/// Render every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render(cores: &[&CoreMetrics], snap: &Snapshot) -> String {
    let mut out = String::with_capacity(16 * 1024);
    family(&mut out, "resplica_info", "gauge", "Build and runtime facts (value 1).");
    let _ = writeln!(
        out,
        "resplica_info{{version=\"{}\",io_driver=\"{}\",mode=\"{}\",threads=\"{}\"}} 1",
        snap.version, snap.io_driver, snap.mode, snap.threads
    );
    family(&mut out, "resplica_ready", "gauge", "1 when /readyz answers 200.");
    let _ = writeln!(out, "resplica_ready {}", snap.ready as u8);
    family(&mut out, "resplica_draining", "gauge", "1 after SIGTERM while the drain period runs.");
    let _ = writeln!(out, "resplica_draining {}", snap.draining as u8);

    // Commands.
    let n = COMMANDS.len() + 1;
    let nb = LATENCY_BUCKETS_US.len() + 1;
    let calls: Vec<u64> = (0..n).map(|i| sum(cores, |c| c.calls[i].get())).collect();
    family(&mut out, "resplica_commands_total", "counter", "Requests received from clients, by command.");
    for (i, v) in calls.iter().enumerate().filter(|(_, v)| **v > 0) {
        let _ = writeln!(out, "resplica_commands_total{{cmd=\"{}\"}} {v}", command_name(i));
    }
    family(&mut out, "resplica_command_errors_total", "counter", "Error replies sent to clients, by command.");
    for (i, _) in calls.iter().enumerate().filter(|(_, v)| **v > 0) {
        let e = sum(cores, |c| c.errors[i].get());
        let _ = writeln!(out, "resplica_command_errors_total{{cmd=\"{}\"}} {e}", command_name(i));
    }
    family(
        &mut out,
        "resplica_command_duration_seconds",
        "histogram",
        "Time from a request parsed to its reply ready, by command.",
    );
    for (i, _) in calls.iter().enumerate().filter(|(_, v)| **v > 0) {
        let name = command_name(i);
        let mut cumulative = 0u64;
        for (b, le) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += sum(cores, |c| c.latency[i * nb + b].get());
            let _ = writeln!(
                out,
                "resplica_command_duration_seconds_bucket{{cmd=\"{name}\",le=\"{}\"}} {cumulative}",
                *le as f64 / 1e6
            );
        }
        cumulative += sum(cores, |c| c.latency[i * nb + nb - 1].get());
        let _ = writeln!(out, "resplica_command_duration_seconds_bucket{{cmd=\"{name}\",le=\"+Inf\"}} {cumulative}");
        let s = sum(cores, |c| c.latency_sum_us[i].get());
        let _ = writeln!(out, "resplica_command_duration_seconds_sum{{cmd=\"{name}\"}} {}", s as f64 / 1e6);
        let _ = writeln!(out, "resplica_command_duration_seconds_count{{cmd=\"{name}\"}} {cumulative}");
    }

    // Clients.
    family(&mut out, "resplica_connected_clients", "gauge", "Client connections open now.");
    let _ = writeln!(out, "resplica_connected_clients {}", snap.clients_connected);
    family(&mut out, "resplica_client_connections_total", "counter", "Client connections accepted.");
    let _ = writeln!(out, "resplica_client_connections_total {}", sum(cores, |c| c.clients_accepted.get()));
    family(
        &mut out,
        "resplica_client_connections_rejected_total",
        "counter",
        "Client connections refused (max_clients).",
    );
    let _ = writeln!(out, "resplica_client_connections_rejected_total {}", sum(cores, |c| c.clients_rejected.get()));
    family(
        &mut out,
        "resplica_client_tls_handshake_failures_total",
        "counter",
        "Client connections whose TLS handshake failed or timed out.",
    );
    let _ = writeln!(
        out,
        "resplica_client_tls_handshake_failures_total {}",
        sum(cores, |c| c.tls_handshake_failures.get())
    );
    family(&mut out, "resplica_net_input_bytes_total", "counter", "Bytes read from clients.");
    let _ = writeln!(out, "resplica_net_input_bytes_total {}", sum(cores, |c| c.bytes_in.get()));
    family(&mut out, "resplica_net_output_bytes_total", "counter", "Bytes written to clients.");
    let _ = writeln!(out, "resplica_net_output_bytes_total {}", sum(cores, |c| c.bytes_out.get()));

    // Upstream.
    let ups = [("local", Upstream::Local), ("peer", Upstream::Peer)];
    let upstream_family = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&UpstreamMetrics) -> u64| {
        family(out, name, "counter", help);
        for (label, u) in ups {
            let v = sum(cores, |c| f(&c.upstream[u as usize]));
            let _ = writeln!(out, "{name}{{redis=\"{label}\"}} {v}");
        }
    };
    upstream_family(
        &mut out,
        "resplica_upstream_batches_total",
        "Batched writes sent to a Redis on shared connections.",
        &|u| u.batches.get(),
    );
    upstream_family(
        &mut out,
        "resplica_upstream_commands_total",
        "Commands sent to a Redis on shared connections (commands per batch = this / batches).",
        &|u| u.commands.get(),
    );
    upstream_family(&mut out, "resplica_upstream_connections_total", "Connections opened to a Redis.", &|u| {
        u.connects.get()
    });
    upstream_family(
        &mut out,
        "resplica_upstream_connection_errors_total",
        "Connections to a Redis that failed or were lost.",
        &|u| u.errors.get(),
    );

    render_replication(&mut out, snap.status);
    out
}

/// Replication figures from the status text.
fn render_replication(out: &mut String, status: &str) {
    let field =
        |k: &str| status.lines().find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':'))).map(|v| v.trim());
    let number = |k: &str| field(k).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse::<f64>().ok());
    if let Some(role) = field("role") {
        family(out, "resplica_role", "gauge", "This node's role (1 for the current one).");
        for r in ["primary", "replica", "forming", "none"] {
            let _ = writeln!(out, "resplica_role{{role=\"{r}\"}} {}", (role == r) as u8);
        }
        if !["primary", "replica", "forming", "none"].contains(&role) {
            let _ = writeln!(out, "resplica_role{{role=\"{role}\"}} 1");
        }
    }
    let gauges = [
        ("epoch", "resplica_epoch", "gauge", "The pair's epoch as this node knows it."),
        ("failovers", "resplica_failovers_total", "counter", "Failovers this node carried out."),
        (
            "replica_lag_bytes",
            "resplica_replication_lag_bytes",
            "gauge",
            "Replication offset lag of the replica Redis.",
        ),
        ("recorded_keys", "resplica_recorded_keys", "gauge", "Keys recorded while cut off from the peer."),
        (
            "acks_on_primary_alone",
            "resplica_acks_on_primary_alone_total",
            "counter",
            "Writes acknowledged with only the primary holding them (write_ack all degraded).",
        ),
        (
            "unconfirmed_writes",
            "resplica_unconfirmed_writes_total",
            "counter",
            "Writes whose WAIT did not confirm a replica copy.",
        ),
        ("merged_keys", "resplica_merged_keys_total", "counter", "Keys copied into the winner by partition merges."),
        (
            "conflict_keys",
            "resplica_conflict_keys_total",
            "counter",
            "Keys written on both sides of a partition (the winner's value kept).",
        ),
        ("merges_failed", "resplica_merges_failed_total", "counter", "Partition merges that failed and were retried."),
        (
            "resyncs_full",
            "resplica_replication_full_resyncs_total",
            "counter",
            "Full resyncs the primary Redis served since it started (its INFO stats sync_full).",
        ),
        (
            "resyncs_partial",
            "resplica_replication_partial_resyncs_total",
            "counter",
            "Partial resyncs the primary Redis accepted since it started (sync_partial_ok).",
        ),
    ];
    for (k, name, kind, help) in gauges {
        if let Some(v) = number(k) {
            family(out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
    }
    if let Some(ms) = number("replica_lag_ms") {
        family(out, "resplica_replication_lag_seconds", "gauge", "Time since the replica Redis last caught up.");
        let _ = writeln!(out, "resplica_replication_lag_seconds {}", ms / 1000.0);
    }
    if let Some(link) = field("replica_link") {
        family(out, "resplica_replica_link_up", "gauge", "1 when the replica Redis's link to the primary is up.");
        let _ = writeln!(out, "resplica_replica_link_up {}", link.starts_with("up") as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counted_commands_and_status_figures() {
        let m = CoreMetrics::default();
        let get = command_index(crate::command::lookup_command(b"get").unwrap());
        m.call(get);
        m.call(get);
        m.replied(get, Duration::from_micros(300), false);
        m.replied(get, Duration::from_millis(2), true);
        m.call(unknown_command());
        let snap = Snapshot {
            version: "0",
            io_driver: "epoll",
            mode: "native",
            threads: 1,
            clients_connected: 3,
            draining: false,
            ready: true,
            status:
                "role:primary\nepoch:4\nreplica_link:up\nreplica_lag_bytes:12\nreplica_lag_ms:250\nresyncs_full:2\n",
        };
        let text = render(&[&m], &snap);
        assert!(text.contains("resplica_commands_total{cmd=\"get\"} 2"), "{text}");
        assert!(text.contains("resplica_commands_total{cmd=\"unknown\"} 1"), "{text}");
        assert!(text.contains("resplica_command_errors_total{cmd=\"get\"} 1"), "{text}");
        assert!(text.contains("resplica_command_duration_seconds_bucket{cmd=\"get\",le=\"0.0005\"} 1"), "{text}");
        assert!(text.contains("resplica_command_duration_seconds_bucket{cmd=\"get\",le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("resplica_role{role=\"primary\"} 1"), "{text}");
        assert!(text.contains("resplica_epoch 4"), "{text}");
        assert!(text.contains("resplica_replication_lag_seconds 0.25"), "{text}");
        assert!(text.contains("resplica_replica_link_up 1"), "{text}");
        assert!(text.contains("resplica_replication_full_resyncs_total 2"), "{text}");
        assert!(text.contains("resplica_info{version=\"0\",io_driver=\"epoll\""), "{text}");
    }
}
