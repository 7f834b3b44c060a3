//! Runs the real `bartleby` binary for integration tests: writes a config, starts `serve`, waits
//! until SMTP answers, and stops (SIGTERM) or kills (SIGKILL) it; killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bartleby");

/// Changes the daemon's command before each start (tests/power_loss.rs has its `syncfs` calls watched).
pub type Prepare = std::sync::Arc<dyn Fn(&mut Command) + Send + Sync>;

/// A free TCP port on `ip` (bound and released; good enough for tests).
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub smtp: SocketAddr,
    log_path: PathBuf,
    prepare: Option<Prepare>,
}

impl Daemon {
    /// Writes `config` (which must set `smtp.listen = [smtp]` and `queue.dir`) to `dir` and starts.
    pub fn start_with(dir: &Path, config: &str, smtp: SocketAddr) -> Daemon {
        Daemon::try_start_with(dir, config, smtp, None).unwrap_or_else(|err| panic!("{err}"))
    }

    fn try_start_with(dir: &Path, config: &str, smtp: SocketAddr, prepare: Option<Prepare>) -> Result<Daemon, String> {
        let config_path = dir.join("bartleby.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.join("bartleby.log");
        let mut daemon = Daemon { child: None, dir: dir.to_path_buf(), config_path, smtp, log_path, prepare };
        daemon.try_restart()?;
        Ok(daemon)
    }

    /// A daemon on 127.0.0.1:<free port> relaying `example.test`, with `extra` TOML appended
    /// (it continues the `[queue]` table; top-level keys go in `top`). DNS goes to 127.0.0.1:1,
    /// where nothing answers, so no test ever asks a resolver beyond loopback; tests route by
    /// `[routes]`. A port taken by a parallel test in the meantime means a new pair of ports.
    pub fn start(dir: &Path, top: &str, extra: &str) -> Daemon {
        Daemon::start_on_free_port(dir, |smtp| {
            let spool = dir.join("spool");
            let config = format!(
                "hostname = \"backup.example.test\"\n{top}\n[smtp]\nlisten = [\"{smtp}\"]\nsender_auth = false\n\n[relay]\ndomains = [\"example.test\"]\n\n[dns]\nnameservers = [\"127.0.0.1:1\"]\n\n[queue]\ndir = \"{}\"\nmin_free = 0\n{extra}\n",
                spool.display()
            );
            // Each daemon gets its own admin page port, so parallel tests do not fight over 8025.
            if extra.contains("[web]") {
                config
            } else {
                format!("{config}\n[web]\nlisten = \"127.0.0.1:{}\"\n", free_port("127.0.0.1"))
            }
        })
    }

    /// Starts with the configuration `config` makes for a free SMTP address on 127.0.0.1; a port
    /// taken by a parallel test in the meantime means another try with new ports.
    pub fn start_on_free_port(dir: &Path, config: impl Fn(SocketAddr) -> String) -> Daemon {
        Daemon::start_prepared(dir, None, config)
    }

    /// [`Daemon::start_on_free_port`], with `prepare` applied to the command of every start.
    pub fn start_prepared(dir: &Path, prepare: Option<Prepare>, config: impl Fn(SocketAddr) -> String) -> Daemon {
        let mut last = String::new();
        for _ in 0..5 {
            let smtp: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
            match Daemon::try_start_with(dir, &config(smtp), smtp, prepare.clone()) {
                Ok(daemon) => return daemon,
                Err(err) if err.contains("cannot listen") => last = err,
                Err(err) => panic!("{err}"),
            }
        }
        panic!("no free ports after 5 tries: {last}");
    }

    /// Starts (again) on the same config and spool; waits until SMTP answers.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|err| panic!("{err}"));
    }

    /// Starts and waits until this very process announced its listeners on stdout and SMTP answers
    /// (a greeting alone could come from another test's daemon that took the port).
    fn try_restart(&mut self) -> Result<(), String> {
        let out_path = self.dir.join("bartleby.out");
        let announced = || std::fs::read_to_string(&out_path).unwrap_or_default().matches("listening: SMTP on").count();
        let before = announced();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).expect("log file");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&out_path).expect("stdout file");
        let mut command = Command::new(BIN);
        command
            .args(["--config", self.config_path.to_str().expect("utf-8 path"), "serve"])
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(log);
        if let Some(prepare) = &self.prepare {
            prepare(&mut command);
        }
        let child = command.spawn().expect("start bartleby");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("bartleby exited with {status} at start:\n{}", self.log()));
            }
            if announced() > before
                && let Ok(stream) = TcpStream::connect_timeout(&self.smtp, Duration::from_secs(1))
            {
                let mut line = String::new();
                let _ = BufReader::new(stream).read_line(&mut line);
                if line.starts_with("220") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("bartleby did not answer on {} in 20s:\n{}", self.smtp, self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.join("spool")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs `bartleby --config CONFIG args...`, bounded to 30 s.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with_config(&self.config_path, args)
    }

    /// `queue list --json`, parsed.
    pub fn queue(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["queue", "list", "--json"]);
        assert!(out.status.success(), "queue list failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("queue list --json is JSON")
    }

    /// Every queued message's body by queue ID, read with `queue export` (which works while the
    /// daemon runs, whether a message waits in the journal or in its own files).
    #[allow(dead_code)]
    pub fn exported_bodies(&self) -> std::collections::HashMap<String, Vec<u8>> {
        let out = self.cli(&["queue", "export", "-"]);
        assert!(out.status.success(), "queue export failed: {}", String::from_utf8_lossy(&out.stderr));
        parse_export(&out.stdout)
    }

    /// SIGTERM and wait (at most 20 s) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        wait_bounded(&mut child, Duration::from_secs(20))
    }

    /// SIGHUP: reload the configuration.
    pub fn hup(&self) {
        let child = self.child.as_ref().expect("running");
        let _ = rustix::process::kill_process(rustix::process::Pid::from_child(child), rustix::process::Signal::HUP);
    }

    /// Rewrites the configuration file.
    pub fn rewrite_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        std::fs::write(&self.config_path, edit(text)).expect("write config");
    }

    /// Adds `settings` (TOML lines) to the `[smtp]` table that [`Daemon::start`] writes, and
    /// restarts on the new configuration.
    pub fn restart_with_smtp_settings(&mut self, settings: &str) {
        self.rewrite_config(|config| {
            config.replacen("sender_auth = false\n", &format!("sender_auth = false\n{settings}"), 1)
        });
        self.stop();
        self.restart();
    }

    /// Waits (at most `limit`) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The running daemon's process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn cli_with_config(config: &Path, args: &[&str]) -> Output {
    cli_with_config_and_stdin(config, args, None)
}

