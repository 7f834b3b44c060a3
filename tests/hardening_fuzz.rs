//! The three fuzz entry points of `fuzz/` (command parser, DATA reader, config loader), driven on the
//! stable toolchain by a seeded random generator that mutates realistic inputs: bounded in count and
//! time, reproducible from the seed printed on failure. Crashes found by cargo-fuzz become cases in
//! `REGRESSIONS` below, or a test of their own that reads the crash's file in `fuzz/corpus/`.

use bartleby::config::Config;
use bartleby::control::ListedMessage;
use bartleby::dsn::{self, DsnKind, ReportedRecipient};
use bartleby::smtp::command;
use bartleby::smtp::data::DataReader;
use bartleby::spool::{Envelope, from_micros};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Total time per entry point; the loop stops at this or at `ROUNDS`.
const BUDGET: Duration = Duration::from_secs(5);
const ROUNDS: usize = 20_000;

const COMMANDS: &[&[u8]] = &[
    b"EHLO client.test",
    b"MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x+2Bq SMTPUTF8",
    b"RCPT TO:<x@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40example.test",
    b"RCPT TO:<@relay.test:x@example.test>",
    b"MAIL FROM:<\"quoted local\"@b.test>",
    b"VRFY postmaster",
    b"DATA",
    b"STARTTLS",
];

const MESSAGES: &[&[u8]] = &[
    b"Subject: x\r\nReceived: from a\r\n\r\nbody\r\n.\r\n",
    b"..stuffed\r\n.\r\n",
    b"a\n.\nb\r\n.\r\n",
    b"a\r.\rb\r\n.\r\n",
    b"\r\n.\r\n",
];

const CONFIGS: &[&str] = &[
    "hostname = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_sessions_per_ip = 3\n",
    "[queue]\nretry_interval = \"1h30m\"\n[routes]\n\"a.test\" = \"[::1]:25\"\n",
    "[domain.\"a.test\"]\ncallout = true\nunknown_recipient = \"hold\"\n[web]\nallow = [\"10.0.0.0/8\"]\n",
];

/// Inputs made from a seed corpus: byte flips, insertions of interesting octets, splices, truncation.
fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\r\n.:<>@\"\\ =\x00\xff";
    let mut data = seed.to_vec();
    for _ in 0..rng.usize(1..8) {
        match rng.u8(0..5) {
            0 if !data.is_empty() => {
                let i = rng.usize(..data.len());
                data[i] = rng.u8(..);
            }
            1 => {
                let i = rng.usize(..=data.len());
                data.insert(i, INTERESTING[rng.usize(..INTERESTING.len())]);
            }
            2 if !data.is_empty() => {
                let i = rng.usize(..data.len());
                data.truncate(i);
            }
            3 => {
                let i = rng.usize(..=data.len());
                let chunk: Vec<u8> = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect();
                data.splice(i..i, chunk);
            }
            _ => {
                let i = rng.usize(..=data.len());
                data.splice(i..i, seed.iter().copied());
            }
        }
    }
    data
}

fn run(name: &str, corpus: &[&[u8]], check: impl Fn(&[u8], &mut fastrand::Rng)) {
    let seed = std::env::var("BARTLEBY_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6a09_e667_u64);
    let mut rng = fastrand::Rng::with_seed(seed);
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < ROUNDS && start.elapsed() < BUDGET {
        let pick = rng.usize(..corpus.len());
        let input = mutate(&mut rng, corpus[pick]);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input, &mut rng.fork())));
        assert!(result.is_ok(), "{name}: panic on input {input:?} (seed {seed}, round {rounds})");
        rounds += 1;
    }
    println!("{name}: {rounds} inputs in {:?}", start.elapsed());
}

#[test]
fn command_parser_never_panics() {
    run("command parser", COMMANDS, |line, _| {
        let _ = command::parse(line);
    });
}

