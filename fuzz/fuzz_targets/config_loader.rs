//! The configuration loader: any text gives a config or a one-line error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(err) = bartleby::config::Config::parse(text, "fuzz.toml") {
        assert!(!err.to_string().is_empty());
    }
});
