//! The DATA reader: no panic, and never a bare CR or LF in what it passes on to the spool; the
//! same for BDAT chunks of a text message (split where the first octet says), which also pass on
//! exactly what they were given when they are accepted.
#![no_main]
use bartleby::smtp::data::DataReader;
use libfuzzer_sys::fuzz_target;

fn no_bare_newline(out: &[u8]) {
    for (i, &b) in out.iter().enumerate() {
        assert!(b != b'\n' || (i > 0 && out[i - 1] == b'\r'), "bare LF passed on");
        assert!(b != b'\r' || out.get(i + 1) == Some(&b'\n') || i + 1 == out.len(), "bare CR passed on");
    }
}

fuzz_target!(|input: &[u8]| {
    let mut reader = DataReader::new(1 << 20, 1000, 50).with_max_header(64 * 1024);
    let mut out = Vec::new();
    let end = reader.feed(input, &mut out);
    if let Some(used) = end {
        assert!(used <= input.len());
    }
    if reader.problem().is_none() {
        no_bare_newline(&out);
    }
    let Some((&split, chunks)) = input.split_first() else { return };
    let at = usize::from(split).min(chunks.len());
    let mut chunked = DataReader::chunked(1 << 20, 1000, 50, false).with_max_header(64 * 1024);
    let mut out = Vec::new();
    assert_eq!(chunked.feed(&chunks[..at], &mut out), None, "BDAT data never ends by itself");
    assert_eq!(chunked.feed(&chunks[at..], &mut out), None);
    chunked.finish();
    if chunked.problem().is_none() {
        assert_eq!(out, chunks, "an accepted chunked message is passed on as sent");
        no_bare_newline(&out);
        assert!(!out.ends_with(b"\r"), "a trailing CR is bare");
    }
});
