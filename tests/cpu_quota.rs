//! `threads = 0` follows the CPU quota (Kubernetes `limits: cpu` is a CFS quota): resplica
//! started inside a cgroup with a 50% quota runs one runtime thread, and with 150% one as well
//! (the standard library rounds the quota down, at least 1), while without a quota it runs
//! one per core but one (the Redis beside it gets a core). Needs a writable cgroup cpu controller (v1 `cpu.cfs_quota_us` or v2
//! `cpu.max`), i.e. root; elsewhere the test says so and passes without checking.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, wait_until, RedisServer};

/// A cgroup with a CPU quota, removed on drop.
struct QuotaGroup {
    dir: PathBuf,
}

impl QuotaGroup {
    /// `millicores` of CPU (100 ms period), or `None` when no cpu controller is writable here.
    fn new(millicores: u64) -> Option<QuotaGroup> {
        let name = format!("resplica-test-{}-{millicores}", std::process::id());
        let quota = millicores * 100;
        // cgroup v1
        let v1 = PathBuf::from("/sys/fs/cgroup/cpu");
        if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(&name);
            std::fs::create_dir(&dir).ok()?;
            let g = QuotaGroup { dir };
            std::fs::write(g.dir.join("cpu.cfs_period_us"), "100000").ok()?;
            std::fs::write(g.dir.join("cpu.cfs_quota_us"), quota.to_string()).ok()?;
            return Some(g);
        }
        // cgroup v2
        let v2 = PathBuf::from("/sys/fs/cgroup");
        if v2.join("cgroup.controllers").exists() {
            let dir = v2.join(&name);
            std::fs::create_dir(&dir).ok()?;
            let g = QuotaGroup { dir };
            std::fs::write(g.dir.join("cpu.max"), format!("{quota} 100000")).ok()?;
            return Some(g);
        }
        None
    }
}

impl Drop for QuotaGroup {
    fn drop(&mut self) {
        // The processes left already (killed and reaped by the caller).
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Start resplica (threads = 0) inside `group` (or none), return the thread count it logs.
fn threads_started(redis: &RedisServer, group: Option<&QuotaGroup>) -> usize {
    let port = free_port();
    let admin = free_port();
    let bin = env!("CARGO_BIN_EXE_resplica");
    let cfg = std::env::temp_dir().join(format!("resplica-quota-{}-{port}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nthreads = 0\n\n[redis]\naddress = \"{}\"\n",
            redis.addr()
        ),
    )
    .expect("write config");
    let log = std::env::temp_dir().join(format!("resplica-quota-{}-{port}.log", std::process::id()));
    let logf = std::fs::File::create(&log).expect("log file");
    // Join the cgroup before exec, so every thread resplica starts is in it.
    let join = match group {
        Some(g) => format!("echo $$ > {}/cgroup.procs && ", g.dir.display()),
        None => String::new(),
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{join}exec {bin} --config {}", cfg.display()))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn resplica");
    let ready = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("resplica ready"))
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&cfg);
    let _ = std::fs::remove_file(&log);
    assert!(ready, "resplica did not start:\n{text}");
    let line = text.lines().find(|l| l.contains("resplica ready")).unwrap_or("");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("threads="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no threads= in {line:?}"))
}

#[test]
fn threads_zero_follows_the_cfs_quota() {
    let redis = RedisServer::start();
    let (Some(half), Some(one_and_half)) = (QuotaGroup::new(500), QuotaGroup::new(1500)) else {
        eprintln!("skipped: no writable cgroup cpu controller here (needs root)");
        return;
    };
    assert_eq!(threads_started(&redis, Some(&half)), 1, "500m quota");
    assert_eq!(threads_started(&redis, Some(&one_and_half)), 1, "1500m quota (rounded down)");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(threads_started(&redis, None), (cores - 1).max(1), "no quota: one thread per core but one (Redis's)");
}