/// Runs the CLI with `input`, if any, on its standard input (for `-`); bounded to 30 s.
pub fn cli_with_config_and_stdin(config: &Path, args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::inherit() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bartleby cli");
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        stdin.write_all(input.as_bytes()).expect("write stdin");
    }
    let pid = rustix::process::Pid::from_child(&child);
    // Read the output while waiting: a large listing would fill the pipe and block the CLI.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(output) => output.expect("cli output"),
        Err(_) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            panic!("bartleby {args:?} did not finish in 30s");
        }
    }
}

fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bartleby did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal SMTP client for tests: sends one message, returns the final reply line to DATA.
pub fn send_raw(addr: SocketAddr, from: &str, to: &[&str], data: &[u8]) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut reply = || -> std::io::Result<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(all);
            }
        }
    };
    reply()?;
    writer.write_all("EHLO client.test\r\n".as_bytes())?;
    reply()?;
    writer.write_all(format!("MAIL FROM:<{from}>\r\n").as_bytes())?;
    let r = reply()?;
    if !r.starts_with('2') {
        return Ok(r);
    }
    for rcpt in to {
        writer.write_all(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())?;
        reply()?;
    }
    writer.write_all("DATA\r\n".as_bytes())?;
    let r = reply()?;
    if !r.starts_with('3') {
        return Ok(r);
    }
    writer.write_all(&dot_stuff(data))?;
    writer.write_all(b".\r\n")?;
    let r = reply()?;
    let _ = writer.write_all(b"QUIT\r\n");
    Ok(r)
}

/// Dot-stuffs CRLF text for DATA (RFC 5321 4.5.2); `data` must end with CRLF.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// The stored message without our Received header (the first header, with its continuation lines).
pub fn strip_our_received(stored: &[u8]) -> &[u8] {
    assert!(stored.starts_with(b"Received:"), "stored message does not start with our Received header");
    let mut pos = 0;
    loop {
        let end = stored[pos..].windows(2).position(|w| w == b"\r\n").map(|p| pos + p + 2).expect("header line");
        pos = end;
        if !matches!(stored.get(pos), Some(b' ') | Some(b'\t')) {
            return &stored[pos..];
        }
    }
}

/// The reply to `RCPT TO:<rcpt>` in a fresh session.
pub fn rcpt_reply(addr: SocketAddr, rcpt: &str) -> String {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    writer
        .write_all(format!("HELO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<{rcpt}>\r\nQUIT\r\n").as_bytes())
        .expect("write");
    let mut lines = Vec::new();
    for _ in 0..4 {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read");
        lines.push(line);
    }
    lines[3].trim_end().to_string()
}

/// The queue ID from "250 2.0.0 Ok: queued as ID".
pub fn queued_id(reply: &str) -> Option<String> {
    reply.trim_end().rsplit(' ').next().filter(|id| id.len() == 16).map(str::to_string)
}

/// Splits a `queue export` stream into bodies by queue ID.
#[allow(dead_code)]
pub fn parse_export(mut data: &[u8]) -> std::collections::HashMap<String, Vec<u8>> {
    let mut bodies = std::collections::HashMap::new();
    let line_end = |d: &[u8]| d.iter().position(|&b| b == b'\n').expect("export line");
    let magic = line_end(data);
    assert_eq!(&data[..magic], b"bartleby-queue-export 1");
    data = &data[magic + 1..];
    while !data.is_empty() {
        let end = line_end(data);
        let entry: serde_json::Value = serde_json::from_slice(&data[..end]).expect("export entry");
        let size = entry["size"].as_u64().expect("size") as usize;
        let id = entry["envelope"]["id"].as_str().expect("id").to_string();
        bodies.insert(id, data[end + 1..end + 1 + size].to_vec());
        data = &data[end + 1 + size..];
    }
    bodies
}
