use super::*;

const BIG: u64 = 1 << 30;

/// Feeds `input` in one go; returns (octets used, output, problem), or None when data did not end.
fn read(input: &[u8]) -> Option<(usize, Vec<u8>, Option<DataProblem>)> {
    let mut reader = DataReader::new(BIG, 1000, 50);
    let mut out = Vec::new();
    let used = reader.feed(input, &mut out)?;
    Some((used, out, reader.problem()))
}

#[test]
fn dot_unstuffing_and_end() {
    let (used, out, problem) = read(b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n").expect("ends");
    assert_eq!(out, b"Subject: x\r\n\r\n.leading dot\r\n");
    assert_eq!(problem, None);
    assert_eq!(used, b"Subject: x\r\n\r\n..leading dot\r\n.\r\n".len());
    // A lone dot line with text after it keeps the text; "..." becomes "..".
    let (_, out, _) = read(b".x\r\n...\r\n.\r\n").expect("ends");
    assert_eq!(out, b"x\r\n..\r\n");
    // An empty message.
    assert_eq!(read(b".\r\n"), Some((3, Vec::new(), None)));
    // A message without a final CRLF cannot exist: "a.\r\n" is a line ending in a dot.
    assert_eq!(read(b"a.\r\n"), None);
}

#[test]
fn only_crlf_dot_crlf_ends_the_data() {
    // Every smuggling shape: none of these may end the data.
    for input in [
        &b"a\n.\nb"[..],
        b"a\n.\r\nb",
        b"a\r.\r\nb",
        b"a\r\n.\nb",
        b"a\r\n.\rb",
        b"a\r\n.\r\rb",
        b"a\r.\rb",
        b"a\n.\rb",
        b"a\r\n .\r\nb",
    ] {
        assert_eq!(read(input), None, "{input:?} ended the data");
    }
}

#[test]
fn bare_cr_or_lf_is_a_problem_once_the_real_end_arrives() {
    for input in [
        &b"a\nb\r\n.\r\n"[..],
        b"a\rb\r\n.\r\n",
        b"\n.\r\n.\r\n",
        b"a\r\n.\n.\r\n.\r\n",
        b"a\n.\nMAIL FROM:<x@y.test>\r\n.\r\n",
        b"a\r\n.\rx\r\n.\r\n",
        b"line\r\r\n.\r\n",
        b".\n\r\n.\r\n",
    ] {
        let (used, _, problem) = read(input).unwrap_or_else(|| panic!("{input:?} never ended"));
        assert_eq!(used, input.len(), "{input:?}");
        assert_eq!(problem, Some(DataProblem::BareNewline), "{input:?}");
    }
}

#[test]
fn split_at_every_byte_boundary() {
    let input = b"Received: a\r\nSubject: t\r\n\r\n..dot\r\nline\r\n.\r\n.x\r\n\r\n.\r\nNOOP\r\n";
    let (used, expected, _) = read(input).expect("ends");
    for split in 0..=input.len() {
        for second in split..=input.len() {
            let mut reader = DataReader::new(BIG, 1000, 50);
            let mut out = Vec::new();
            let mut total = None;
            let mut offset = 0;
            for part in [&input[..split], &input[split..second], &input[second..]] {
                if let Some(n) = reader.feed(part, &mut out) {
                    total = Some(offset + n);
                    break;
                }
                offset += part.len();
            }
            assert_eq!(total, Some(used), "split at {split}/{second}");
            assert_eq!(out, expected, "split at {split}/{second}");
            assert_eq!(reader.received_headers(), 1);
        }
    }
}

#[test]
fn size_limit_stops_output_but_reads_to_the_end() {
    let mut reader = DataReader::new(10, 1000, 50);
    let mut out = Vec::new();
    let input = b"0123456789abcdef\r\nmore\r\n.\r\n";
    assert_eq!(reader.feed(input, &mut out), Some(input.len()));
    assert_eq!(reader.problem(), Some(DataProblem::TooBig));
    assert!(out.len() <= 10, "{} octets produced", out.len());
    // Exactly at the limit is fine.
    let mut reader = DataReader::new(10, 1000, 50);
    assert!(reader.feed(b"01234567\r\n.\r\n", &mut Vec::new()).is_some());
    assert_eq!(reader.problem(), None);
    assert_eq!(reader.size(), 10);
}

#[test]
fn long_lines() {
    let mut reader = DataReader::new(BIG, 1000, 50);
    let mut input = vec![b'x'; 1000];
    input.extend_from_slice(b"\r\n.\r\n");
    assert!(reader.feed(&input, &mut Vec::new()).is_some());
    assert_eq!(reader.problem(), None);
    let mut reader = DataReader::new(BIG, 1000, 50);
    let mut out = Vec::new();
    let mut input = vec![b'x'; 1001];
    input.extend_from_slice(b"\r\n.\r\n");
    assert!(reader.feed(&input, &mut out).is_some());
    assert_eq!(reader.problem(), Some(DataProblem::LineTooLong));
    assert!(out.len() <= 1000);
}

#[test]
fn received_headers_are_counted_in_the_header_section_only() {
    let mut input = Vec::new();
    for _ in 0..3 {
        input.extend_from_slice(b"Received: from x\r\n\tby y\r\n");
    }
    input.extend_from_slice(b"RECEIVED: z\r\nX-Received: no\r\n\r\nReceived: in body\r\n.\r\n");
    let mut reader = DataReader::new(BIG, 1000, 4);
    assert!(reader.feed(&input, &mut Vec::new()).is_some());
    assert_eq!(reader.received_headers(), 4);
    assert_eq!(reader.problem(), None);
    let mut reader = DataReader::new(BIG, 1000, 3);
    assert!(reader.feed(&input, &mut Vec::new()).is_some());
    assert_eq!(reader.problem(), Some(DataProblem::TooManyReceived));
}

#[test]
fn header_section_is_bounded() {
    let mut reader = DataReader::new(BIG, 1000, 50).with_max_header(100);
    let mut out = Vec::new();
    let mut input = Vec::new();
    for i in 0..10 {
        input.extend_from_slice(format!("X-Filler-{i}: 0123456789\r\n").as_bytes());
    }
    input.extend_from_slice(b"\r\nbody\r\n.\r\n");
    assert!(reader.feed(&input, &mut out).is_some());
    assert_eq!(reader.problem(), Some(DataProblem::HeaderTooBig));
    // The same header section fits a larger bound, and the body does not count.
    let mut reader = DataReader::new(BIG, 1000, 50).with_max_header(300);
    input.splice(input.len() - 3..input.len() - 3, b"a long body line that is not a header\r\n".repeat(20));
    assert!(reader.feed(&input, &mut Vec::new()).is_some());
    assert_eq!(reader.problem(), None);
}
