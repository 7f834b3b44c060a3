//! The DATA reader: no panic, and never a bare CR or LF in what it passes on to the spool.
#![no_main]
use bartleby::smtp::data::DataReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut reader = DataReader::new(1 << 20, 1000, 50).with_max_header(64 * 1024);
    let mut out = Vec::new();
    let end = reader.feed(input, &mut out);
    if let Some(used) = end {
        assert!(used <= input.len());
    }
    if reader.problem().is_none() {
        for (i, &b) in out.iter().enumerate() {
            assert!(b != b'\n' || (i > 0 && out[i - 1] == b'\r'), "bare LF passed on");
            assert!(b != b'\r' || out.get(i + 1) == Some(&b'\n') || i + 1 == out.len(), "bare CR passed on");
        }
    }
});
