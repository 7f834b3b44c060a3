//! The PROXY protocol header a load balancer in `smtp.proxy_from` sends first (HAProxy's
//! proxy-protocol.txt): whatever arrives, `parse` answers without panicking, a whole header never
//! claims more octets than it was given nor more than the versions' limits, and a header found in
//! a prefix is the same header, of the same length, once more octets follow it.
#![no_main]
use bartleby::smtp::proxy::{Parsed, V1_MAX_LEN, V2_MAX_LEN, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|wire: &[u8]| {
    let Ok(Parsed::Complete { header, length }) = parse(wire) else { return };
    assert!(length <= wire.len(), "a header of {length} octets in {}", wire.len());
    let limit = if wire.starts_with(b"PROXY ") { V1_MAX_LEN } else { V2_MAX_LEN };
    assert!(length <= limit, "a header of {length} octets");
    assert_eq!(parse(&wire[..length]), Ok(Parsed::Complete { header, length }), "the header alone");
    if length > 0 {
        assert_eq!(parse(&wire[..length - 1]), Ok(Parsed::Incomplete), "one octet short");
    }
});
