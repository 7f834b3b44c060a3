//! The command line: `bartleby serve`, `check-config`, `check-dns`, `alert-test`, the `queue`
//! commands (mailq-style), `recipients` (the recipient cache) and `hash-password`.
//! Exit status: 0 success, 1 failure, 2 bad configuration.

use crate::config::StoreKind;
use crate::config::{Config, ConfigError, HumanDuration};
use crate::control::{
    self, BulkAction, BulkOutcome, ControlError, ListedMessage, MessageDetail, Request, Selection, ShapeReport,
};
use crate::spool::postgres::Role;
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
    Show {
        id: String,
        /// Also print the body (like postcat -b).
        #[arg(long)]
        body: bool,
    },
    /// Delete messages without sending a bounce (like postsuper -d).
    Delete {
        #[command(flatten)]
        targets: Targets,
    },
    /// Hold messages: they are not tried or flushed until released (like postsuper -h).
    Hold {
        #[command(flatten)]
        targets: Targets,
    },
    /// Release held messages and try them now (like postsuper -H); one not held is an error.
    Release {
        #[command(flatten)]
        targets: Targets,
    },
    /// Try messages now; a held one is an error (release it first).
    Retry {
        #[command(flatten)]
        targets: Targets,
    },
    /// Route messages again and try them now (like postsuper -r); works while the daemon is
    /// stopped too (they are tried when it starts).
    Requeue {
        #[command(flatten)]
        targets: Targets,
    },
    /// Return messages to their senders now (like exim -Mg): every pending recipient fails with
    /// 5.0.0 "returned by the operator", a failure notice goes to the sender, the message leaves.
    Bounce {
        #[command(flatten)]
        targets: Targets,
    },
    /// Stop deliveries to a relayed domain (like smtpctl pause); its mail stays queued. Kept
    /// across reloads and restarts.
    Pause { domain: String },
    /// Deliver to a paused domain again; its due messages are tried at once.
    Resume { domain: String },
    /// Counts by domain and age, like qshape (buckets of 5, 10, 20, ... 1280 minutes and more).
    Shape {
        /// The counts as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
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

/// The messages a bulk command acts on: queue IDs, `-` (IDs on standard input, as `queue list`
/// or `exiqgrep -i` print them), `ALL`, or a selection by the flags (not both IDs and flags).
#[derive(Debug, Clone, clap::Args)]
pub struct Targets {
    /// Queue IDs, `-` to read them from standard input, or `ALL`.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Messages whose sender contains this text (`<>`: the null sender).
    #[arg(long)]
    pub sender: Option<String>,
    /// Messages with a pending recipient containing this text.
    #[arg(long)]
    pub recipient: Option<String>,
    /// Messages with a pending recipient in this domain.
    #[arg(long)]
    pub domain: Option<String>,
    /// Messages that arrived at least this long ago (90s, 30m, 2h, 5d).
    #[arg(long, value_name = "AGE")]
    pub older_than: Option<HumanDuration>,
    /// Only held messages.
    #[arg(long, conflicts_with = "not_held")]
    pub held: bool,
    /// Only messages not held.
    #[arg(long)]
    pub not_held: bool,
}

impl Targets {
    /// The selection to send, reading standard input for `-` from `stdin`.
    pub fn selection(&self, stdin: impl std::io::Read) -> Result<Selection, String> {
        if self.ids.iter().filter(|a| *a == "-").count() > 1 {
            return Err("`-` may be given once".into());
        }
        let mut stdin = Some(stdin);
        let mut ids = Vec::new();
        let mut all = false;
        for arg in &self.ids {
            match arg.as_str() {
                // Standard input is read once; a second `-` was refused above.
                "-" => {
                    if let Some(input) = stdin.take() {
                        ids.extend(ids_from(&stdin_text(input)?)?);
                    }
                }
                "ALL" => all = true,
                id => ids.push(id.to_string()),
            }
        }
        if all && !ids.is_empty() {
            return Err("give queue IDs or ALL, not both".into());
        }
        let held = match (self.held, self.not_held) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let selection = Selection {
            ids,
            all,
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            domain: self.domain.clone(),
            older_than_seconds: self.older_than.map(|d| d.0.as_secs()),
            held,
        };
        match selection.problem() {
            Some(problem) => Err(problem.to_string()),
            None => Ok(selection),
        }
    }
}

fn stdin_text(mut stdin: impl std::io::Read) -> Result<String, String> {
    let mut text = String::new();
    stdin.read_to_string(&mut text).map_err(|e| format!("standard input: {e}"))?;
    Ok(text)
}

/// The queue IDs in text: the first word of each line (so `queue list` and `mailq` output can be
/// piped in, its `!` held mark dropped); lines whose first word is no queue ID (headers,
/// recipients, the footer) are skipped. No ID at all is an error.
pub fn ids_from(text: &str) -> Result<Vec<String>, String> {
    let ids: Vec<String> = text
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(|word| word.trim_end_matches(['!', '*']))
        .filter(|word| crate::spool::is_queue_id(word))
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return Err("no queue IDs on standard input".into());
    }
    Ok(ids)
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
    use crate::recipients::{self, CacheAt, cache::Source};
    let dir = match CacheAt::of(config) {
        Ok(at) => at,
        Err(err) => {
            eprintln!("bartleby: {err}");
            return ExitCode::FAILURE;
        }
    };
    let dir = &dir;
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
    crate::daemon::limit_malloc_arenas();
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
        QueueCommand::Show { id, body } => return queue_request(&config, Request::Show { id, body }),
        QueueCommand::Delete { targets } => return bulk(&config, BulkAction::Delete, &targets),
        QueueCommand::Hold { targets } => return bulk(&config, BulkAction::Hold, &targets),
        QueueCommand::Release { targets } => return bulk(&config, BulkAction::Release, &targets),
        QueueCommand::Retry { targets } => return bulk(&config, BulkAction::Retry, &targets),
        QueueCommand::Requeue { targets } => return bulk(&config, BulkAction::Requeue, &targets),
        QueueCommand::Bounce { targets } => return bulk(&config, BulkAction::Bounce, &targets),
        QueueCommand::Pause { domain } => return queue_request(&config, Request::Pause { domain, paused: true }),
        QueueCommand::Resume { domain } => return queue_request(&config, Request::Pause { domain, paused: false }),
        QueueCommand::Shape { json } => return shape(&config, json),
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

/// `queue export`: the local spool is read from its files (safe while the daemon runs); the
/// shared store through its queries.
fn export(config: &Config, file: &Path) -> Result<String, String> {
    let mut out: Box<dyn std::io::Write> = if file == Path::new("-") {
        Box::new(std::io::stdout().lock())
    } else {
        let out = std::fs::File::create(file).map_err(|e| format!("{}: {e}", file.display()))?;
        Box::new(std::io::BufWriter::new(out))
    };
    let count = match config.queue.store {
        StoreKind::Local => crate::spool::export(&config.queue.dir, &mut out),
        StoreKind::Postgres => {
            let (store, _) = crate::spool::open_store(config, Role::Tool).map_err(|e| e.to_string())?;
            crate::spool::export_from(store.as_ref(), &mut out)
        }
    }
    .map_err(|e| e.to_string())?;
    Ok(format!("exported {count} messages"))
}

/// `queue import` (`-` for standard input): into the local spool with the daemon stopped, or into
/// the shared store at any time.
fn import(config: &Config, file: &Path) -> Result<String, String> {
    let mut input: Box<dyn std::io::BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?))
    };
    let store = match crate::spool::open_store(config, Role::Tool) {
        Ok((store, _)) => store,
        Err(SpoolError::Locked(dir)) => {
            return Err(format!("{}: bartleby is running; stop it before importing", dir.display()));
        }
        Err(err) => return Err(err.to_string()),
    };
    let (imported, skipped) = crate::spool::import_into(&store, &mut input).map_err(|e| e.to_string())?;
    Ok(format!("imported {imported} messages ({skipped} already queued)"))
}

