//! The command line: `bartleby serve`, `check-config`, `check-dns`, `alert-test`, the `queue`
//! commands (mailq-style), `recipients` (the recipient cache) and `hash-password`.
//! Exit status: 0 success, 1 failure, 2 bad configuration.

use crate::config::{Config, ConfigError};
use crate::control::{self, ControlError, ListedMessage, MessageDetail, Request};
use crate::spool::{Queue, Spool, SpoolError, rfc3339};
use clap::{Parser, Subcommand};
use serde_json::Value;
use serde_json::value::RawValue;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "bartleby", version, about = "A backup MX: keeps every message until the primary takes it")]
pub struct Cli {
    /// Configuration file (default: built-in settings for a first try on loopback).
    #[arg(long, short, global = true, env = "BARTLEBY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default when no command is given).
    Serve {
        /// Log lines as text (`key=value` fields, quoted for logfmt) or JSON (one object a line).
        #[arg(long, value_enum, default_value_t)]
        log_format: crate::logging::LogFormat,
    },
    /// Validate the configuration and print the effective settings; exit 2 on what `serve` would
    /// reject (including TLS keys that do not parse and files the service user cannot read).
    CheckConfig {
        /// The user the files must be readable by, when run as root (default: `user` of the
        /// configuration; under systemd, the unit's `User=`, e.g. `bartleby`).
        #[arg(long)]
        user: Option<String>,
    },
    /// Say whether each relayed domain's MX records are right for a backup MX (exit 1 if not).
    CheckDns {
        /// Only these domains (default: every relay domain).
        domains: Vec<String>,
    },
    /// Send a test alert through every channel of [monitor] (exit 1 if one fails).
    AlertTest,
    /// Look at and act on the queue (works while the daemon runs).
    Queue {
        #[command(subcommand)]
        action: QueueCommand,
    },
    /// Read a password on stdin and print its argon2 hash for `[web] users`.
    HashPassword,
    /// The recipient cache: callout and directory answers, addresses learned from deliveries, your
    /// own entries (works while the daemon runs; it picks up changes within a second).
    Recipients {
        #[command(subcommand)]
        action: RecipientsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RecipientsCommand {
    /// List the cache: address, valid or invalid, source, expiry.
    List {
        /// An array of JSON objects instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Vouch for addresses (they are accepted at RCPT even while the primary is down).
    Add {
        addresses: Vec<String>,
        /// Record the addresses as invalid instead (550 5.1.1 at RCPT).
        #[arg(long)]
        invalid: bool,
    },
    /// Forget addresses (the next RCPT asks the list, a callout or the policy again).
    Forget { addresses: Vec<String> },
    /// Ask each address's directory (`recipients_ldap`) now, to try a filter or a bind; the
    /// cache is not changed (exit 1 if a directory cannot answer).
    Check { addresses: Vec<String> },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued messages, oldest first, like mailq.
    List {
        /// An array of JSON objects instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message: envelope, recipients, history and headers.
    Show { id: String },
    /// Delete a message without sending a bounce.
    Delete { id: String },
    /// Hold a message: it is not tried or flushed until released.
    Hold { id: String },
    /// Release a held message and try it now.
    Release { id: String },
    /// Try a message now.
    Retry { id: String },
    /// Write every queued message to FILE (`-` for stdout), oldest first, to move a queue to
    /// another host. Safe while the daemon runs.
    Export { file: PathBuf },
    /// Queue the messages of an export under their original IDs (stop the daemon first).
    Import { file: PathBuf },
    /// Try every deferred message now (like sendmail -q / postqueue -f).
    Flush {
        /// Only messages with recipients in this domain.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Give every message waiting in the journal its own files in messages/ and retire the
    /// journal, e.g. before a file-level backup of the spool (docs/spool.md).
    Sync,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|arg| arg == "generate") {
        // Drop "generate" so the separate parser sees only its own arguments.
        return generate(GenerateCli::parse_from(std::env::args_os().take(1).chain(std::env::args_os().skip(2))));
    }
    let cli = Cli::parse();
    let config = match load_config(cli.config.as_ref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("bartleby: {err}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve { log_format: crate::logging::LogFormat::Text }) {
        Command::Serve { log_format } => serve(config, cli.config, log_format),
        Command::CheckConfig { user } => check_config(&config, cli.config.as_ref(), user.as_deref()),
        Command::Queue { action } => queue(config, action),
        Command::CheckDns { domains } => check_dns(config, &domains),
        Command::AlertTest => alert_test(config),
        Command::HashPassword => hash_password(),
        Command::Recipients { action } => recipients(&config, action),
    }
}

/// `bartleby hash-password`: one line from stdin (the password), its PHC hash on stdout.
fn hash_password() -> ExitCode {
    use std::io::{BufRead, IsTerminal};
    if std::io::stdin().is_terminal() {
        eprint!("Password (echoed; or pipe it in): ");
    }
    let mut line = String::new();
    if let Err(err) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("bartleby: cannot read the password: {err}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("bartleby: empty password");
        return ExitCode::FAILURE;
    }
    match crate::web::auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bartleby: {err}");
            ExitCode::FAILURE
        }
    }
}

fn recipients(config: &Config, action: RecipientsCommand) -> ExitCode {
    use crate::recipients::{self, cache::Source};
    let dir = &config.queue.dir;
    let result = match action {
        RecipientsCommand::List { json } => recipients::list(dir).map(|entries| print_recipients(&entries, json)),
        RecipientsCommand::Add { addresses, invalid } => {
            recipients::add(dir, &addresses, !invalid, Source::Operator, None).map(|_| {
                println!("{} address(es) recorded as {}", addresses.len(), if invalid { "invalid" } else { "valid" });
            })
        }
        RecipientsCommand::Forget { addresses } => addresses.iter().try_for_each(|address| {
            let found = recipients::forget(dir, address)?;
            println!("{address}: {}", if found { "forgotten" } else { "not in the cache" });
            Ok(())
        }),
        RecipientsCommand::Check { addresses } => return check_recipients(config, &addresses),
    };
    exit_status(result)
}

/// `bartleby recipients check`: one line per address with what its directory says.
fn check_recipients(config: &Config, addresses: &[String]) -> ExitCode {
    use crate::recipients::ldap::Directory;
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("bartleby: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for address in addresses {
        let domain = crate::spool::domain_of(address);
        let Some(source) = config.domain_policy(&domain).recipients_ldap else {
            println!("{address}: domain {domain:?} has no recipients_ldap");
            continue;
        };
        let answer = match Directory::new(&source) {
            Ok(directory) => rt.block_on(directory.exists(address)).map_err(|e| e.to_string()),
            Err(err) => Err(err),
        };
        match answer {
            Ok(true) => println!("{address}: in the directory ({})", source.url),
            Ok(false) => println!("{address}: not in the directory ({}): 550 5.1.1", source.url),
            Err(err) => {
                failed = true;
                println!("{address}: {} cannot answer: {err}", source.url);
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn print_recipients(entries: &[(String, crate::recipients::cache::Entry)], json: bool) {
    if json {
        let list: Vec<Value> = entries
            .iter()
            .map(|(address, e)| {
                serde_json::json!({"address": address, "valid": e.valid, "source": e.source,
                    "learned": rfc3339(e.at), "expires": e.expires.map(rfc3339)})
            })
            .collect();
        println!("{}", Value::Array(list));
        return;
    }
    println!("{:<40} {:<8} {:<9} EXPIRES", "ADDRESS", "VALID", "SOURCE");
    for (address, e) in entries {
        let source = match e.source {
            crate::recipients::cache::Source::Callout => "callout",
            crate::recipients::cache::Source::Delivery => "delivery",
            crate::recipients::cache::Source::Operator => "operator",
            crate::recipients::cache::Source::Directory => "directory",
        };
        let expires = e.expires.map(rfc3339).unwrap_or_else(|| "never".into());
        println!("{address:<40} {:<8} {source:<9} {expires}", if e.valid { "yes" } else { "no" });
    }
    println!("-- {} address(es)", entries.len());
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(path) => Config::load(path),
        None => Ok(Config::demo()),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// Logs go to stderr, one line per event (see [`crate::logging`]).
pub fn init_logging() {
    crate::logging::init(crate::logging::LogFormat::Text);
}

fn check_config(config: &Config, path: Option<&PathBuf>, user: Option<&str>) -> ExitCode {
    let findings = crate::check_config::check(config, user);
    for warning in &findings.warnings {
        eprintln!("bartleby: warning: {warning}");
    }
    for error in &findings.errors {
        eprintln!("bartleby: {error}");
    }
    if !findings.errors.is_empty() {
        return ExitCode::from(2);
    }
    println!(
        "# {}: valid; effective settings:",
        path.map(|p| p.display().to_string()).unwrap_or("built-in defaults".into())
    );
    print!("{}", config.to_toml());
    ExitCode::SUCCESS
}

fn serve(config: Config, path: Option<PathBuf>, log_format: crate::logging::LogFormat) -> ExitCode {
    crate::logging::init(log_format);
    for warning in crate::check_config::warnings(&config) {
        tracing::warn!(problem = %warning, "configuration");
    }
    // Bind first (port 25), drop privileges, and only then start the runtime's threads.
    let result = crate::daemon::bind(&config).and_then(|bound| {
        crate::privilege::drop_to(config.user.as_deref(), config.group.as_deref(), &config.queue.dir)
            .map_err(|e| crate::daemon::DaemonError::Setup(e.to_string()))?;
        runtime()?.block_on(crate::daemon::run(config, bound, path))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bartleby: {err}");
            tracing::error!(error = %err, "cannot run");
            // 2 is the unit's RestartPreventExitStatus: a problem the operator must fix (a port in
            // use, a bad key, a spool it cannot open) is not retried every few seconds forever.
            if err.needs_operator() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

fn check_dns(config: Config, domains: &[String]) -> ExitCode {
    let result =
        runtime().map_err(|e| e.to_string()).and_then(|rt| rt.block_on(crate::check_dns::check(&config, domains)));
    match result {
        Ok(reports) if reports.is_empty() => {
            eprintln!("bartleby: no domains to check (relay.domains is empty)");
            ExitCode::FAILURE
        }
        Ok(reports) => {
            print!("{}", crate::check_dns::render(&reports));
            if reports.iter().any(|r| r.has_problems()) { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Err(err) => {
            eprintln!("bartleby: {err}");
            ExitCode::FAILURE
        }
    }
}

fn alert_test(config: Config) -> ExitCode {
    let alerter = crate::monitor::alert::Alerter::new(std::sync::Arc::new(config.clone()));
    if alerter.channels() == 0 {
        eprintln!(
            "bartleby: no alert channels configured ([[monitor.command]], [[monitor.webhook]], [[monitor.email]])"
        );
        return ExitCode::FAILURE;
    }
    let alert = crate::monitor::alert::Alert::test(&config.hostname);
    let results = match runtime() {
        Ok(rt) => rt.block_on(alerter.send(&alert)),
        Err(err) => {
            eprintln!("bartleby: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for (channel, result) in results {
        match result {
            Ok(()) => println!("sent     {channel}"),
            Err(err) => {
                failed = true;
                println!("FAILED   {channel}: {err}");
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn queue(config: Config, action: QueueCommand) -> ExitCode {
    let result = match action {
        QueueCommand::Export { file } => export(&config, &file),
        QueueCommand::Import { file } => import(&config, &file),
        QueueCommand::List { json } => return list_queue(&config, json),
        QueueCommand::Show { id } => return queue_request(&config, Request::Show { id }),
        QueueCommand::Delete { id } => return queue_request(&config, Request::Delete { id }),
        QueueCommand::Hold { id } => return queue_request(&config, Request::Hold { id }),
        QueueCommand::Release { id } => return queue_request(&config, Request::Release { id }),
        QueueCommand::Retry { id } => return queue_request(&config, Request::Retry { id }),
        QueueCommand::Flush { domain } => return queue_request(&config, Request::Flush { domain }),
        QueueCommand::Sync => return queue_request(&config, Request::Sync),
    };
    match result {
        Ok(message) => {
            eprintln!("{message}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bartleby: {err}");
            ExitCode::FAILURE
        }
    }
}

fn export(config: &Config, file: &Path) -> Result<String, String> {
    let count = if file == Path::new("-") {
        crate::spool::export(&config.queue.dir, &mut std::io::stdout().lock())
    } else {
        let out = std::fs::File::create(file).map_err(|e| format!("{}: {e}", file.display()))?;
        crate::spool::export(&config.queue.dir, &mut std::io::BufWriter::new(out))
    }
    .map_err(|e| e.to_string())?;
    Ok(format!("exported {count} messages"))
}

fn import(config: &Config, file: &Path) -> Result<String, String> {
    let input = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let spool = match Spool::open(&config.queue.dir) {
        Ok((spool, _)) => std::sync::Arc::new(spool),
        Err(SpoolError::Locked(dir)) => {
            return Err(format!("{}: bartleby is running; stop it before importing", dir.display()));
        }
        Err(err) => return Err(err.to_string()),
    };
    let (imported, skipped) = spool.import(&mut std::io::BufReader::new(input)).map_err(|e| e.to_string())?;
    Ok(format!("imported {imported} messages ({skipped} already queued)"))
}

fn queue_request(config: &Config, request: Request) -> ExitCode {
    let result = runtime().map_err(|e| e.to_string()).and_then(|rt| rt.block_on(send(config, request.clone())));
    match result {
        Ok(value) => {
            print!("{}", render(&request, &value));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bartleby: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Through the daemon when it runs; otherwise on the spool directly, under its lock.
async fn send(config: &Config, request: Request) -> Result<Box<RawValue>, String> {
    let socket = Spool::control_socket_path(&config.queue.dir);
    match control::request(&socket, &request).await {
        Err(ControlError::NotRunning(_)) => {}
        other => return other.map_err(|e| e.to_string()),
    }
    if !config.queue.dir.exists() {
        return Err(format!("no spool at {} (is queue.dir right?)", config.queue.dir.display()));
    }
    let (spool, _) = Spool::open(&config.queue.dir).map_err(|e| e.to_string())?;
    let spool: std::sync::Arc<dyn Queue> = std::sync::Arc::new(spool);
    control::execute(request, &spool, None).await
}

fn render(request: &Request, value: &RawValue) -> String {
    let raw = value.get();
    match request {
        Request::Show { .. } => match serde_json::from_str::<MessageDetail>(raw) {
            Ok(detail) => show(&detail),
            Err(err) => format!("bad message: {err}\n"),
        },
        Request::Flush { domain } => {
            let count: u64 = serde_json::from_str(raw).unwrap_or(0);
            let scope = domain.as_ref().map(|d| format!(" for {d}")).unwrap_or_default();
            format!("flush{scope}: {count} message{} scheduled for delivery now\n", if count == 1 { "" } else { "s" })
        }
        _ => format!("{}\n", serde_json::from_str::<String>(raw).unwrap_or_default()),
    }
}

const MAILQ_EMPTY: &str = "Mail queue is empty\n";
const MAILQ_HEADER: &str = "-Queue ID-------- --Size-- ----Arrival Time---- -Sender/Recipient-------\n";

/// One message of the table `mailq` users know: ID (`!` when held), size, arrival, sender, then
/// each recipient with the reason it waits.
fn mailq_entry(m: &ListedMessage) -> String {
    let mark = if m.held { "!" } else { " " };
    let sender = if m.sender.is_empty() { "MAILER-DAEMON" } else { &m.sender };
    let mut out = format!("{}{mark}{:>9} {:>20}  {sender}\n", m.id, m.size, short_time(&m.arrived));
    if let Some(error) = &m.last_error {
        out += &format!("{:49}({error})\n", "");
    }
    for rcpt in &m.recipients {
        out += &format!("{:49}{rcpt}\n", "");
    }
    out.push('\n');
    out
}

fn mailq_footer(count: usize, bytes: u64) -> String {
    format!("-- {} Kbytes in {count} Request{}.\n", bytes.div_ceil(1024), if count == 1 { "" } else { "s" })
}

/// Messages per page of `queue list`.
const LIST_PAGE: usize = 1000;

/// `queue list`: a page at a time, each printed as it comes, so that the first line of a million
/// messages shows at once and the listing never sits whole in memory (the daemon's or ours).
fn list_queue(config: &Config, json: bool) -> ExitCode {
    let listed = runtime().map_err(|e| e.to_string()).and_then(|rt| rt.block_on(list_pages(config, json)));
    match listed {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bartleby: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn list_pages(config: &Config, json: bool) -> Result<(), String> {
    use std::io::Write;
    let socket = Spool::control_socket_path(&config.queue.dir);
    let mut offline: Option<std::sync::Arc<dyn Queue>> = None;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut after, mut count, mut bytes) = (None::<String>, 0usize, 0u64);
    let write_err = |e: std::io::Error| format!("standard output: {e}");
    loop {
        let request = Request::ListPage { after: after.clone(), limit: LIST_PAGE };
        let raw = match &offline {
            Some(spool) => control::execute(request, spool, None).await?,
            None => match control::request(&socket, &request).await {
                Err(ControlError::NotRunning(_)) => {
                    if !config.queue.dir.exists() {
                        return Err(format!("no spool at {} (is queue.dir right?)", config.queue.dir.display()));
                    }
                    let (spool, _) = Spool::open(&config.queue.dir).map_err(|e| e.to_string())?;
                    offline = Some(std::sync::Arc::new(spool));
                    continue;
                }
                other => other.map_err(|e| e.to_string())?,
            },
        };
        let page: Vec<ListedMessage> = serde_json::from_str(raw.get()).map_err(|e| format!("bad listing: {e}"))?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for m in &page {
            let text = if json {
                let item = serde_json::to_string_pretty(m).map_err(|e| e.to_string())?;
                format!("{}  {}", if count == 0 { "[\n" } else { ",\n" }, item.replace('\n', "\n  "))
            } else {
                format!("{}{}", if count == 0 { MAILQ_HEADER } else { "" }, mailq_entry(m))
            };
            out.write_all(text.as_bytes()).map_err(write_err)?;
            count += 1;
            bytes += m.size;
        }
        out.flush().map_err(write_err)?;
    }
    let end = match (json, count) {
        (true, 0) => "[]\n".to_string(),
        (true, _) => "\n]\n".to_string(),
        (false, 0) => MAILQ_EMPTY.to_string(),
        (false, _) => mailq_footer(count, bytes),
    };
    out.write_all(end.as_bytes()).and_then(|()| out.flush()).map_err(write_err)
}

/// "2026-11-29T13:14:06Z" -> "2026-11-29 13:14:06".
fn short_time(rfc3339: &str) -> String {
    rfc3339.trim_end_matches('Z').replacen('T', " ", 1).chars().take(19).collect()
}

fn show(detail: &MessageDetail) -> String {
    let e = &detail.envelope;
    let mut out = format!("Queue ID:     {}{}\n", e.id, if e.held { " (held)" } else { "" });
    let sender = if e.sender.is_empty() { "<>".to_string() } else { format!("<{}>", e.sender) };
    out += &format!("Sender:       {sender}\n");
    out += &format!("Arrived:      {}\n", rfc3339(e.arrived));
    let client = e.client_ip.map(|ip| ip.to_string()).unwrap_or_else(|| "local".into());
    out += &format!("From:         {} [{client}]\n", e.helo);
    out += &format!("Size:         {} bytes\n", e.size);
    out += &format!("Attempts:     {} (next {})\n", e.attempts, rfc3339(e.next_attempt));
    for r in &e.recipients {
        let status = format!("{:?}", r.status).to_lowercase();
        out += &format!("Recipient:    <{}> {status}", r.address);
        if let Some(err) = &r.last_error {
            out += &format!(": {err}");
        }
        out.push('\n');
    }
    out += "History:\n";
    for h in &e.history {
        out += &format!("  {}  {}\n", rfc3339(h.at), h.event);
    }
    out += "Headers:\n";
    out += &detail.headers.replace("\r\n", "\n");
    out
}

// --- `bartleby generate`: man pages and shell completions from this CLI definition, so they
// never drift from it. A separate parser keeps the command out of `--help`, the pages and the
// completions it writes; packagers call it (packaging/build-deb.sh).

/// `bartleby generate man DIR` | `bartleby generate completions SHELL`.
#[derive(Debug, Parser)]
#[command(
    name = "bartleby generate",
    bin_name = "bartleby generate",
    about = "Write man pages or shell completions (for packagers)"
)]
pub struct GenerateCli {
    #[command(subcommand)]
    pub what: GenerateCommand,
}

/// What `bartleby generate` writes.
#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Write bartleby.8 and one page per subcommand (bartleby-queue-list.8, ...) into DIR.
    Man { dir: PathBuf },
    /// Print the completion script for SHELL on stdout.
    Completions { shell: clap_complete::Shell },
}

fn generate(cli: GenerateCli) -> ExitCode {
    let result = match cli.what {
        GenerateCommand::Man { dir } => write_man_pages(&dir),
        GenerateCommand::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "bartleby", &mut std::io::stdout().lock());
            Ok(())
        }
    };
    exit_status(result)
}

/// Section 8 (system administration), since the binary lives in /usr/sbin. Clap's `help`
/// subcommand gets no page.
pub fn write_man_pages(dir: &Path) -> std::io::Result<()> {
    fn write(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            write(sub, dir)?;
        }
        clap_mangen::Man::new(cmd).section("8").generate_to(dir).map(|_| ())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    // Building gives subcommands their display names ("bartleby-queue-list"), which name the pages.
    cmd.build();
    write(cmd, dir)
}

/// Exit status 0, or 1 with the error on stderr.
fn exit_status(result: Result<(), impl std::fmt::Display>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bartleby: {err}");
            ExitCode::FAILURE
        }
    }
}
