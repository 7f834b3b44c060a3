use super::*;

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

fn complete(input: &[u8]) -> (ProxyHeader, usize) {
    match parse(input) {
        Ok(Parsed::Complete { header, length }) => (header, length),
        other => panic!("{input:?}: {other:?}"),
    }
}

/// A v2 header: version 2, `command`, `family`, then `block` (addresses and TLVs).
fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.push(0x20 | command);
    header.push(family);
    header.extend_from_slice(&u16::try_from(block.len()).expect("short block").to_be_bytes());
    header.extend_from_slice(block);
    header
}

fn v2_inet(client: [u8; 4], server: [u8; 4], ports: (u16, u16)) -> Vec<u8> {
    let mut block = [client, server].concat();
    block.extend_from_slice(&ports.0.to_be_bytes());
    block.extend_from_slice(&ports.1.to_be_bytes());
    block
}

#[test]
fn v1_tcp4_and_what_follows_is_left_alone() {
    let input = b"PROXY TCP4 192.0.2.77 198.51.100.3 56324 25\r\nEHLO x\r\n";
    let (header, length) = complete(input);
    assert_eq!(header, ProxyHeader::Proxied { client: addr("192.0.2.77:56324"), server: addr("198.51.100.3:25") });
    assert_eq!(&input[length..], b"EHLO x\r\n");
}

#[test]
fn v1_tcp6() {
    let (header, length) = complete(b"PROXY TCP6 2001:db8::77 2001:db8::3 65535 25\r\n");
    assert_eq!(header, ProxyHeader::Proxied { client: addr("[2001:db8::77]:65535"), server: addr("[2001:db8::3]:25") });
    assert_eq!(length, 46);
}

#[test]
fn v1_unknown_uses_the_real_connection() {
    assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (ProxyHeader::Local, 15));
    let line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
    assert_eq!(complete(line), (ProxyHeader::Local, line.len()));
}

#[test]
fn v1_at_the_length_limit() {
    // The longest legal line (2.1): two full-width IPv6 addresses and five-digit ports: 104 octets.
    let longest =
        "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(complete(longest.as_bytes()).1, longest.len());
    let unknown = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX_LEN - 16));
    assert_eq!(unknown.len(), V1_MAX_LEN);
    assert_eq!(complete(unknown.as_bytes()).1, V1_MAX_LEN);
    let over = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX_LEN - 15));
    assert_eq!(parse(over.as_bytes()), Err(ProxyError::V1TooLong));
    assert_eq!(parse(&[b"PROXY ".as_slice(), &[b'x'; 200]].concat()), Err(ProxyError::V1TooLong));
}

#[test]
fn v1_malformed_lines_are_named() {
    let cases: &[(&[u8], &str)] = &[
        (b"PROXY TCP4 192.0.2.77 198.51.100.3 56324 25\n", "bare LF"),
        (b"PROXY TCP5 192.0.2.77 198.51.100.3 1 25\r\n", "protocol"),
        (b"PROXY TCP4 2001:db8::1 198.51.100.3 1 25\r\n", "IPv4"),
        (b"PROXY TCP6 192.0.2.77 2001:db8::3 1 25\r\n", "IPv6"),
        (b"PROXY TCP4 192.0.2.77 198.51.100.3 65536 25\r\n", "port"),
        (b"PROXY TCP4 192.0.2.77 198.51.100.3 025 25\r\n", "port"),
        (b"PROXY TCP4 192.0.2.77 198.51.100.3 +1 25\r\n", "port"),
        (b"PROXY TCP4 192.0.2.77 198.51.100.3 1\r\n", "destination port"),
        (b"PROXY TCP4 192.0.2.77  198.51.100.3 1 25\r\n", "address"),
        (b"PROXY TCP4 192.0.2.77 198.51.100.3 1 25 x\r\n", "more fields"),
        (b"PROXY TCP4\r\n", "source address"),
        (b"PROXY \xff\r\n", "ASCII"),
        (b"PROXY tcp4 192.0.2.77 198.51.100.3 1 25\r\n", "protocol"),
    ];
    for (input, expected) in cases {
        match parse(input) {
            Err(err @ ProxyError::V1Malformed(_)) => {
                assert!(err.to_string().contains(expected), "{input:?}: {err} should mention {expected:?}")
            }
            other => panic!("{input:?}: {other:?}"),
        }
    }
}

#[test]
fn v2_inet_addresses() {
    let input = v2(1, 0x11, &v2_inet([192, 0, 2, 77], [198, 51, 100, 3], (56324, 25)));
    let (header, length) = complete(&input);
    assert_eq!(header, ProxyHeader::Proxied { client: addr("192.0.2.77:56324"), server: addr("198.51.100.3:25") });
    assert_eq!(length, 28);
}

#[test]
fn v2_inet6_with_tlvs_skipped() {
    let client: Ipv6Addr = "2001:db8::77".parse().expect("ip");
    let server: Ipv6Addr = "2001:db8::3".parse().expect("ip");
    let mut block = [client.octets(), server.octets()].concat();
    block.extend_from_slice(&4000u16.to_be_bytes());
    block.extend_from_slice(&25u16.to_be_bytes());
    // PP2_TYPE_AUTHORITY and PP2_TYPE_NOOP TLVs, which we do not read.
    block.extend_from_slice(&[0x02, 0x00, 0x06]);
    block.extend_from_slice(b"mx.test");
    block.extend_from_slice(&[0x04, 0x00, 0x00]);
    let mut input = v2(1, 0x21, &block);
    let whole = input.len();
    input.extend_from_slice(b"EHLO");
    let (header, length) = complete(&input);
    assert_eq!(header, ProxyHeader::Proxied { client: addr("[2001:db8::77]:4000"), server: addr("[2001:db8::3]:25") });
    assert_eq!(length, whole);
}