/// The store for a command run while the daemon is not (the local spool under its lock).
fn offline_store(config: &Config) -> Result<std::sync::Arc<dyn Queue>, String> {
    if config.queue.store == StoreKind::Local && !config.queue.dir.exists() {
        return Err(format!("no spool at {} (is queue.dir right?)", config.queue.dir.display()));
    }
    crate::spool::open_store(config, Role::Tool).map(|(store, _)| store).map_err(|e| e.to_string())
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
    let spool = offline_store(config)?;
    control::execute(request, &spool, None).await
}

/// A bulk command: one line per message (failures on stderr), then a summary; exit 1 if one failed.
fn bulk(config: &Config, action: BulkAction, targets: &Targets) -> ExitCode {
    let selection = match targets.selection(std::io::stdin().lock()) {
        Ok(selection) => selection,
        Err(err) => {
            eprintln!("bartleby: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes =
        runtime().map_err(|e| e.to_string()).and_then(|rt| rt.block_on(send_bulk(config, action, selection)));
    match outcomes {
        Ok(outcomes) => {
            for o in outcomes.iter().filter(|o| !o.ok) {
                eprintln!("bartleby: {}: {}", o.id, o.text);
            }
            print!("{}", render_bulk(action, &outcomes));
            if outcomes.iter().all(|o| o.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(err) => {
            eprintln!("bartleby: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Queue IDs per bulk request: a control request is at most 64 KiB, and a list piped in may
/// hold a million.
const IDS_PER_REQUEST: usize = 1000;

/// Sends a bulk action, a slice of the IDs at a time when it names IDs; the outcomes in order.
async fn send_bulk(config: &Config, action: BulkAction, selection: Selection) -> Result<Vec<BulkOutcome>, String> {
    let parse = |raw: Box<RawValue>| {
        serde_json::from_str::<Vec<BulkOutcome>>(raw.get()).map_err(|e| format!("bad response: {e}"))
    };
    if selection.ids.is_empty() {
        return parse(send(config, Request::Bulk { action, selection }).await?);
    }
    let mut outcomes = Vec::with_capacity(selection.ids.len());
    for ids in selection.ids.chunks(IDS_PER_REQUEST) {
        let slice = Selection { ids: ids.to_vec(), ..Selection::default() };
        outcomes.extend(parse(send(config, Request::Bulk { action, selection: slice }).await?)?);
    }
    Ok(outcomes)
}

/// The lines of the messages done and the summary: "-- 3 messages held, 1 failed".
pub fn render_bulk(action: BulkAction, outcomes: &[BulkOutcome]) -> String {
    let mut out = String::new();
    for o in outcomes.iter().filter(|o| o.ok) {
        out += &format!("{}: {}\n", o.id, o.text);
    }
    let done = outcomes.iter().filter(|o| o.ok).count();
    let failed = outcomes.len() - done;
    let verb = match action {
        BulkAction::Hold => "held",
        BulkAction::Release => "released",
        BulkAction::Delete => "deleted",
        BulkAction::Retry => "scheduled for delivery now",
        BulkAction::Requeue => "requeued",
        BulkAction::Bounce => "returned",
    };
    let s = if done == 1 { "" } else { "s" };
    out += &match (outcomes.len(), failed) {
        (0, _) => "-- no message matched\n".to_string(),
        (_, 0) => format!("-- {done} message{s} {verb}\n"),
        _ => format!("-- {done} message{s} {verb}, {failed} failed\n"),
    };
    out
}

/// `queue shape`: the qshape table, or its JSON.
fn shape(config: &Config, json: bool) -> ExitCode {
    let result = runtime().map_err(|e| e.to_string()).and_then(|rt| rt.block_on(send(config, Request::Shape)));
    let report =
        result.and_then(|raw| serde_json::from_str::<ShapeReport>(raw.get()).map_err(|e| format!("bad response: {e}")));
    match report {
        Ok(report) if json => {
            let totals = report.totals();
            let value = serde_json::json!({
                "buckets_minutes": report.buckets_minutes, "domains": report.domains, "total": totals,
            });
            println!("{value}");
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", render_shape(&report));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bartleby: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The shape as qshape prints it: a column T (the domain's total) and one per age bucket headed
/// by its upper bound in minutes (the last, "1280+", by its lower), a TOTAL row first, then the
/// domains, most messages first.
pub fn render_shape(report: &ShapeReport) -> String {
    let bounds = &report.buckets_minutes;
    let mut header = vec!["T".to_string()];
    header.extend(bounds.iter().skip(1).map(u64::to_string));
    if let Some(last) = bounds.last() {
        header.push(format!("{last}+"));
    }
    let row = |counts: &[usize]| {
        let mut cells = vec![counts.iter().sum::<usize>().to_string()];
        cells.extend(counts.iter().map(usize::to_string));
        cells
    };
    let mut rows = vec![("TOTAL".to_string(), row(&report.totals()))];
    let mut domains: Vec<(&String, &Vec<usize>)> = report.domains.iter().collect();
    domains.sort_by_key(|(d, counts)| (std::cmp::Reverse(counts.iter().sum::<usize>()), (*d).clone()));
    rows.extend(domains.into_iter().map(|(d, counts)| (d.clone(), row(counts))));
    let name_width = rows.iter().map(|(d, _)| d.len()).max().unwrap_or(5);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|(_, c)| c.get(i).map_or(0, String::len)).chain([header[i].len()]).max().unwrap_or(1))
        .collect();
    let line = |name: &str, cells: &[String]| {
        let mut out = format!("{name:>name_width$}");
        for (cell, width) in cells.iter().zip(&widths) {
            out += &format!(" {cell:>width$}");
        }
        out + "\n"
    };
    let mut out = line("", &header);
    for (name, cells) in &rows {
        out += &line(name, cells);
    }
    out
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
fn mailq_entry(out: &mut String, m: &ListedMessage) {
    use std::fmt::Write;
    let mark = if m.held { "!" } else { " " };
    let sender = if m.sender.is_empty() { "MAILER-DAEMON" } else { &m.sender };
    let _ = writeln!(out, "{}{mark}{:>9} {:>20}  {sender}", m.id, m.size, short_time(&m.arrived));
    if let Some(error) = &m.last_error {
        let _ = writeln!(out, "{:49}({error})", "");
    }
    for rcpt in &m.recipients {
        let _ = writeln!(out, "{:49}{rcpt}", "");
    }
    out.push('\n');
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

/// One page of the listing, asked of the running daemon or, with `offline`, of the store itself.
/// None: the daemon is not running.
async fn fetch_page(
    socket: std::path::PathBuf,
    offline: Option<std::sync::Arc<dyn Queue>>,
    after: Option<String>,
) -> Result<Option<Vec<ListedMessage>>, String> {
    let request = Request::ListPage { after, limit: LIST_PAGE };
    let raw = match &offline {
        Some(spool) => control::execute(request, spool, None).await?,
        None => match control::request(&socket, &request).await {
            Err(ControlError::NotRunning(_)) => return Ok(None),
            other => other.map_err(|e| e.to_string())?,
        },
    };
    serde_json::from_str(raw.get()).map(Some).map_err(|e| format!("bad listing: {e}"))
}

async fn list_pages(config: &Config, json: bool) -> Result<(), String> {
    use std::io::Write;
    let socket = Spool::control_socket_path(&config.queue.dir);
    let mut offline: Option<std::sync::Arc<dyn Queue>> = None;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut count, mut bytes) = (0usize, 0u64);
    let write_err = |e: std::io::Error| format!("standard output: {e}");
    // The next page is asked for as soon as this one's last ID is known, so the daemon reads it
    // while this one is printed (with a million queued, the two halves of the work overlap).
    let mut next = tokio::spawn(fetch_page(socket.clone(), None, None));
    loop {
        let fetched = next.await.map_err(|e| e.to_string())??;
        let page = match fetched {
            Some(page) => page,
            None => {
                offline = Some(offline_store(config)?);
                next = tokio::spawn(fetch_page(socket.clone(), offline.clone(), None));
                continue;
            }
        };
        let Some(last) = page.last() else { break };
        next = tokio::spawn(fetch_page(socket.clone(), offline.clone(), Some(last.id.clone())));
        let mut text = String::with_capacity(page.len() * 160);
        for m in &page {
            if json {
                let item = serde_json::to_string_pretty(m).map_err(|e| e.to_string())?;
                text += if count == 0 { "[\n  " } else { ",\n  " };
                text += &item.replace('\n', "\n  ");
            } else {
                if count == 0 {
                    text += MAILQ_HEADER;
                }
                mailq_entry(&mut text, m);
            }
            count += 1;
            bytes += m.size;
        }
        out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(write_err)?;
    }
    let mut end = match (json, count) {
        (true, 0) => "[]\n".to_string(),
        (true, _) => "\n]\n".to_string(),
        (false, 0) => MAILQ_EMPTY.to_string(),
        (false, _) => mailq_footer(count, bytes),
    };
    // Paused domains are the running scheduler's; the table says which, as a last line.
    if !json
        && offline.is_none()
        && let Ok(raw) = control::request(&socket, &Request::Paused).await
        && let Ok(paused) = serde_json::from_str::<Vec<String>>(raw.get())
        && !paused.is_empty()
    {
        end += &format!("-- Deliveries paused for: {}\n", paused.join(", "));
    }
    out.write_all(end.as_bytes()).and_then(|()| out.flush()).map_err(write_err)
}

/// "2026-11-29T13:14:06Z" -> "2026-11-29 13:14:06".
fn short_time(rfc3339: &str) -> String {
    let mut short: String = rfc3339.trim_end_matches('Z').chars().take(19).collect();
    if let Some(t) = short.find('T') {
        short.replace_range(t..=t, " ");
    }
    short
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
    if let Some(node) = &e.accepted_by {
        out += &format!("Accepted by:  node {node}\n");
    }
    if let Some(node) = &e.leased_by {
        out += &format!("Delivering:   node {node} (holds its lease)\n");
    }
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
    if let Some(body) = &detail.body {
        out += "Body:\n";
        out += &body.replace("\r\n", "\n");
    }
    out
}

// --- `bartleby generate completions SHELL`: shell completions from this CLI definition, so they
// never drift from it. A separate parser keeps the command out of `--help` and of the
// completions it writes; packagers call it (packaging/build-deb.sh). The man pages are written
// by hand (packaging/man/); tests/docs_complete.rs checks that they name every command and option.

/// `bartleby generate completions SHELL`.
#[derive(Debug, Parser)]
#[command(
    name = "bartleby generate",
    bin_name = "bartleby generate",
    about = "Write shell completions (for packagers)"
)]
pub struct GenerateCli {
    #[command(subcommand)]
    pub what: GenerateCommand,
}

/// What `bartleby generate` writes.
#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Print the completion script for SHELL on stdout.
    Completions { shell: clap_complete::Shell },
}

fn generate(cli: GenerateCli) -> ExitCode {
    match cli.what {
        GenerateCommand::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "bartleby", &mut std::io::stdout().lock());
            ExitCode::SUCCESS
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn targets(ids: &[&str]) -> Targets {
        Targets {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            sender: None,
            recipient: None,
            domain: None,
            older_than: None,
            held: false,
            not_held: false,
        }
    }

    #[test]
    fn ids_come_from_arguments_standard_input_or_all() {
        let id = "0A1B2C3D4E5F6789".to_string();
        let picked = targets(&[&id]).selection(std::io::empty()).expect("one ID");
        assert_eq!((picked.ids, picked.all), (vec![id.clone()], false));
        let listing = format!(
            "-Queue ID- --Size--\n{id}!    1234 2026-12-01  a@b.test\n   c@d.test\n-- 2 Kbytes in 1 Request.\n"
        );
        let piped = targets(&["-"]).selection(listing.as_bytes()).expect("from stdin");
        assert_eq!(piped.ids, vec![id.clone()], "the held mark and the other lines are dropped");
        let err = targets(&["-"]).selection(&b""[..]).expect_err("empty stdin");
        assert!(err.contains("no queue IDs on standard input"), "{err}");
        assert!(targets(&["ALL"]).selection(std::io::empty()).expect("ALL").all);
        let err = targets(&["ALL", &id]).selection(std::io::empty()).expect_err("both");
        assert!(err.contains("not both"), "{err}");
        let err = targets(&[]).selection(std::io::empty()).expect_err("nothing named");
        assert!(err.contains("name the messages"), "{err}");
        let mut by_age = targets(&[]);
        by_age.older_than = Some(HumanDuration::hours(2));
        by_age.not_held = true;
        let selection = by_age.selection(std::io::empty()).expect("a selection");
        let filter = selection.filter().expect("a filter");
        assert_eq!((filter.older_than, filter.held), (Some(std::time::Duration::from_secs(7200)), Some(false)));
        let mut mixed = by_age.clone();
        mixed.ids = vec![id];
        assert!(mixed.selection(std::io::empty()).is_err(), "IDs and a selection");
    }

    #[test]
    fn bulk_output_is_a_line_per_message_and_a_summary() {
        let outcome = |id: &str, ok: bool, text: &str| BulkOutcome { id: id.into(), ok, text: text.into() };
        let out = render_bulk(BulkAction::Hold, &[outcome("A", true, "held"), outcome("B", false, "no message B")]);
        assert_eq!(out, "A: held\n-- 1 message held, 1 failed\n", "failures go to stderr");
        assert_eq!(render_bulk(BulkAction::Delete, &[]), "-- no message matched\n");
        let out = render_bulk(BulkAction::Bounce, &[outcome("A", true, "returned"), outcome("B", true, "returned")]);
        assert!(out.ends_with("-- 2 messages returned\n"), "{out}");
    }

    #[test]
    fn shape_reads_like_qshape() {
        let mut domains = BTreeMap::new();
        domains.insert("small.test".to_string(), vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        domains.insert("example.test".to_string(), vec![2, 0, 0, 0, 0, 0, 0, 0, 0, 13]);
        let report = ShapeReport { buckets_minutes: crate::spool::SHAPE_BUCKETS_MINUTES.to_vec(), domains };
        let table = render_shape(&report);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[0].split_whitespace().eq(["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"])
        );
        assert!(lines[1].split_whitespace().eq(["TOTAL", "16", "3", "0", "0", "0", "0", "0", "0", "0", "0", "13"]));
        assert!(lines[2].trim_start().starts_with("example.test 15"), "most messages first: {table}");
        assert!(lines[3].trim_start().starts_with("small.test  1"), "{table}");
        assert_eq!(lines.iter().map(|l| l.len()).collect::<BTreeSet<_>>().len(), 1, "aligned: {table}");
    }
}
