//! Log output: one line per event on stderr, as text (`key=value` fields that logfmt parsers
//! read) or as JSON (`serve --log-format json`, one object per line: a public contract), with
//! sd-daemon(3) priority prefixes when stderr is the journal.
//!
//! Text lines are `TIME LEVEL message key=value ...`. A value with a space, a quote, a `=`, a
//! backslash or a control character, or an empty one, is written in double quotes with `\"`,
//! `\\`, `\n`, `\r`, `\t` escapes, whatever the field's type: the default formatter of
//! tracing-subscriber quotes `&str` fields but not `%` (Display) ones, so an SMTP reply such as
//! `550 5.1.1 no such user` would otherwise split into words.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, format};
use tracing_subscriber::registry::LookupSpan;

/// How `serve` writes its log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL message key=value ...`, values quoted where logfmt needs it.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message` and the event's fields.
    Json,
}

/// Installs the global subscriber (RUST_LOG filters, `info` by default).
pub fn init(log_format: LogFormat) {
    let journal = stderr_is_journal();
    let ansi = !journal && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = format().with_target(false).with_ansi(ansi);
    match (log_format, journal) {
        // journald timestamps each line itself.
        (LogFormat::Text, true) => install(Logfmt, Priority(text.without_time())),
        (LogFormat::Text, false) => install(Logfmt, text),
        (LogFormat::Json, journal) => {
            let json = format().json().flatten_event(true).with_current_span(false).with_span_list(false);
            let json = json.with_target(false);
            if journal {
                install(format::JsonFields::new(), Priority(json));
            } else {
                install(format::JsonFields::new(), json);
            }
        }
    }
}

fn install<N, E>(fields: N, event: E)
where
    N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    E: FormatEvent<tracing_subscriber::Registry, N> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .fmt_fields(fields)
        .event_format(event)
        .finish();
    // Fails only when a subscriber is already installed (a test that set one): keep that one.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Is stderr the journal? systemd sets JOURNAL_STREAM to the `DEVICE:INODE` of the stream it
/// connected, so a child whose stderr was redirected elsewhere is not fooled (sd-daemon(3),
/// systemd.exec(5)).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else { return false };
    value.to_str().is_some_and(|v| v == format!("{}:{}", stat.st_dev, stat.st_ino))
}

/// The sd-daemon(3) priority of a level: SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Prefixes each line with `<N>`, its syslog priority, which journald takes as the entry's
/// priority (and strips), so `journalctl -p warning` shows warnings and errors only.
struct Priority<E>(E);

impl<S, N, E> FormatEvent<S, N> for Priority<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The text format's fields: the message as it is, then `key=value` pairs, quoted as needed.
pub struct Logfmt;

impl<'w> FormatFields<'w> for Logfmt {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Visitor { writer, result: Ok(()), first: true };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{separator}{value}")
        } else {
            write!(self.writer, "{separator}{}={}", field.name(), quote(value))
        };
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// A logfmt value: as it is when it holds no space, quote, `=`, backslash or control character
/// and is not empty; else in double quotes with escapes.
pub fn quote(value: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| !(c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
    if !value.is_empty() && value.chars().all(plain) {
        return value.into();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_what_logfmt_would_split() {
        assert_eq!(quote("4.2.0"), "4.2.0");
        assert_eq!(quote("mx.example.test[127.0.0.2]:25"), "mx.example.test[127.0.0.2]:25");
        assert_eq!(quote("550 5.1.1 no such user"), "\"550 5.1.1 no such user\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("a=b"), "\"a=b\"");
        assert_eq!(quote("say \"hi\"\r\n"), "\"say \\\"hi\\\"\\r\\n\"");
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
    }
}
