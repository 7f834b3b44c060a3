//! Load: 1,000 concurrent SMTP sessions on loopback, each sending one message. Every message is
//! accepted and spooled, the daemon's open file descriptors return to their starting count, and the
//! daemon's peak RSS (VmHWM) is printed and bounded.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{Daemon, free_port};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const SESSIONS: usize = 1000;
/// Peak RSS the daemon may reach for this test, in KiB.
const RSS_LIMIT_KIB: u64 = 512 * 1024;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Both ends of 1,000 sessions need descriptors: raise the soft limit to the hard one (inherited by
/// the daemon).
fn raise_fd_limit() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let wanted = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, wanted);
}

async fn session(addr: std::net::SocketAddr, n: usize) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut reply = async || -> Result<String, String> {
        loop {
            let line = lines.next_line().await.map_err(|e| e.to_string())?.ok_or("closed")?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(line);
            }
        }
    };
    reply().await?;
    let data = format!("EHLO load{n}.test\r\nMAIL FROM:<load{n}@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    write.write_all(data.as_bytes()).await.map_err(|e| e.to_string())?;
    for _ in 0..4 {
        reply().await?;
    }
    let body = format!("Subject: load {n}\r\n\r\n{}\r\n.\r\nQUIT\r\n", "payload line\r\n".repeat(20));
    write.write_all(body.as_bytes()).await.map_err(|e| e.to_string())?;
    let last = reply().await?;
    let _ = reply().await;
    Ok(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions() {
    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port("127.0.0.1");
    let smtp_extra = "max_sessions = 1100\nmax_sessions_per_ip = 1100\nmax_messages_per_ip_per_minute = 5000\nmax_recipients_per_ip_per_minute = 5000\n";
    let config_extra = format!("[routes]\n\"example.test\" = \"127.0.0.1:{closed}\"\n");
    let mut bartleby = Daemon::start(dir.path(), "", &config_extra);
    bartleby.restart_with_smtp_settings(smtp_extra);
    let pid = bartleby.pid().expect("running");
    let fds_before = open_fds(pid);
    let addr = bartleby.smtp;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(SESSIONS));
    for n in 0..SESSIONS {
        let barrier = std::sync::Arc::clone(&barrier);
        tasks.spawn(async move {
            barrier.wait().await;
            tokio::time::timeout(Duration::from_secs(120), session(addr, n)).await.unwrap_or(Err("timeout".into()))
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            Ok(line) if line.starts_with("250") => {}
            other => failures.push(format!("{other:?}")),
        }
    }
    assert!(failures.is_empty(), "{} sessions failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let elapsed = started.elapsed();
    assert_eq!(bartleby.queue().len(), SESSIONS, "every message is spooled");
    // Sessions close asynchronously; give the daemon a moment to drop the sockets.
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds(pid) > fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fds_after = open_fds(pid);
    let rss = peak_rss_kib(pid);
    println!("load: {SESSIONS} sessions in {elapsed:?}; fds {fds_before} -> {fds_after}; peak RSS {} MiB", rss / 1024);
    assert!(fds_after <= fds_before, "descriptors leaked: {fds_before} before, {fds_after} after");
    assert!(rss > 0 && rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");
    bartleby.stop();
}
