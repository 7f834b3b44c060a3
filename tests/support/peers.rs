//! Real peers for integration tests, on loopback: dnsmasq as the DNS server, Postfix as the
//! primary MX (Maildir virtual mailboxes), Postfix's `smtp-sink` as a counting sink.
//! `/work/shared/TESTING.md` explains the recipes; this file turns them into guards that stop what
//! they started on Drop.
//!
//! Include it with `#[path = "support/peers.rs"] mod peers;`. Everything here is synchronous
//! (std::process and std::net), so it works from plain and `#[tokio::test]` tests alike; every
//! wait has a deadline.
//!
//! Peers on fixed addresses (127.0.0.53:53, 127.0.0.2:25, ...) collide when test binaries run in
//! parallel, so a test that uses them first takes [`PeersLock::acquire`] and holds it until its
//! peers are dropped (declare it first: locals drop in reverse order).
#![allow(dead_code)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Why a peer could not be started, stopped or read; the message carries the peer's own log.
#[derive(Debug)]
pub struct PeerError(pub String);

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerError {}

pub type Result<T> = std::result::Result<T, PeerError>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(PeerError(msg.into()))
}

fn io_context(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> PeerError {
    move |e| PeerError(format!("{what}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Serialising tests that use fixed addresses

/// The lock file shared by every test binary of this repository.
pub const LOCK_PATH: &str = "/tmp/bartleby-peers.lock";

/// How long a test waits for another test's peers before giving up.
pub const LOCK_WAIT: Duration = Duration::from_secs(600);

/// How many [`PeersLock`]s this process holds; starting a fixed-port peer without one is a bug.
static LOCKS_HELD: AtomicUsize = AtomicUsize::new(0);

/// An exclusive `flock` on [`LOCK_PATH`], held until dropped. flock locks belong to the open
/// file, so two tests in one binary exclude each other as well as tests in other binaries.
pub struct PeersLock {
    /// Closing the file releases the lock.
    _file: File,
}

impl PeersLock {
    /// Waits (at most [`LOCK_WAIT`]) for the lock.
    pub fn acquire() -> Result<PeersLock> {
        use rustix::fs::{FlockOperation, flock};
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .map_err(io_context(LOCK_PATH))?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
                Err(e) => return err(format!("flock {LOCK_PATH}: {e}")),
            }
            if Instant::now() > deadline {
                return err(format!("{LOCK_PATH} still locked after {LOCK_WAIT:?}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
        LOCKS_HELD.fetch_add(1, Ordering::SeqCst);
        Ok(PeersLock { _file: file })
    }
}

impl Drop for PeersLock {
    fn drop(&mut self) {
        LOCKS_HELD.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Fails unless a [`PeersLock`] is held when a peer wants a privileged (fixed) port.
fn require_lock(port: u16, what: &str) -> Result<()> {
    if port < 1024 && LOCKS_HELD.load(Ordering::SeqCst) == 0 {
        return err(format!("{what} on fixed port {port}: take peers::PeersLock::acquire() first"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A free TCP port on `ip` that is also free for UDP (dnsmasq needs both). Another process may
/// take it before the caller binds it, so prefer binding port 0 where the server allows it.
pub fn free_loopback_port(ip: Ipv4Addr) -> Result<u16> {
    for _ in 0..50 {
        let tcp = TcpListener::bind((ip, 0)).map_err(io_context(format!("bind {ip}:0")))?;
        let port = tcp.local_addr().map_err(io_context("local_addr"))?.port();
        if UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    err(format!("no port on {ip} free for both TCP and UDP"))
}

/// A child process that is killed and reaped when the guard is dropped.
pub struct ChildGuard {
    child: Child,
    /// For error messages.
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd` (stdin is closed).
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<ChildGuard> {
        let child = cmd.stdin(Stdio::null()).spawn().map_err(io_context(format!("spawn {name}")))?;
        Ok(ChildGuard { child, name: name.to_string() })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Has the process exited? Gives its status if so.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion, killing it after `limit`; output is captured.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let name = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_context(format!("spawn {name}")))?;
    // Readers on threads, so a chatty child cannot block on a full pipe while we poll.
    let out = child.stdout.take().map(read_in_background);
    let errs = child.stderr.take().map(read_in_background);
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return err(format!("{name} did not finish within {limit:?}"));
            }
            Err(e) => return err(format!("wait for {name}: {e}")),
        }
    };
    let join = |h: Option<thread::JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output { status, stdout: join(out), stderr: join(errs) })
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// [`run_bounded`], failing unless the command exits 0; the error shows its output.
fn run_ok(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = run_bounded(cmd, limit)?;
    if !out.status.success() {
        return err(format!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// The last `lines` lines of a log file, or a note that it is missing.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Polls `ready` every 50 ms until it returns true or `limit` passes.
fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A private directory that peers running as other users (postfix, nobody) can traverse.
fn peer_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().map_err(io_context("tempdir"))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).map_err(io_context("chmod tempdir"))?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// DNS: dnsmasq

/// One record for [`Dnsmasq`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsRecord {
    /// `domain MX pref host`.
    Mx { domain: String, host: String, pref: u16 },
    /// RFC 7505 null MX (`domain MX 0 .`): the domain accepts no mail.
    NullMx { domain: String },
    /// `name A ip` (dnsmasq `host-record`, which also answers the PTR).
    A { name: String, ip: Ipv4Addr },
}

impl DnsRecord {
    pub fn mx(domain: &str, host: &str, pref: u16) -> DnsRecord {
        DnsRecord::Mx { domain: domain.into(), host: host.into(), pref }
    }

    pub fn null_mx(domain: &str) -> DnsRecord {
        DnsRecord::NullMx { domain: domain.into() }
    }

    pub fn a(name: &str, ip: Ipv4Addr) -> DnsRecord {
        DnsRecord::A { name: name.into(), ip }
    }

    fn name(&self) -> &str {
        match self {
            DnsRecord::Mx { domain, .. } | DnsRecord::NullMx { domain } => domain,
            DnsRecord::A { name, .. } => name,
        }
    }

    fn conf_line(&self) -> String {
        match self {
            DnsRecord::Mx { domain, host, pref } => format!("mx-host={domain},{host},{pref}"),
            DnsRecord::NullMx { domain } => format!("mx-host={domain},.,0"),
            DnsRecord::A { name, ip } => format!("host-record={name},{ip}"),
        }
    }
}

/// dnsmasq answering only from `records`: it forwards nothing (no upstream servers), and names
/// under the records' top-level domains that are not listed get an authoritative NXDOMAIN
/// (`local=/tld/`), as a real zone would. Killed on Drop.
pub struct Dnsmasq {
    child: ChildGuard,
    addr: SocketAddrV4,
    /// Holds the config file, pid file and log; removed on Drop.
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// dnsmasq on `listen`, port 53 (needs a [`PeersLock`]).
    pub fn start(listen: Ipv4Addr, records: &[DnsRecord]) -> Result<Dnsmasq> {
        Dnsmasq::start_at(SocketAddrV4::new(listen, 53), records)
    }

    /// dnsmasq on any address and port, e.g. one from [`free_loopback_port`] (no lock needed).
    pub fn start_at(addr: SocketAddrV4, records: &[DnsRecord]) -> Result<Dnsmasq> {
        require_lock(addr.port(), "dnsmasq")?;
        let dir = peer_dir("bartleby-dnsmasq-")?;
        let conf = dir.path().join("dnsmasq.conf");
        fs::write(&conf, dnsmasq_conf(addr, records)).map_err(io_context("write dnsmasq.conf"))?;
        let log_path = dir.path().join("dnsmasq.log");
        let log = File::create(&log_path).map_err(io_context("create dnsmasq.log"))?;
        let mut cmd = Command::new("dnsmasq");
        cmd.arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .arg(format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()))
            .arg("--log-facility=-")
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = ChildGuard::spawn(&mut cmd, "dnsmasq")?;
        let up = wait_until(Duration::from_secs(10), || child.exited().is_none() && dns_answers(addr));
        if !up {
            return err(format!("dnsmasq on {addr} did not answer:\n{}", tail(&log_path, 20)));
        }
        Ok(Dnsmasq { child, addr, dir })
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// What dnsmasq logged so far.
    pub fn log(&self) -> String {
        tail(&self.dir.path().join("dnsmasq.log"), 200)
    }

    /// Stops it now rather than at the end of the scope.
    pub fn stop(mut self) {
        self.child.kill();
    }
}

fn dnsmasq_conf(addr: SocketAddrV4, records: &[DnsRecord]) -> String {
    let mut conf =
        format!("port={}\nlisten-address={}\nbind-interfaces\nno-resolv\nno-hosts\nno-poll\n", addr.port(), addr.ip());
    let mut tlds: Vec<&str> =
        records.iter().filter_map(|r| r.name().trim_end_matches('.').rsplit('.').next()).collect();
    tlds.sort_unstable();
    tlds.dedup();
    for tld in tlds {
        conf.push_str(&format!("local=/{tld}/\n"));
    }
    for record in records {
        conf.push_str(&record.conf_line());
        conf.push('\n');
    }
    conf
}

/// Does a DNS server answer on `addr`? Sends one hand-made query (RFC 1035 section 4.1) and
/// accepts any reply with the same ID, whatever its rcode: we only want to know it listens.
fn dns_answers(addr: SocketAddrV4) -> bool {
    let Ok(sock) = UdpSocket::bind((*addr.ip(), 0)).or_else(|_| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let id = fastrand::u16(..).to_be_bytes();
    let mut query = vec![id[0], id[1], 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["bartleby-ready", "invalid"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root label, QTYPE A, QCLASS IN
    if sock.send_to(&query, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(sock.recv_from(&mut buf), Ok((n, from)) if n >= 2 && buf[..2] == id && from == SocketAddr::V4(addr))
}

/// `dig +short @server name rtype`, one line per answer (bounded: one try of 2 s).
pub fn dig(server: SocketAddrV4, name: &str, rtype: &str) -> Result<Vec<String>> {
    let out = run_ok(
        Command::new("dig").arg(format!("@{}", server.ip())).args([
            "-p",
            &server.port().to_string(),
            "+short",
            "+time=2",
            "+tries=1",
            name,
            rtype,
        ]),
        Duration::from_secs(10),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

// ---------------------------------------------------------------------------------------------
// SMTP helpers

/// Does an SMTP server on `addr` greet with 220? Sends QUIT afterwards.
pub fn smtp_greets(addr: SocketAddrV4) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let greeted = BufReader::new(&stream).read_line(&mut line).is_ok() && line.starts_with("220");
    let _ = stream.write_all(b"QUIT\r\n");
    greeted
}

/// Sends one message with swaks (bounded to 30 s); `extra` adds swaks arguments
/// (e.g. `["--header", "Subject: x"]`). Returns swaks' transcript.
pub fn swaks(server: SocketAddrV4, from: &str, to: &str, extra: &[&str]) -> Result<String> {
    let out = run_ok(
        Command::new("swaks")
            .args(["--server", &server.ip().to_string(), "--port", &server.port().to_string()])
            .args(["--from", from, "--to", to, "--timeout", "20"])
            .args(extra),
        Duration::from_secs(30),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Postfix as the primary MX

/// How long Postfix may take to start or stop.
const POSTFIX_WAIT: Duration = Duration::from_secs(30);

/// A private Postfix instance: the primary MX for `domain`, delivering to Maildir virtual
/// mailboxes under its own directory; unknown users get `550 5.1.1` at RCPT. Stopped on Drop.
pub struct Postfix {
    /// Holds etc/, queue/, data/, mail/ and maillog; removed on Drop.
    dir: tempfile::TempDir,
    listen: SocketAddrV4,
    domain: String,
    running: bool,
}

impl Postfix {
    /// Starts Postfix listening on `listen` (e.g. 127.0.0.2:25) for `domain`, with the local
    /// parts in `mailboxes`. Port 25 needs a [`PeersLock`].
    pub fn start(listen: SocketAddrV4, domain: &str, mailboxes: &[&str]) -> Result<Postfix> {
        Postfix::start_with(listen, domain, mailboxes, &[])
    }

    /// [`Postfix::start`] with extra `main.cf` settings, e.g. `("message_size_limit", "100000")`
    /// or `("smtpd_recipient_restrictions", "defer")` to make it answer 4xx.
    pub fn start_with(
        listen: SocketAddrV4,
        domain: &str,
        mailboxes: &[&str],
        settings: &[(&str, &str)],
    ) -> Result<Postfix> {
        require_lock(listen.port(), "postfix")?;
        let dir = peer_dir("bartleby-postfix-")?;
        let mut postfix = Postfix { dir, listen, domain: domain.to_string(), running: false };
        postfix.configure(mailboxes, settings)?;
        postfix.resume()?;
        Ok(postfix)
    }

    /// Writes main.cf and master.cf and creates the queue (the TESTING.md recipe).
    fn configure(&self, mailboxes: &[&str], settings: &[(&str, &str)]) -> Result<()> {
        let (etc, data, mail) = (self.etc(), self.path("data"), self.path("mail"));
        for d in [&etc, &data, &mail, &self.path("queue")] {
            fs::create_dir_all(d).map_err(io_context(format!("mkdir {}", d.display())))?;
        }
        let master = fs::read_to_string("/etc/postfix/master.cf").map_err(io_context("/etc/postfix/master.cf"))?;
        fs::write(etc.join("master.cf"), master_cf(&master, self.listen)).map_err(io_context("write master.cf"))?;
        let mut main = self.main_cf(mailboxes);
        for (name, value) in settings {
            main.push_str(&format!("{name} = {value}\n"));
        }
        fs::write(etc.join("main.cf"), main).map_err(io_context("write main.cf"))?;
        rustix::fs::chown(&data, Some(postfix_uid()?), None).map_err(|e| PeerError(format!("chown data: {e}")))?;
        let nobody = Some(rustix::fs::Uid::from_raw(65534));
        rustix::fs::chown(&mail, nobody, Some(rustix::fs::Gid::from_raw(65534)))
            .map_err(|e| PeerError(format!("chown mail: {e}")))?;
        self.postfix(&["post-install", "create-missing"]).map(drop)
    }

    fn main_cf(&self, mailboxes: &[&str]) -> String {
        let dir = self.dir.path().display();
        let domain = &self.domain;
        let maps: Vec<String> =
            mailboxes.iter().map(|m| local_part(m)).map(|m| format!("{{{m}@{domain}={domain}/{m}/}}")).collect();
        format!(
            "compatibility_level = 3.6\n\
             queue_directory = {dir}/queue\n\
             data_directory = {dir}/data\n\
             maillog_file = {dir}/maillog\n\
             maillog_file_prefixes = {dir}\n\
             myhostname = primary.{domain}\n\
             mydomain = {domain}\n\
             inet_interfaces = loopback-only\n\
             inet_protocols = ipv4\n\
             mydestination =\n\
             mynetworks = 127.0.0.0/8\n\
             disable_dns_lookups = yes\n\
             alias_maps =\n\
             alias_database =\n\
             biff = no\n\
             smtpd_banner = $myhostname ESMTP\n\
             virtual_mailbox_domains = {domain}\n\
             virtual_mailbox_base = {dir}/mail\n\
             virtual_mailbox_maps = inline:{{ {} }}\n\
             virtual_uid_maps = static:65534\n\
             virtual_gid_maps = static:65534\n\
             virtual_mailbox_limit = 0\n",
            maps.join(", ")
        )
    }

    /// Starts (again) after [`Postfix::stop`]; waits until it greets on its address.
    pub fn resume(&mut self) -> Result<()> {
        if self.running {
            return Ok(());
        }
        if smtp_greets(self.listen) {
            // Most likely a Postfix left behind by a test that was killed before its Drop ran.
            return err(format!(
                "something already answers SMTP on {} (a leftover? try `postfix -c /tmp/bartleby-postfix-*/etc stop`)",
                self.listen
            ));
        }
        self.postfix(&["start"]).map_err(|e| PeerError(format!("{e}\nmaillog:\n{}", self.maillog_tail())))?;
        self.running = true;
        if !wait_until(POSTFIX_WAIT, || smtp_greets(self.listen)) {
            return err(format!("postfix did not greet on {}:\n{}", self.listen, self.maillog_tail()));
        }
        Ok(())
    }

    /// Stops Postfix (to simulate the primary being down) and waits until its master process is
    /// gone, so the address refuses connections when this returns.
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let pid = self.master_pid();
        let stopped = self.postfix(&["stop"]);
        self.running = false;
        let gone = wait_until(POSTFIX_WAIT, || pid.is_none_or(|p| !process_alive(p)));
        if !gone {
            if let Some(p) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
            return err(format!("postfix master {pid:?} did not exit:\n{}", self.maillog_tail()));
        }
        stopped.map(drop)
    }

    /// Changes one main.cf setting (`postconf -e`) and reloads a running Postfix.
    pub fn postconf(&self, name: &str, value: &str) -> Result<()> {
        self.run_command("postconf", &["-e", &format!("{name}={value}")])?;
        if self.running {
            self.postfix(&["reload"])?;
        }
        Ok(())
    }

    pub fn listen(&self) -> SocketAddrV4 {
        self.listen
    }

    /// The instance's directory (etc/, queue/, data/, mail/, maillog).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The whole maillog so far.
    pub fn maillog(&self) -> String {
        fs::read_to_string(self.path("maillog")).unwrap_or_default()
    }

    /// The messages delivered to `mailbox` (`alice` or `alice@domain`), oldest first; empty when
    /// nothing was delivered yet.
    ///
    /// Postfix's virtual(8) names Maildir files `SECONDS.VdevIinodeMmicros.host`, from the clock
    /// at delivery; sorting by (seconds, microseconds) gives delivery order even within one
    /// second, which neither the mtime's granularity nor a plain name sort (`M9` vs `M10`)
    /// guarantees. Names not in that form sort by mtime, then name.
    pub fn maildir_messages(&self, mailbox: &str) -> Result<Vec<Vec<u8>>> {
        let root = self.path("mail").join(&self.domain).join(local_part(mailbox));
        let mut files = Vec::new();
        for sub in ["new", "cur"] {
            let dir = root.join(sub);
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries {
                let entry = entry.map_err(io_context(dir.display()))?;
                files.push((delivery_key(&entry)?, entry.path()));
            }
        }
        files.sort();
        files.into_iter().map(|(_, p)| fs::read(&p).map_err(io_context(p.display()))).collect()
    }

    /// Waits (at most `limit`) until `mailbox` holds at least `count` messages and returns them.
    pub fn wait_for_messages(&self, mailbox: &str, count: usize, limit: Duration) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + limit;
        loop {
            let messages = self.maildir_messages(mailbox)?;
            if messages.len() >= count {
                return Ok(messages);
            }
            if Instant::now() > deadline {
                return err(format!(
                    "{mailbox}: {} of {count} messages after {limit:?}; maillog:\n{}",
                    messages.len(),
                    self.maillog_tail()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn maillog_tail(&self) -> String {
        tail(&self.path("maillog"), 30)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn etc(&self) -> PathBuf {
        self.path("etc")
    }

    /// `postfix -c ETC args...`, bounded.
    fn postfix(&self, args: &[&str]) -> Result<Output> {
        self.run_command("postfix", args)
    }

    fn run_command(&self, program: &str, args: &[&str]) -> Result<Output> {
        run_ok(Command::new(program).arg("-c").arg(self.etc()).args(args), POSTFIX_WAIT)
    }

    /// The master's pid from `queue/pid/master.pid` (written space-padded).
    fn master_pid(&self) -> Option<u32> {
        fs::read_to_string(self.path("queue/pid/master.pid")).ok()?.trim().parse().ok()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Debian's master.cf with the `smtp inet` service moved to our address, and no chroot: the
/// chroot would be our queue directory, which lacks the files chrooted daemons expect.
fn master_cf(original: &str, listen: SocketAddrV4) -> String {
    let mut out = String::new();
    for line in original.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let line = match fields.as_slice() {
            ["smtp", "inet", ..] => format!("{listen} inet n - n - - smtpd"),
            [name, kind, private, unpriv, "y", rest @ ..] if !line.starts_with([' ', '\t', '#']) => {
                format!("{name} {kind} {private} {unpriv} n {}", rest.join(" "))
            }
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `alice@example.test` → `alice`.
fn local_part(mailbox: &str) -> &str {
    mailbox.split_once('@').map_or(mailbox, |(l, _)| l)
}

/// Sort key for a Maildir file: see [`Postfix::maildir_messages`].
fn delivery_key(entry: &fs::DirEntry) -> Result<(u64, u64, String)> {
    let name = entry.file_name().to_string_lossy().into_owned();
    if let Some(key) = maildir_time(&name) {
        return Ok((key.0, key.1, name));
    }
    let meta = entry.metadata().map_err(io_context(&name))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    Ok((mtime.as_secs(), u64::from(mtime.subsec_micros()), name))
}

/// (seconds, microseconds) from `SECONDS.V..I..Mmicros.host[:2,flags]`.
fn maildir_time(name: &str) -> Option<(u64, u64)> {
    let (secs, rest) = name.split_once('.')?;
    let unique = rest.split('.').next()?;
    let micros = unique.rsplit_once('M')?.1;
    Some((secs.parse().ok()?, micros.parse().ok()?))
}

fn postfix_uid() -> Result<rustix::fs::Uid> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_context("/etc/passwd"))?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postfix")).then(|| f.get(2)?.parse().ok()).flatten()
        })
        .map(rustix::fs::Uid::from_raw)
        .ok_or_else(|| PeerError("no postfix user in /etc/passwd".into()))
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

// ---------------------------------------------------------------------------------------------
// smtp-sink

/// Postfix's `smtp-sink`: accepts everything, stores nothing, counts messages. Killed on Drop.
pub struct SmtpSink {
    child: ChildGuard,
    addr: SocketAddrV4,
    /// Holds the counter output.
    dir: tempfile::TempDir,
}

impl SmtpSink {
    /// `smtp-sink -c -u nobody ADDR 1000`; port 25 needs a [`PeersLock`].
    pub fn start(addr: SocketAddrV4) -> Result<SmtpSink> {
        require_lock(addr.port(), "smtp-sink")?;
        let dir = peer_dir("bartleby-sink-")?;
        let out = File::create(dir.path().join("counters")).map_err(io_context("create counters"))?;
        let errs = File::create(dir.path().join("stderr")).map_err(io_context("create stderr"))?;
        let mut cmd = Command::new("smtp-sink");
        cmd.args(["-c", "-u", "nobody", &addr.to_string(), "1000"]).stdout(out).stderr(errs);
        let mut child = ChildGuard::spawn(&mut cmd, "smtp-sink")?;
        if !wait_until(Duration::from_secs(10), || child.exited().is_none() && smtp_greets(addr)) {
            return err(format!("smtp-sink on {addr} did not greet:\n{}", tail(&dir.path().join("stderr"), 20)));
        }
        Ok(SmtpSink { child, addr, dir })
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Messages received so far (the last `mesg=N` counter; counters are separated by CR).
    pub fn messages(&self) -> u64 {
        let text = fs::read_to_string(self.dir.path().join("counters")).unwrap_or_default();
        text.rsplit(['\r', '\n', ' ']).find_map(|f| f.strip_prefix("mesg=")).and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// Waits (at most `limit`) until at least `count` messages arrived; returns the count.
    pub fn wait_for(&self, count: u64, limit: Duration) -> Result<u64> {
        if wait_until(limit, || self.messages() >= count) {
            return Ok(self.messages());
        }
        err(format!("smtp-sink: {} of {count} messages after {limit:?}", self.messages()))
    }
}
