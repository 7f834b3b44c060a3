//! PostgreSQL 15 from Debian (`postgresql-15`) in a temporary directory, for tests of the
//! PostgreSQL queue store (issue 13): a fresh cluster made by `initdb` as the `postgres` system
//! user (initdb refuses root), listening on its own loopback address and a free port, with a
//! database `bartleby` owned by a role `bartleby` that logs in over TCP with a random password
//! (SCRAM-SHA-256, as in production; only the Unix socket in the directory trusts, for
//! [`PgServer::psql`]). fsync and synchronous_commit stay on: these tests speak of durability.
//! Stopped (fast shutdown) and its directory removed when dropped.
//!
//! Include it after peers.rs: `#[path = "support/postgres.rs"] mod postgres;`. Synchronous, like
//! peers.rs; every wait has a deadline.
#![allow(dead_code)]

use crate::peers::{PeerError, Result, free_loopback_port, run_bounded, tail};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's postgresql-15 puts initdb, postgres, psql and pg_isready.
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The database the store uses, owned by [`ROLE`].
pub const DATABASE: &str = "bartleby";
/// The role bartleby logs in as (not a superuser: it owns [`DATABASE`] and creates its schema).
pub const ROLE: &str = "bartleby";
/// The system user the server runs as, and the cluster's superuser (over the socket only).
const OS_USER: &str = "postgres";
/// How long starting (up to accepting connections) and stopping may take.
const START_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How long one initdb or psql may run.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Settings appended to the cluster's postgresql.conf: small enough for a test machine running
/// several builds, durable like production. Address, port and socket directory are given on the
/// command line instead (`-h`, `-p`, `-k`).
const SETTINGS: &str = "
# tests/support/postgres.rs
max_connections = 200
shared_buffers = 16MB
work_mem = 4MB
maintenance_work_mem = 16MB
max_wal_size = 256MB
fsync = on
synchronous_commit = on
full_page_writes = on
password_encryption = scram-sha-256
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] '
";

/// The socket in the directory trusts (the tests' superuser `psql`); TCP from loopback needs the
/// password.
const PG_HBA: &str = "\
local all all trust
host all all 127.0.0.0/8 scram-sha-256
";

/// A running (or stopped) PostgreSQL server and its data directory.
pub struct PgServer {
    /// Owned by `postgres`: `data/` (the cluster), the socket, `postgres.log`, and `password`
    /// (root's). Removed when dropped, after the server stopped.
    dir: tempfile::TempDir,
    host: Ipv4Addr,
    /// Picked once: [`PgServer::start_again`] listens on the same port.
    port: u16,
    password: String,
    /// `postgres`'s uid and gid, for the server and psql.
    uid: u32,
    gid: u32,
    /// The postmaster, while running.
    child: Option<Child>,
}

