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
    /// Runtime threads; 0 = the CPU quota's, else one per core but one ([node] threads).
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
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Native mode: stop waiting for a Redis that cannot be reached and serve from the one
    /// that can (writes only the unreachable copy held are lost unless it returns). For when
    /// the status says writes wait for a copy you know is gone.
    Takeover {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How to reach a node's admin port.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// The node's admin_listen address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7382")]
    admin: String,
    /// A file holding the admin token ([node] admin_token); default: $RESPLICA_ADMIN_TOKEN.
    #[arg(long, value_name = "FILE")]
    token_file: Option<String>,
    /// The admin port serves TLS ([node.admin_tls]): verify it with this CA file.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<String>,
    /// With --tls-ca: the client certificate to show (when the port verifies clients).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<String>,
    /// The key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<String>,
    /// With --tls-ca: the name the port's certificate carries (default: the host of --admin).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

/// A byte stream to the admin port (TCP or TLS).
trait AdminStream: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> AdminStream for T {}

/// `resplica status|takeover --admin ADDR`: `RESPLICA <subcommand>` over the admin port
/// (after `AUTH <token>` when a token is given: `--token-file`, or `RESPLICA_ADMIN_TOKEN`);
/// the answer is printed as text (an error answer is the command's error).
fn admin_command(args: &AdminArgs, subcommand: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::net::ToSocketAddrs;
    let admin = args.admin.as_str();
    let token = match args.token_file.as_deref() {
        Some(f) => Some(
            std::fs::read_to_string(f).with_context(|| format!("cannot read the token file {f}"))?.trim().to_string(),
        ),
        None => std::env::var("RESPLICA_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    let addr = admin
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {admin}"))?
        .next()
        .with_context(|| format!("{admin} resolves to nothing"))?;
    let timeout = std::time::Duration::from_secs(3);
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("cannot reach {admin}"))?;
    tcp.set_read_timeout(Some(timeout))?;
    let mut s: Box<dyn AdminStream> = match &args.tls_ca {
        None => Box::new(tcp),
        Some(ca) => {
            let cfg = resplica::tls::TlsConfig {
                ca_file: ca.clone(),
                cert_file: args.tls_cert.clone().unwrap_or_default(),
                key_file: args.tls_key.clone().unwrap_or_default(),
                server_name: args.tls_server_name.clone().unwrap_or_default(),
                verify_clients: None,
            };
            let tls = resplica::tls::client("admin", &cfg)?;
            let name = tls.server_name(resplica::tls::host_of(admin))?;
            let conn = rustls::ClientConnection::new(tls.current(std::time::Instant::now()), name)?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
    };
    let mut buf = Vec::new();
    if let Some(t) = token {
        s.write_all(format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{t}\r\n", t.len()).as_bytes())?;
        read_admin_reply(&mut *s, &mut buf, admin)?;
    }
    s.write_all(format!("*2\r\n$8\r\nRESPLICA\r\n${}\r\n{subcommand}\r\n", subcommand.len()).as_bytes())?;
    print!("{}", read_admin_reply(&mut *s, &mut buf, admin)?);
    Ok(())
}

/// One simple-string or bulk reply from the admin port (its text); an error reply is an
/// error.
fn read_admin_reply(s: &mut dyn AdminStream, buf: &mut Vec<u8>, admin: &str) -> anyhow::Result<String> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[1..eol]).into_owned();
            match buf.first() {
                Some(b'+') => {
                    buf.drain(..eol + 2);
                    return Ok(format!("{line}\n"));
                }
                Some(b'-') => anyhow::bail!("{line}"),
                Some(b'$') => {
                    let len: usize = line.parse()?;
                    if buf.len() >= eol + 2 + len + 2 {
                        let text = String::from_utf8_lossy(&buf[eol + 2..eol + 2 + len]).into_owned();
                        buf.drain(..eol + 2 + len + 2);
                        return Ok(text);
                    }
                }
                _ => anyhow::bail!("unexpected answer: {}", String::from_utf8_lossy(&buf[..eol])),
            }
        }
        let n = s.read(&mut chunk).with_context(|| format!("no answer from {admin}"))?;
        if n == 0 {
            anyhow::bail!("{admin} closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
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
    cfg.read_files().context("bad configuration")?;
    tracing_subscriber::EnvFilter::try_new(&cfg.node.log_level)
        .map_err(|e| anyhow::anyhow!("bad configuration: node.log_level `{}`: {e}", cfg.node.log_level))?;
    Ok(cfg)
}

/// Sets the log filter (the `tracing` subscriber's reload handle).
type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send>;

fn run(cli: Cli, set_log_filter: SetLogFilter) -> anyhow::Result<()> {
    match &cli.command {
        Some(Command::Status { admin }) => return admin_command(admin, "STATUS"),
        Some(Command::Takeover { admin }) => return admin_command(admin, "TAKEOVER"),
        None => {}
    }
    let cfg = load(&cli)?;
    if cli.check {
        resplica::server::check_tls(&cfg).context("bad configuration")?;
        println!("configuration OK");
        return Ok(());
    }
    let rust_log = std::env::var_os("RUST_LOG").is_some();
    if !rust_log {
        set_log_filter(&cfg.node.log_level).map_err(|e| anyhow::anyhow!("bad configuration: node.log_level: {e}"))?;
    }
    let running = cfg.clone();
    // Before the listeners open: a SIGHUP or SIGTERM from then on is ours, not the default
    // action (which would kill the process).
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let server = resplica::server::Server::start(cfg).context("cannot start")?;
    let control = server.stop_handle();
    std::thread::Builder::new()
        .name("resplica-signals".into())
        .spawn(move || on_signals(signals, cli, running, control, set_log_filter, rust_log))
        .context("cannot spawn signal thread")?;
    server.join().context("runtime failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP reloads; SIGTERM drains (readiness off, still serving for `drain_ms`) then stops;
/// SIGINT, or a second SIGTERM while draining, stops at once.
fn on_signals(
    mut signals: signal_hook::iterator::Signals,
    cli: Cli,
    mut running: Config,
    control: resplica::server::StopHandle,
    set_log_filter: SetLogFilter,
    rust_log: bool,
) {
    use signal_hook::consts::{SIGHUP, SIGTERM};
    let mut draining_until: Option<std::time::Instant> = None;
    loop {
        let sig = match draining_until {
            None => match signals.forever().next() {
                Some(s) => s,
                None => return,
            },
            Some(until) => {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                match signals.pending().next() {
                    Some(s) => s,
                    None => {
                        std::thread::sleep(left.min(std::time::Duration::from_millis(20)));
                        continue;
                    }
                }
            }
        };
        if sig == SIGHUP {
            reload(&cli, &mut running, &control, &set_log_filter, rust_log);
            continue;
        }
        if sig == SIGTERM && draining_until.is_none() && running.node.drain_ms > 0 {
            tracing::info!(
                signal = sig,
                drain_ms = running.node.drain_ms,
                "draining: /readyz answers 503, still serving until the drain period ends"
            );
            control.drain();
            draining_until = Some(std::time::Instant::now() + std::time::Duration::from_millis(running.node.drain_ms));
            continue;
        }
        break;
    }
    tracing::info!("stopping: no new connections, finishing in-flight commands");
    control.stop();
}

/// SIGHUP: read the configuration again; apply what can change live, name what needs a
/// restart; a file that does not load keeps the running configuration.
fn reload(
    cli: &Cli,
    running: &mut Config,
    control: &resplica::server::StopHandle,
    set_log_filter: &SetLogFilter,
    rust_log: bool,
) {
    let new = match load(cli) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, keeping the running configuration: {e:#}");
            return;
        }
    };
    let mut applied = Vec::new();
    let c = (&running.client, &new.client);
    if c.0.password != c.1.password {
        applied.push("client.password");
    }
    if c.0.max_clients != c.1.max_clients {
        applied.push("client.max_clients");
    }
    if c.0.output_buffer_limit != c.1.output_buffer_limit {
        applied.push("client.output_buffer_limit");
    }
    if c.0.pubsub_output_buffer_limit != c.1.pubsub_output_buffer_limit {
        applied.push("client.pubsub_output_buffer_limit");
    }
    if c.0.refuse_commands != c.1.refuse_commands {
        applied.push("client.refuse_commands");
    }
    if running.node.drain_ms != new.node.drain_ms {
        applied.push("node.drain_ms");
    }
    if running.node.log_level != new.node.log_level {
        if rust_log {
            tracing::warn!("node.log_level changed but RUST_LOG is set and wins");
        } else if let Err(e) = set_log_filter(&new.node.log_level) {
            tracing::error!("reload refused, keeping the running configuration: node.log_level: {e}");
            return;
        } else {
            applied.push("node.log_level");
        }
    }
    // Everything else is fixed at start: compare with the live fields taken out.
    let mut fixed_old = running.clone();
    let mut fixed_new = new.clone();
    for f in [&mut fixed_old, &mut fixed_new] {
        f.client.password.clear();
        f.client.max_clients = 0;
        f.client.output_buffer_limit = resplica::config::ByteSize(0);
        f.client.pubsub_output_buffer_limit = resplica::config::ByteSize(0);
        f.client.refuse_commands.clear();
        f.node.drain_ms = 0;
        f.node.log_level.clear();
    }
    let mut restart = Vec::new();
    let sections: [(&str, String, String); 5] = [
        ("[node]", format!("{:?}", fixed_old.node), format!("{:?}", fixed_new.node)),
        ("[redis]", format!("{:?}", fixed_old.redis), format!("{:?}", fixed_new.redis)),
        ("[[peers]]", format!("{:?}", fixed_old.peers), format!("{:?}", fixed_new.peers)),
        ("[replication]", format!("{:?}", fixed_old.replication), format!("{:?}", fixed_new.replication)),
        ("[client]", format!("{:?}", fixed_old.client), format!("{:?}", fixed_new.client)),
    ];
    for (name, old, new) in sections {
        if old != new {
            restart.push(name);
        }
    }
    control.reload_client(&new.client);
    tracing::info!(
        applied = %if applied.is_empty() { "nothing".to_string() } else { applied.join(", ") },
        needs_restart = %if restart.is_empty() { "nothing".to_string() } else { restart.join(", ") },
        "configuration reloaded (SIGHUP)"
    );
    // What a restart would change stays as it runs; the live part is the new file's.
    let mut next = running.clone();
    next.client.password = new.client.password.clone();
    next.client.max_clients = new.client.max_clients;
    next.client.output_buffer_limit = new.client.output_buffer_limit;
    next.client.pubsub_output_buffer_limit = new.client.pubsub_output_buffer_limit;
    next.client.refuse_commands = new.client.refuse_commands.clone();
    next.node.drain_ms = new.node.drain_ms;
    next.node.log_level = new.node.log_level.clone();
    *running = next;
}

fn main() -> ExitCode {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter_reloading();
    let handle = builder.reload_handle();
    builder.init();
    let set_log_filter: SetLogFilter = Box::new(move |spec: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(spec).map_err(|e| format!("`{spec}`: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    let cli = Cli::parse();
    match run(cli, set_log_filter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("resplica: {e:#}");
            ExitCode::FAILURE
        }
    }
}