/// Feeds `input` in random pieces; the outcome must not depend on how the octets were split.
fn read_in_pieces(input: &[u8], rng: &mut fastrand::Rng) -> (Option<usize>, Vec<u8>, DataReader) {
    let mut reader = DataReader::new(1 << 20, 1000, 50).with_max_header(4096);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let n = rng.usize(1..=(input.len() - pos));
        if let Some(used) = reader.feed(&input[pos..pos + n], &mut out) {
            return (Some(pos + used), out, reader);
        }
        pos += n;
    }
    (None, out, reader)
}

#[test]
fn data_reader_never_passes_a_bare_newline_and_ignores_splitting() {
    run("data reader", MESSAGES, |input, rng| {
        let (end, out, reader) = read_in_pieces(input, rng);
        let (whole_end, whole_out, whole_reader) = read_in_pieces(input, &mut fastrand::Rng::with_seed(1));
        assert_eq!(end, whole_end);
        assert_eq!(out, whole_out);
        assert_eq!(reader.problem(), whole_reader.problem());
        if let Some(end) = end {
            assert!(input[..end].ends_with(b"\r\n.\r\n") || input[..end] == *b".\r\n", "ended without CRLF.CRLF");
        }
        if reader.problem().is_none() {
            for (i, &b) in out.iter().enumerate() {
                assert!(b != b'\n' || (i > 0 && out[i - 1] == b'\r'), "bare LF passed on");
                assert!(b != b'\r' || out.get(i + 1) == Some(&b'\n'), "bare CR passed on");
            }
        }
    });
}

#[test]
fn config_loader_gives_a_config_or_one_line() {
    let corpus: Vec<&[u8]> = CONFIGS.iter().map(|c| c.as_bytes()).collect();
    run("config loader", &corpus, |bytes, _| {
        let text = String::from_utf8_lossy(bytes);
        if let Err(err) = Config::parse(&text, "fuzz.toml") {
            let line = err.to_string();
            assert!(!line.is_empty() && line.starts_with("fuzz.toml"), "{line}");
        }
    });
}

/// Inputs that once broke something (none so far); each stays a test forever.
const REGRESSIONS: &[&[u8]] = &[b"", b"\r", b".\r", b"\r\n.\r", b"MAIL FROM:<>\x00"];

#[test]
fn regressions() {
    for input in REGRESSIONS {
        let _ = command::parse(input);
        let (_, _, _) = read_in_pieces(input, &mut fastrand::Rng::with_seed(7));
        let _ = Config::parse(&String::from_utf8_lossy(input), "r.toml");
    }
}

/// An envelope whose timestamps lie past the year 9999 (a damaged `.env` file or a `queue import`
/// line decodes so): listing it (`queue list`, the admin page) and building its failure notice
/// panicked in the `time` crate's date conversion. The `envelope_decoder` fuzz target's corpus
/// keeps the input.
#[test]
fn envelope_with_times_past_the_year_9999_is_listed_and_bounced() {
    let json = include_bytes!("../fuzz/corpus/envelope_decoder/regression-times-past-year-9999");
    let envelope: Envelope = serde_json::from_slice(json).unwrap();
    let listed = ListedMessage::from(&envelope);
    assert_eq!(listed.arrived, "9999-12-31T23:59:59Z");
    assert_eq!(listed.next_attempt, "9999-12-31T23:59:59Z");
    let kind = DsnKind::Failure;
    let reported: Vec<ReportedRecipient> = dsn::reported(&envelope, kind, &envelope.recipients)
        .into_iter()
        .map(|r| ReportedRecipient::from_recipient(r, kind))
        .collect();
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let retry_until = from_micros(envelope.arrived) + Duration::from_secs(5 * 86_400);
    let notice = dsn::build("mx.test", &envelope, kind, &reported, b"Subject: s\r\n\r\n", now, Some(retry_until));
    let text = String::from_utf8_lossy(&notice);
    assert!(text.contains("Arrival-Date: Fri, 31 Dec 9999 23:59:59 +0000"), "{text}");
}