impl PgServer {
    /// Makes a cluster in a fresh temporary directory and starts it on `host` (a loopback
    /// address such as "127.0.0.71") and a free port; returns once `bartleby` can log in.
    pub fn start(host: &str) -> Result<PgServer> {
        let host: Ipv4Addr = host.parse().map_err(|e| PeerError(format!("PgServer::start({host:?}): {e}")))?;
        if !host.is_loopback() {
            return Err(PeerError(format!("PgServer::start: {host} is not a loopback address")));
        }
        if !Path::new(BIN_DIR).join("postgres").exists() {
            return Err(PeerError(format!("{BIN_DIR}/postgres is missing: apt-get install postgresql-15")));
        }
        let (uid, gid) = system_user(OS_USER)?;
        let dir = tempfile::Builder::new().prefix("bartleby-pg-").tempdir().map_err(io("tempdir"))?;
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(io("chown tempdir"))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).map_err(io("chmod tempdir"))?;
        let port = free_loopback_port(host)?;
        let password = random_password()?;
        let mut server = PgServer { dir, host, port, password, uid, gid, child: None };
        server.init()?;
        server.start_again()?;
        server.create_role_and_database()?;
        Ok(server)
    }

    /// `postgres://bartleby:PASSWORD@HOST:PORT/bartleby` (the password is hex: nothing to escape).
    pub fn url(&self) -> String {
        format!("postgres://{ROLE}:{}@{}:{}/{DATABASE}", self.password, self.host, self.port)
    }

    /// `postgres://bartleby@HOST:PORT/bartleby`, for a configuration with a password file.
    pub fn url_without_password(&self) -> String {
        format!("postgres://{ROLE}@{}:{}/{DATABASE}", self.host, self.port)
    }

    /// `bartleby`'s password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A file holding the password and a line end (as an operator writes one), root's, mode 0600.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    pub fn host(&self) -> Ipv4Addr {
        self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory (the cluster is in `data/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The postmaster's process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of the server's log, for assertion messages.
    pub fn log(&self) -> String {
        tail(&self.log_path(), 40)
    }

    /// Runs `sql` with psql as the superuser over the socket, in database `bartleby`, and gives
    /// its output unaligned and without headers (`psql -A -t`: one row a line, columns separated
    /// by `|`), the last line end removed. An SQL error is an error.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let socket_dir = self.dir.path().to_string_lossy().into_owned();
        let port = self.port.to_string();
        let mut cmd = self.as_postgres(&format!("{BIN_DIR}/psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", &socket_dir, "-p", &port]);
        cmd.args(["-U", OS_USER, "-d", DATABASE, "-c", sql]);
        let out = run_ok(&mut cmd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.strip_suffix('\n').unwrap_or(&text).to_string())
    }

    /// Fast shutdown (SIGINT to the postmaster: sessions are ended, a checkpoint is written) and
    /// waits until it exited, so the port refuses connections when this returns. The data stays.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        // A paused server would not see SIGINT until continued.
        self.signal_all(child.id(), rustix::process::Signal::CONT);
        signal(child.id(), rustix::process::Signal::INT);
        let deadline = Instant::now() + STOP_LIMIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(PeerError(format!(
                        "postgres did not stop within {STOP_LIMIT:?} (killed):\n{}",
                        self.log()
                    )));
                }
            }
        }
    }

    /// Starts the server (again, after [`PgServer::stop`]) on the same directory, address and
    /// port; returns once it accepts connections.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).map_err(io("postgres.log"))?;
        let err_log = log.try_clone().map_err(io("postgres.log"))?;
        let (data, socket_dir) = (self.data_dir(), self.dir.path().to_path_buf());
        let mut cmd = self.as_postgres(&format!("{BIN_DIR}/postgres"));
        cmd.arg("-D").arg(&data).arg("-k").arg(&socket_dir);
        cmd.arg("-h").arg(self.host.to_string()).arg("-p").arg(self.port.to_string());
        let child = cmd.stdin(Stdio::null()).stdout(log).stderr(err_log).spawn().map_err(io("spawn postgres"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// SIGSTOP to the postmaster and every server process below it: connections are neither
    /// refused nor answered, as with a database that hangs. [`PgServer::resume`] continues.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            self.signal_all(child.id(), rustix::process::Signal::STOP);
        }
    }

    /// SIGCONT after [`PgServer::pause`].
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            self.signal_all(child.id(), rustix::process::Signal::CONT);
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command run as `postgres` (no supplementary groups: std drops them when it sets the
    /// uid as root), in the directory (it cannot enter the tests' working directory), with none
    /// of the caller's PG* variables.
    fn as_postgres(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.uid(self.uid).gid(self.gid).current_dir(self.dir.path()).env_clear();
        cmd.env("PATH", "/usr/bin:/bin").env("HOME", self.dir.path()).env("LC_ALL", "C");
        cmd
    }

    /// initdb (without fsync of the new files: a crash during set-up is no test's subject; the
    /// server itself runs with fsync on), then the settings, pg_hba.conf and the password file.
    fn init(&self) -> Result<()> {
        let mut cmd = self.as_postgres(&format!("{BIN_DIR}/initdb"));
        cmd.arg("-D").arg(self.data_dir());
        cmd.args(["-U", OS_USER, "-E", "UTF8", "--locale=C", "--auth-local=trust"]);
        cmd.args(["--auth-host=scram-sha-256", "--no-sync", "--no-instructions"]);
        run_ok(&mut cmd)?;
        let conf = self.data_dir().join("postgresql.conf");
        let mut file = OpenOptions::new().append(true).open(&conf).map_err(io("postgresql.conf"))?;
        file.write_all(SETTINGS.as_bytes()).map_err(io("write postgresql.conf"))?;
        // Written as root into postgres's directory: keep postgres the owner, or it refuses to read.
        let hba = self.data_dir().join("pg_hba.conf");
        fs::write(&hba, PG_HBA).map_err(io("write pg_hba.conf"))?;
        std::os::unix::fs::chown(&hba, Some(self.uid), Some(self.gid)).map_err(io("chown pg_hba.conf"))?;
        let mut pw = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.password_file())
            .map_err(io("password file"))?;
        writeln!(pw, "{}", self.password).map_err(io("write password file"))
    }

    /// `CREATE ROLE` and `CREATE DATABASE` (each its own -c: CREATE DATABASE cannot run in the
    /// transaction psql makes of several statements), in the maintenance database.
    fn create_role_and_database(&self) -> Result<()> {
        let socket_dir = self.dir.path().to_string_lossy().into_owned();
        let port = self.port.to_string();
        let role = format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{}'", self.password);
        let database = format!("CREATE DATABASE {DATABASE} OWNER {ROLE}");
        let mut cmd = self.as_postgres(&format!("{BIN_DIR}/psql"));
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", &socket_dir, "-p", &port, "-U", OS_USER]);
        cmd.args(["-d", "postgres", "-c", &role, "-c", &database]);
        run_ok(&mut cmd).map(drop)
    }

    /// Polls pg_isready over TCP (it needs no login) until the server accepts connections.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        let (host, port) = (self.host.to_string(), self.port.to_string());
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(PeerError(format!("postgres exited with {status}:\n{}", self.log())));
            }
            let ready = run_bounded(
                Command::new(format!("{BIN_DIR}/pg_isready")).args(["-q", "-t", "2", "-h", &host, "-p", &port]),
                Duration::from_secs(5),
            )?;
            if ready.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PeerError(format!(
                    "postgres did not accept connections on {host}:{port} within {START_LIMIT:?}:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `sig` to the postmaster and to each process whose parent it is (its server processes).
    fn signal_all(&self, postmaster: u32, sig: rustix::process::Signal) {
        signal(postmaster, sig);
        for pid in children_of(postmaster) {
            signal(pid, sig);
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("PgServer drop: {e}");
        }
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> PeerError + '_ {
    move |e| PeerError(format!("{what}: {e}"))
}

/// [`run_bounded`] for [`COMMAND_LIMIT`], failing unless the command exits 0.
fn run_ok(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{:?}", cmd.get_program());
    let out = run_bounded(cmd, COMMAND_LIMIT)?;
    if !out.status.success() {
        return Err(PeerError(format!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

/// uid and gid of a system user, from /etc/passwd.
fn system_user(name: &str) -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io("/etc/passwd"))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == name {
            let parse = |s: &str| s.parse::<u32>().map_err(|e| PeerError(format!("/etc/passwd {name}: {e}")));
            return Ok((parse(fields[2])?, parse(fields[3])?));
        }
    }
    Err(PeerError(format!("no user {name:?}: apt-get install postgresql-15 creates it")))
}

/// 32 random hex digits.
fn random_password() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| PeerError(format!("getrandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// The processes whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // "PID (COMM) STATE PPID ...": the command may hold spaces and parentheses.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            found.push(pid);
        }
    }
    found
}
