//! Self-test of the PostgreSQL harness (`tests/support/postgres.rs`): the server starts, the
//! `bartleby` role logs in over TCP with the URL's password (and the password file's) and not
//! without it, can create its tables, fsync and synchronous_commit are on, and after a stop
//! (the port refuses) and a start on the same port the data is still there. Dropping the server
//! stops it and removes its directory.

#[path = "support/peers.rs"]
mod peers;
#[path = "support/postgres.rs"]
mod postgres;

use postgres::{BIN_DIR, PgServer};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

/// Its own loopback address; the port is free (picked by the harness), so no lock is needed.
const HOST: &str = "127.0.0.71";

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// psql as root over TCP, the way bartleby connects: to `target` (a URL), with `password` in
/// PGPASSWORD if given.
fn psql_tcp(target: &str, password: Option<&str>, sql: &str) -> Result<Output, peers::PeerError> {
    let mut cmd = Command::new(format!("{BIN_DIR}/psql"));
    cmd.args(["-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d", target, "-c", sql]);
    cmd.env_remove("PGPASSWORD").env("PGPASSFILE", "/dev/null").env("PGCONNECT_TIMEOUT", "5");
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    peers::run_bounded(&mut cmd, Duration::from_secs(20))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

#[test]
fn postgres_starts_authenticates_stops_and_starts_again_with_its_data() -> TestResult {
    let mut pg = PgServer::start(HOST)?;
    assert_eq!(pg.psql("select 1")?, "1");
    assert_eq!(pg.psql("show fsync")?, "on");
    assert_eq!(pg.psql("show synchronous_commit")?, "on");
    assert!(pg.url().starts_with(&format!("postgres://bartleby:{}@{HOST}:{}/bartleby", pg.password(), pg.port())));
    assert_eq!(pg.url_without_password(), format!("postgres://bartleby@{HOST}:{}/bartleby", pg.port()));

    // The URL's password; the role owns its database, so it can create its schema there.
    let created = psql_tcp(&pg.url(), None, "create table t (x int); insert into t values (42); select current_user")?;
    assert!(created.status.success(), "bartleby over TCP: {}", String::from_utf8_lossy(&created.stderr));
    assert_eq!(stdout(&created), "bartleby");
    // The password file's (one line end, as an operator writes it), and no login without one.
    let text = std::fs::read_to_string(pg.password_file())?;
    assert_eq!(text, format!("{}\n", pg.password()));
    let from_file = psql_tcp(&pg.url_without_password(), Some(text.trim_end()), "select x from t")?;
    assert_eq!(stdout(&from_file), "42", "{}", String::from_utf8_lossy(&from_file.stderr));
    let without = psql_tcp(&pg.url_without_password(), None, "select 1")?;
    assert!(!without.status.success(), "logged in without a password");
    let wrong = psql_tcp(&pg.url_without_password(), Some("wrong"), "select 1")?;
    assert!(!wrong.status.success(), "logged in with a wrong password");

    let port = pg.port();
    pg.stop()?;
    assert!(pg.pid().is_none());
    assert!(TcpStream::connect((HOST, port)).is_err(), "the port still accepts after stop");
    assert!(pg.psql("select 1").is_err());
    pg.start_again()?;
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("select x from t")?, "42", "log:\n{}", pg.log());
    let again = psql_tcp(&pg.url(), None, "select count(*) from t")?;
    assert_eq!(stdout(&again), "1", "{}", String::from_utf8_lossy(&again.stderr));

    let (dir, pid) = (pg.dir().to_path_buf(), pg.pid().expect("running"));
    drop(pg);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "postmaster {pid} still runs");
    Ok(())
}

#[test]
fn a_paused_server_neither_refuses_nor_answers_until_resumed() -> TestResult {
    let pg = PgServer::start(HOST)?;
    pg.pause();
    // The kernel completes the handshake (the listen backlog), but no server answers a login.
    let hung = psql_tcp(&pg.url(), None, "select 1")?;
    assert!(!hung.status.success(), "a paused server answered");
    assert!(String::from_utf8_lossy(&hung.stderr).contains("timeout"), "{}", String::from_utf8_lossy(&hung.stderr));
    pg.resume();
    let back = psql_tcp(&pg.url(), None, "select 1")?;
    assert_eq!(stdout(&back), "1", "{}", String::from_utf8_lossy(&back.stderr));
    Ok(())
}
