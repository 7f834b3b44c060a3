//! The SMTP command parser must never panic, whatever line a client sends.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let _ = bartleby::smtp::command::parse(line);
});
