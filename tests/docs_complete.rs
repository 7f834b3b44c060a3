//! The reference documentation is complete (issue 14, point 9): bartleby(8) names every command
//! and option that clap defines; every configuration key is in bartleby.toml(5) with its type and
//! default, in README.md and in the packaged conffile (commented, with its default).
//!
//! The keys come from the configuration structs themselves: a configuration built with a struct
//! literal for every struct (so a new field does not compile until it is given a value here),
//! every optional key set and every list of tables given one entry, serialized to TOML. Names an
//! administrator chooses (domains, accounts) are written `NAME` there and stand for any name.

use bartleby::config::{
    BounceUnverified, CheckConfig, CheckKind, Cidr, CommandChannel, Config, DeliveryConfig, DnsConfig, DomainConfig,
    EmailChannel, HumanDuration, LdapSource, MonitorConfig, PregreetAction, QueueConfig, RelayConfig, Route,
    SmtpConfig, SourceAddress, StoreKind, Switch, UnknownPolicy, WebConfig, WebhookChannel,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use toml::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// A name the administrator chooses: a key of `[routes]`, `[domain."..."]` or `[web] users`.
const NAME: &str = "NAME";
/// How a chosen name is written in a key path.
const ANY: &str = "*";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn path(p: &str) -> Option<PathBuf> {
    Some(PathBuf::from(p))
}

fn every_key_set() -> Config {
    let d = HumanDuration::seconds;
    let cidr = |c: &str| c.parse::<Cidr>().expect("cidr");
    let route = |h: &str| Route { host: h.into(), port: 25 };
    let addr = "192.0.2.1:25".parse().expect("addr");
    Config {
        hostname: "backup.example.test".into(),
        user: Some("bartleby".into()),
        group: Some("bartleby".into()),
        smtp: SmtpConfig {
            listen: vec![addr],
            max_message_size: 1,
            tls_cert: path("/c"),
            tls_key: path("/k"),
            max_recipients: 1,
            max_line_length: 1,
            max_sessions: 1,
            max_received_headers: 1,
            command_timeout: d(1),
            data_timeout: d(1),
            command_deadline: d(1),
            data_deadline: d(1),
            data_min_rate: 1,
            overload_timeout: d(1),
            pregreet_delay: d(1),
            pregreet_action: PregreetAction::Log,
            etrn_allow: vec![cidr("192.0.2.0/24")],
            proxy_from: vec![cidr("192.0.2.0/24")],
            max_sessions_per_ip: 1,
            max_messages_per_ip_per_minute: 1,
            max_recipients_per_ip_per_minute: 1,
            max_errors: 1,
            max_header_size: 1,
            sender_auth: true,
            bounce_unverified: BounceUnverified::Hold,
            callouts_per_minute: 1,
            callout_positive_ttl: d(1),
            callout_negative_ttl: d(1),
            callout_timeout: d(1),
        },
        relay: RelayConfig { domains: vec!["example.test".into()], also_me: vec!["mx.example.test".into()] },
        dns: DnsConfig { nameservers: vec![addr] },
        queue: QueueConfig {
            dir: "/q".into(),
            retry_interval: d(1),
            first_retry: d(1),
            max_lifetime: d(1),
            warn_after: d(1),
            min_free: 1,
            store: StoreKind::Postgres,
            url: Some("postgres://db/q".into()),
            password_file: path("/p"),
            ca_file: path("/ca"),
            node: Some("n".into()),
            lease: d(1),
            db_timeout: d(1),
        },
        routes: BTreeMap::from([(NAME.into(), route("192.0.2.2"))]),
        domain: BTreeMap::from([(
            NAME.into(),
            DomainConfig {
                strict_order: true,
                require_tls: true,
                recipients_file: path("/r"),
                callout: true,
                recipients_ldap: Some(LdapSource {
                    url: "ldap://dc".into(),
                    bind_dn: Some("cn=b".into()),
                    password_file: path("/p"),
                    base: "dc=x".into(),
                    filter: "(mail=%s)".into(),
                    starttls: true,
                    ca_file: path("/ca"),
                    timeout: d(1),
                }),
                unknown_recipient: UnknownPolicy::Hold,
                mta_sts: Some(Switch::On),
                dane: Some(Switch::On),
            },
        )]),
        delivery: DeliveryConfig {
            max_connections_per_destination: 1,
            mx_port: 1,
            connect_timeout: d(1),
            greeting_timeout: d(1),
            command_timeout: d(1),
            data_init_timeout: d(1),
            data_block_timeout: d(1),
            data_done_timeout: d(1),
            tls_ca_file: path("/ca"),
            mta_sts: Switch::On,
            mta_sts_port: 1,
            dane: Switch::On,
            dnssec_trust_anchor: path("/t"),
            dns_timeout: d(1),
            source_address: SourceAddress { v4: Some("192.0.2.3".parse().expect("ip")), v6: None },
        },
        web: WebConfig {
            listen: addr,
            allow: vec![cidr("127.0.0.1")],
            users: BTreeMap::from([(NAME.into(), "$argon2id$".into())]),
            trust_allowed_hosts: true,
            hostnames: Some(vec!["localhost".into()]),
            tls_cert: path("/c"),
            tls_key: path("/k"),
            flush_cooldown: d(1),
            disk_warn_percent: 1,
            disk_critical_percent: 1,
            sample_interval: d(1),
        },
        monitor: MonitorConfig {
            probe_interval: d(1),
            probe_timeout: d(1),
            primary_down_after: d(1),
            queue_max_messages: 1,
            queue_max_age: d(1),
            spool_min_free_percent: 1,
            reminder_interval: d(1),
            command: vec![CommandChannel { argv: vec!["/bin/true".into()], timeout: d(1) }],
            webhook: vec![WebhookChannel { url: "http://h/".into(), timeout: d(1) }],
            email: vec![EmailChannel {
                to: vec!["a@b.test".into()],
                from: Some("c@d.test".into()),
                smarthost: route("192.0.2.4"),
                timeout: d(1),
            }],
            check: vec![CheckConfig {
                name: "n".into(),
                kind: CheckKind::Tcp,
                target: "h:1".into(),
                expect_status: 200,
                down_after: d(1),
                timeout: d(1),
            }],
        },
    }
}

/// Every key as a dotted path, `*` for a chosen name: `smtp.listen`, `routes.*`,
/// `domain.*.recipients_ldap.url`, `monitor.command.argv` (an array of tables is its entry's keys).
fn reference_keys() -> BTreeSet<String> {
    let tree = Value::try_from(every_key_set()).expect("the configuration serializes");
    let mut keys = BTreeSet::new();
    walk(&tree, "", &|_: &str, key: &str| if key == NAME { ANY.into() } else { key.into() }, &mut keys);
    assert!(keys.len() > 100 && keys.contains("delivery.tls_ca_file"), "{keys:?}");
    keys
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

/// Collects the leaf keys of a TOML tree; `name` maps a key under `prefix` to its path segment.
fn walk(value: &Value, prefix: &str, name: &dyn Fn(&str, &str) -> String, out: &mut BTreeSet<String>) {
    match value {
        Value::Table(table) => {
            for (key, value) in table {
                walk(value, &join(prefix, &name(prefix, key)), name, out);
            }
        }
        Value::Array(items) if items.first().is_some_and(Value::is_table) => {
            for item in items {
                walk(item, prefix, name, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

/// The keys a document's TOML shows: a key under a table of chosen names (`[domain."x.test"]`)
/// is that table's `*`.
fn keys_shown(tree: &Value, reference: &BTreeSet<String>) -> BTreeSet<String> {
    let chosen = |prefix: &str, key: &str| {
        let wild = join(prefix, ANY);
        let known = join(prefix, key);
        let is_prefix = |p: &str| reference.iter().any(|r| r == p || r.starts_with(&format!("{p}.")));
        if !is_prefix(&known) && is_prefix(&wild) { ANY.to_string() } else { key.to_string() }
    };
    let mut keys = BTreeSet::new();
    walk(tree, "", &chosen, &mut keys);
    keys
}

/// A key path's value in a TOML tree (the first entry of an array of tables).
fn lookup<'a>(tree: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(tree, |value, part| match value {
        Value::Array(items) => items.first().and_then(|t| t.get(part)),
        _ => value.get(part),
    })
}

/// The defaults as TOML: every key the built-in configuration gives a value other than an empty
/// list, except `hostname` (this machine's name).
fn defaults() -> BTreeMap<String, Value> {
    let config = Config::parse("", "empty.toml").expect("the empty configuration is valid");
    let tree = Value::try_from(config).expect("serializes");
    let mut keys = BTreeSet::new();
    walk(&tree, "", &|_: &str, key: &str| key.to_string(), &mut keys);
    keys.into_iter()
        .filter(|key| key != "hostname")
        .filter_map(|key| lookup(&tree, &key).cloned().map(|value| (key, value)))
        .filter(|(_, value)| !matches!(value, Value::Array(a) if a.is_empty()))
        .filter(|(_, value)| !matches!(value, Value::Table(t) if t.is_empty()))
        .collect()
}

fn missing(reference: &BTreeSet<String>, shown: &BTreeSet<String>) -> Vec<String> {
    // A table of chosen names with plain values (`routes.*`, `web.users.*`) may be shown as the
    // table itself: `[routes]`, `users = { ... }`.
    let has = |key: &String| shown.contains(key) || key.strip_suffix(".*").is_some_and(|t| shown.contains(t));
    reference.iter().filter(|key| !has(key)).cloned().collect()
}

// ---------------------------------------------------------------------------------------------
// The packaged conffile
// ---------------------------------------------------------------------------------------------

/// The conffile with every commented setting (`#key = ...`, `#[table]`; prose has a space after
/// `#`) uncommented.
fn conffile_uncommented() -> String {
    let text = read("packaging/bartleby.toml");
    text.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '"' || c == '[') => rest,
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

#[test]
fn the_conffile_shows_every_key_with_its_default() {
    let text = conffile_uncommented();
    // Keys and value types; not the checks of Config::parse that need the files it names, one
    // store or the other, or this host's addresses.
    if let Err(err) = toml::from_str::<Config>(&text) {
        panic!("packaging/bartleby.toml with every setting uncommented: {err}\n{text}");
    }
    let tree: Value = toml::from_str(&text).expect("TOML");
    let reference = reference_keys();
    let gaps = missing(&reference, &keys_shown(&tree, &reference));
    assert!(gaps.is_empty(), "packaging/bartleby.toml does not show {gaps:?}");
    for (key, default) in defaults() {
        let shown = lookup(&tree, &key).unwrap_or_else(|| panic!("{key} is not in the conffile"));
        assert_eq!(shown, &default, "packaging/bartleby.toml: {key} shows {shown}, but its default is {default}");
    }
}

// ---------------------------------------------------------------------------------------------
// README.md
// ---------------------------------------------------------------------------------------------

/// README's ```toml blocks, each a valid piece of configuration.
fn readme_toml_blocks() -> Vec<String> {
    let readme = read("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn readme_documents_every_key() {
    let reference = reference_keys();
    let mut shown = BTreeSet::new();
    for block in readme_toml_blocks() {
        if let Err(err) = toml::from_str::<Config>(&block) {
            panic!("a ```toml block of README.md is no configuration: {err}\n{block}");
        }
        let tree: Value = toml::from_str(&block).expect("TOML");
        shown.extend(keys_shown(&tree, &reference));
    }
    let gaps = missing(&reference, &shown);
    assert!(gaps.is_empty(), "README.md's ```toml blocks do not show {gaps:?}");
}

#[test]
fn readme_names_the_rust_prerequisite_before_its_two_commands() {
    let readme = read("README.md");
    let commands = readme.find("cargo run --release").expect("the first of the two commands");
    let before = &readme[..commands];
    assert!(
        before.contains("Rust 1.95") && before.contains("rustup"),
        "README.md must say, before `cargo run`, how to get Rust 1.95"
    );
}

// ---------------------------------------------------------------------------------------------
// The man pages
// ---------------------------------------------------------------------------------------------

/// A line of roff as text: the arguments of a font macro joined, escapes replaced.
fn plain(line: &str) -> String {
    let text = match line.split_once(' ') {
        Some((".B" | ".I", rest)) => rest.replace('"', ""),
        Some((".BR" | ".BI" | ".IR" | ".RB" | ".IB" | ".RI", rest)) => split_unquoted(rest, ' ').concat(),
        _ => line.to_string(),
    };
    let mut text = text;
    for (from, to) in [("\\-", "-"), ("\\(dq", "\""), ("\\(lq", "\""), ("\\(rq", "\""), ("\\(en", "-"), ("\\&", "")] {
        text = text.replace(from, to);
    }
    for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        text = text.replace(font, "");
    }
    text.trim().to_string()
}

/// `s` split at each `separator` outside double quotes, the quotes dropped: a roff macro's
/// arguments (`' '`) or a TOML table path (`'.'`).
fn split_unquoted(s: &str, separator: char) -> Vec<String> {
    let (mut parts, mut part, mut quoted) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c == separator && !quoted => parts.push(std::mem::take(&mut part)),
            c => part.push(c),
        }
    }
    parts.push(part);
    parts
}

/// A page's `.TP` / `.TQ` tag lines as text, each with the `.SH` and `.SS` it is under.
struct Tag {
    section: String,
    subsection: String,
    text: String,
}

fn tags(page: &str) -> Vec<Tag> {
    let (mut section, mut subsection) = (String::new(), String::new());
    let mut tags = Vec::new();
    let mut lines = page.lines();
    while let Some(line) = lines.next() {
        if let Some(title) = line.strip_prefix(".SH ") {
            (section, subsection) = (plain(title).replace('"', ""), String::new());
        } else if let Some(title) = line.strip_prefix(".SS ") {
            subsection = plain(title).trim_matches('"').to_string();
        } else if (line == ".TP" || line == ".TQ")
            && let Some(tag) = lines.next()
        {
            tags.push(Tag { section: section.clone(), subsection: subsection.clone(), text: plain(tag) });
        }
    }
    tags
}

/// `[domain."DOMAIN".recipients_ldap]` -> `domain.*.recipients_ldap`; `Top-level keys` -> ``.
fn table_path(subsection: &str) -> Option<String> {
    let inner = subsection.trim_start_matches('[').trim_end_matches(']');
    if inner.len() == subsection.len() {
        return (subsection == "Top-level keys").then(String::new);
    }
    let parts = split_unquoted(inner, '.');
    Some(
        parts
            .iter()
            .map(|p| if p.chars().any(|c| c.is_ascii_uppercase()) { ANY } else { p })
            .collect::<Vec<_>>()
            .join("."),
    )
}

#[test]
fn bartleby_toml_5_describes_every_key_with_its_type_and_default() {
    let page = read("packaging/man/bartleby.toml.5");
    let mut documented: BTreeMap<String, String> = BTreeMap::new();
    for tag in tags(&page).into_iter().filter(|t| t.section == "KEYS") {
        let table = table_path(&tag.subsection).unwrap_or_else(|| panic!("not a table: {}", tag.subsection));
        let (key, rest) = tag.text.split_once(" = ").unwrap_or_else(|| panic!("not `key = type`: {}", tag.text));
        let key = if key.starts_with('"') { ANY } else { key };
        assert!(!rest.trim().is_empty(), "{key}: no type");
        documented.insert(join(&table, key), tag.text.clone());
    }
    let reference = reference_keys();
    let shown: BTreeSet<String> = documented.keys().cloned().collect();
    let gaps = missing(&reference, &shown);
    assert!(gaps.is_empty(), "bartleby.toml(5) does not describe {gaps:?}");
    // A table may be described as a key of its parent (`recipients_ldap = table`).
    let real = |k: &String| reference.iter().any(|r| r == k || r.starts_with(&format!("{k}.")));
    let stale: Vec<&String> = shown.iter().filter(|k| !real(k)).collect();
    assert!(stale.is_empty(), "bartleby.toml(5) describes keys that do not exist: {stale:?}");
    for (key, default) in defaults() {
        let tag = &documented[&key];
        let text = default.to_string();
        assert!(tag.contains(&format!("default {text}")), "bartleby.toml(5): {key} must say `default {text}`: {tag}");
    }
}

/// Every command as its words (`queue list`), with the clap command.
fn leaf_commands() -> Vec<(String, clap::Command)> {
    fn collect(prefix: &str, cmd: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let words = join(prefix, sub.get_name()).replace('.', " ");
            if sub.has_subcommands() {
                collect(&words, sub, out);
            } else {
                out.push((words, sub.clone()));
            }
        }
    }
    let mut cli = <bartleby::cli::Cli as clap::CommandFactory>::command();
    cli.build();
    let mut out = Vec::new();
    collect("", &cli, &mut out);
    out
}

#[test]
fn bartleby_8_lists_every_command_and_option() {
    let page = read("packaging/man/bartleby.8");
    let tags = tags(&page);
    let commands: Vec<&Tag> = tags.iter().filter(|t| t.section == "COMMANDS").collect();
    let selection: Vec<&Tag> = commands.iter().copied().filter(|t| t.subsection == "Selecting messages").collect();
    let leaves = leaf_commands();
    assert!(leaves.len() >= 20, "{} commands", leaves.len());
    for (words, cmd) in &leaves {
        let tag = commands
            .iter()
            .find(|t| t.text == *words || t.text.starts_with(&format!("{words} ")))
            .unwrap_or_else(|| panic!("bartleby(8) has no entry for `bartleby {words}`"));
        // The placeholder `messages` stands for the IDs and options of "Selecting messages".
        let selects = tag.text.split_whitespace().any(|w| w == "messages");
        for arg in
            cmd.get_arguments().filter(|a| !a.is_global_set() && !["help", "version"].contains(&a.get_id().as_str()))
        {
            let shown = match arg.get_long() {
                Some(long) => {
                    let flag = format!("--{long}");
                    tag.text.contains(&flag) || (selects && selection.iter().any(|t| t.text.starts_with(&flag)))
                }
                None => {
                    let names = arg.get_value_names().map(|n| n.iter().map(|s| s.to_string()).collect::<Vec<_>>());
                    let name = names.and_then(|n| n.first().cloned()).unwrap_or_else(|| arg.get_id().to_string());
                    // Singular in the page: `domain ...` for DOMAINS, `address ...` for ADDRESSES.
                    let name = name.to_lowercase();
                    let singular = name.strip_suffix("sses").map(|s| format!("{s}ss")).unwrap_or(name.clone());
                    let singular =
                        singular.strip_suffix('s').filter(|_| !singular.ends_with("ss")).unwrap_or(&singular);
                    tag.text.to_lowercase().contains(singular) || (selects && page.to_lowercase().contains("queue ids"))
                }
            };
            assert!(
                shown,
                "bartleby(8): `bartleby {words}` does not show its argument {:?}: {}",
                arg.get_id(),
                tag.text
            );
        }
    }
    // And nothing that is not a command.
    for tag in commands.iter().filter(|t| !t.text.starts_with('-')) {
        assert!(
            leaves.iter().any(|(w, _)| tag.text == *w || tag.text.starts_with(&format!("{w} "))),
            "bartleby(8) lists `{}`, which is no command",
            tag.text
        );
    }
    let options: Vec<&Tag> = tags.iter().filter(|t| t.section == "OPTIONS").collect();
    let cli = <bartleby::cli::Cli as clap::CommandFactory>::command();
    for arg in cli.get_arguments() {
        for flag in arg.get_long().map(|l| format!("--{l}")).into_iter().chain(arg.get_short().map(|s| format!("-{s}")))
        {
            assert!(options.iter().any(|t| t.text.split([',', ' ']).any(|w| w == flag)), "OPTIONS lack {flag}");
        }
    }
    for section in ["EXIT STATUS", "SIGNALS", "ENVIRONMENT", "FILES", "SEE ALSO"] {
        assert!(page.contains(&format!(".SH {section}\n")), "bartleby(8) has no {section}");
    }
}

/// What man itself says of the pages: no warning from groff or man.
#[test]
fn man_pages_format_without_warnings() {
    for page in ["packaging/man/bartleby.8", "packaging/man/bartleby.toml.5"] {
        let file = Path::new(REPO).join(page);
        let out = std::process::Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(&file)
            .env("MANWIDTH", "80")
            .output()
            .expect("man (apt-get install man-db)");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && warnings.trim().is_empty(), "{page}: man --warnings:\n{warnings}");
        assert!(!out.stdout.is_empty(), "{page}: nothing formatted");
    }
}
