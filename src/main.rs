//! The `resplica` binary: parse flags and the config file, start the runtime threads, stop
//! gracefully on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use resplica::config::{Config, IoDriver, Sequencing};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// resplica: a thread-per-core Redis proxy that keeps standalone Redis instances in sync.
///
/// With a file:     resplica --config /etc/resplica/resplica.toml
/// Without a file:  resplica --listen 127.0.0.1:7380 --redis 127.0.0.1:6379
///                  (a drop-in proxy in front of one Redis)
///
/// Flags given together with --config override the file's values.
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// TOML configuration file (schema: conf/resplica.toml).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address clients connect to ([node] listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address of the local Redis ([redis] address).
    #[arg(long, value_name = "ADDR")]
    redis: Option<SocketAddr>,
    /// Runtime threads; 0 = one per core ([node] threads).
    #[arg(long)]
    threads: Option<usize>,
    /// auto, io_uring or epoll ([node] io_driver).
    #[arg(long, value_name = "DRIVER", value_parser = parse_driver)]
    io_driver: Option<IoDriver>,
    /// auto, slot or local ([node] sequencing): whether writes hop to their slot's
    /// sequencer core.
    #[arg(long, value_name = "MODE", value_parser = parse_sequencing)]
    sequencing: Option<Sequencing>,
    /// Password clients must AUTH with ([client] password).
    #[arg(long, value_name = "PASSWORD")]
    requirepass: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print a running node's replication status (role, epoch, each replica's state,
    /// backlog and lag) from its admin port.
    Status {
        /// The node's admin_listen address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7382")]
        admin: String,
    },
}

/// `resplica status --admin ADDR`: RESPLICA STATUS over the admin port, printed as text.
fn status(admin: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let addr = admin
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {admin}"))?
        .next()
        .with_context(|| format!("{admin} resolves to nothing"))?;
    let timeout = std::time::Duration::from_secs(3);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("cannot reach {admin}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"*2\r\n$8\r\nRESPLICA\r\n$6\r\nSTATUS\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).with_context(|| format!("no answer from {admin}"))?;
        if n == 0 {
            anyhow::bail!("{admin} closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else { continue };
        if buf[0] != b'$' {
            anyhow::bail!("unexpected answer: {}", String::from_utf8_lossy(&buf[..eol]));
        }
        let len: usize = std::str::from_utf8(&buf[1..eol])?.parse()?;
        if buf.len() >= eol + 2 + len {
            print!("{}", String::from_utf8_lossy(&buf[eol + 2..eol + 2 + len]));
            return Ok(());
        }
    }
}

fn parse_driver(s: &str) -> Result<IoDriver, String> {
    match s {
        "auto" => Ok(IoDriver::Auto),
        "io_uring" | "iouring" | "uring" => Ok(IoDriver::IoUring),
        "epoll" => Ok(IoDriver::Epoll),
        other => Err(format!("unknown io driver `{other}` (auto, io_uring, epoll)")),
    }
}

fn parse_sequencing(s: &str) -> Result<Sequencing, String> {
    match s {
        "auto" => Ok(Sequencing::Auto),
        "slot" => Ok(Sequencing::Slot),
        "local" => Ok(Sequencing::Local),
        other => Err(format!("unknown sequencing `{other}` (auto, slot, local)")),
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = match &cli.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("bad config file {}", path.display()))?
        }
        None => {
            if cli.listen.is_none() || cli.redis.is_none() {
                anyhow::bail!("give --config FILE, or both --listen ADDR and --redis ADDR (see --help)");
            }
            Config::default()
        }
    };
    if let Some(a) = cli.listen {
        cfg.node.listen = a;
    }
    if let Some(a) = cli.redis {
        cfg.redis.address = a;
    }
    if let Some(t) = cli.threads {
        cfg.node.threads = t;
    }
    if let Some(d) = cli.io_driver {
        cfg.node.io_driver = d;
    }
    if let Some(s) = cli.sequencing {
        cfg.node.sequencing = s;
    }
    if let Some(p) = &cli.requirepass {
        cfg.client.password = p.clone();
    }
    cfg.validate().context("bad configuration")?;
    Ok(cfg)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Status { admin }) = &cli.command {
        return status(admin);
    }
    let cfg = load(&cli)?;
    if cli.check {
        println!("configuration OK");
        return Ok(());
    }
    let drain = std::time::Duration::from_millis(cfg.node.drain_ms);
    let server = resplica::server::Server::start(cfg).context("cannot start")?;
    let stop = server.stop_handle();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
        .context("cannot install signal handlers")?;
    let (sig_tx, sig_rx) = std::sync::mpsc::channel::<i32>();
    std::thread::Builder::new()
        .name("resplica-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig_tx.send(sig).is_err() {
                    return;
                }
            }
        })
        .context("cannot spawn signal thread")?;
    std::thread::Builder::new()
        .name("resplica-stop".into())
        .spawn(move || {
            let Ok(sig) = sig_rx.recv() else { return };
            if sig == signal_hook::consts::SIGTERM && !drain.is_zero() {
                // Readiness first: the load balancer stops sending new clients while
                // everything still serves; then the usual graceful stop.
                tracing::info!(
                    signal = sig,
                    drain_ms = drain.as_millis() as u64,
                    "draining: /readyz answers 503, still serving until the drain period ends"
                );
                stop.drain();
                let _ = sig_rx.recv_timeout(drain);
            }
            tracing::info!(signal = sig, "stopping: no new connections, finishing in-flight commands");
            stop.stop();
        })
        .context("cannot spawn stop thread")?;
    server.join().context("runtime failed")?;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("resplica: {e:#}");
            ExitCode::FAILURE
        }
    }
}