#[test]
fn v2_local_and_unspec_use_the_real_connection() {
    // A LOCAL command's family and addresses are ignored, whatever they are.
    assert_eq!(complete(&v2(0, 0x00, &[])), (ProxyHeader::Local, 16));
    assert_eq!(complete(&v2(0, 0x31, &[0; 10])), (ProxyHeader::Local, 26));
    assert_eq!(complete(&v2(1, 0x00, &[])), (ProxyHeader::Local, 16));
}

#[test]
fn v2_errors_are_named() {
    let inet = v2_inet([192, 0, 2, 77], [198, 51, 100, 3], (1, 25));
    let mut bad_version = v2(1, 0x11, &inet);
    bad_version[12] = 0x11;
    assert_eq!(parse(&bad_version), Err(ProxyError::V2Version(1)));
    assert_eq!(parse(&v2(2, 0x11, &inet)), Err(ProxyError::V2Command(2)));
    assert_eq!(parse(&v2(1, 0x12, &inet)), Err(ProxyError::V2Family(0x12)), "UDP");
    assert_eq!(parse(&v2(1, 0x31, &[0; 216])), Err(ProxyError::V2Family(0x31)), "UNIX");
    assert_eq!(parse(&v2(1, 0x11, &inet[..8])), Err(ProxyError::V2ShortAddress(8)));
    assert_eq!(parse(&v2(1, 0x21, &inet)), Err(ProxyError::V2ShortAddress(12)));
    let oversize = v2(1, 0x11, &vec![0; V2_MAX_LEN]);
    assert_eq!(parse(&oversize[..V2_FIXED_LEN]), Err(ProxyError::V2TooLong(V2_MAX_LEN + 16)), "known from the length");
    let mut largest = v2(1, 0x11, &inet);
    largest.extend_from_slice(&vec![0x04; V2_MAX_LEN - largest.len()]);
    largest[14..16].copy_from_slice(&u16::try_from(V2_MAX_LEN - V2_FIXED_LEN).expect("fits").to_be_bytes());
    assert_eq!(complete(&largest).1, V2_MAX_LEN);
}

#[test]
fn truncated_headers_ask_for_more() {
    let v1 = b"PROXY TCP4 192.0.2.77 198.51.100.3 56324 25\r\n".to_vec();
    let v2 = v2(1, 0x11, &v2_inet([192, 0, 2, 77], [198, 51, 100, 3], (56324, 25)));
    for header in [v1, v2] {
        for cut in 0..header.len() {
            assert_eq!(parse(&header[..cut]), Ok(Parsed::Incomplete), "{:?}", &header[..cut]);
        }
        assert!(matches!(parse(&header), Ok(Parsed::Complete { .. })));
    }
}

#[test]
fn garbage_is_not_a_header() {
    for input in [&b"EHLO client.test\r\n"[..], b"QUIT\r\n", b"\r\n\r\nX", b"proxy TCP4", b"\0", b"PROXYTCP4"] {
        assert_eq!(parse(input), Err(ProxyError::NotProxy), "{input:?}");
    }
}

#[test]
fn no_input_never_panics() {
    // Every prefix of every one-octet change to a valid v2 header: an answer, never a panic.
    let header = v2(1, 0x21, &[7; 36]);
    for at in 0..header.len() {
        for value in [0x00, 0x01, 0x02, 0x10, 0x20, 0x21, 0xff] {
            let mut changed = header.clone();
            changed[at] = value;
            for cut in 0..=changed.len() {
                let _ = parse(&changed[..cut]);
            }
        }
    }
}

/// A header split across reads is put together; what follows it is handed on, not lost.
#[tokio::test]
async fn read_header_across_reads() {
    let (mut client, mut server) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for piece in [&b"PROX"[..], b"Y TCP4 192.0.2.77 198.51.1", b"00.3 56324 25\r", b"\nEHLO x\r\n"] {
            client.write_all(piece).await.expect("write");
            client.flush().await.expect("flush");
            tokio::task::yield_now().await;
        }
        client
    });
    let (header, after) = read_header(&mut server).await.expect("header");
    assert_eq!(header, ProxyHeader::Proxied { client: addr("192.0.2.77:56324"), server: addr("198.51.100.3:25") });
    let _client = writer.await.expect("writer");
    let mut rest = after;
    while rest.len() < b"EHLO x\r\n".len() {
        let mut more = [0u8; 16];
        let n = server.read(&mut more).await.expect("read");
        rest.extend_from_slice(&more[..n]);
    }
    assert_eq!(rest, b"EHLO x\r\n");
}

#[tokio::test]
async fn read_header_failures() {
    let mut closed: &[u8] = b"PROXY TCP4 192.0.2.77";
    assert!(matches!(read_header(&mut closed).await, Err(ReadError::Closed)));
    let mut smtp: &[u8] = b"EHLO client.test\r\n";
    let err = read_header(&mut smtp).await.expect_err("not a header");
    assert!(matches!(err, ReadError::Invalid(ProxyError::NotProxy)), "{err}");
    let endless = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 10 * V2_MAX_LEN]].concat();
    let mut reader: &[u8] = &endless;
    assert!(matches!(read_header(&mut reader).await, Err(ReadError::Invalid(ProxyError::V1TooLong))));
}
