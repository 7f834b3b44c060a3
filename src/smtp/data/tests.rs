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

/// Feeds `chunks` to a BDAT reader, then finishes it; returns the output and the problem.
fn read_chunks(binary: bool, chunks: &[&[u8]]) -> (Vec<u8>, Option<DataProblem>) {
    let mut reader = DataReader::chunked(BIG, 1000, 2, binary);
    let mut out = Vec::new();
    for chunk in chunks {
        assert_eq!(reader.feed(chunk, &mut out), None, "BDAT data never ends by itself");
    }
    reader.finish();
    (out, reader.problem())
}

#[test]
fn chunks_are_taken_verbatim() {
    // No dot-unstuffing, and a line of a single dot ends nothing.
    let (out, problem) = read_chunks(false, &[b"Subject: x\r\n\r\n..two\r\n.\r\n", b"after\r\n"]);
    assert_eq!((out.as_slice(), problem), (&b"Subject: x\r\n\r\n..two\r\n.\r\nafter\r\n"[..], None));
    // A CRLF split between chunks is one line ending; a message may end without one.
    assert_eq!(read_chunks(false, &[b"a\r", b"\nb"]), (b"a\r\nb".to_vec(), None));
    assert_eq!(read_chunks(false, &[]), (Vec::new(), None));
}

#[test]
fn chunks_get_the_bare_newline_and_loop_checks() {
    for chunks in [&[&b"a\nb\r\n"[..]][..], &[b"a\rb\r\n"], &[b"a\r\n", b"b\r"], &[b"Subject: x\r\n\r\nbody\n"]] {
        assert_eq!(read_chunks(false, chunks).1, Some(DataProblem::BareNewline), "{chunks:?}");
    }
    let loops = read_chunks(false, &[b"Received: 1\r\nReceived: 2\r\n", b"Received: 3\r\n\r\n"]);
    assert_eq!(loops.1, Some(DataProblem::TooManyReceived));
    let long = [b'x'; 1001];
    assert_eq!(read_chunks(false, &[b"A: b\r\n\r\n", &long]).1, Some(DataProblem::LineTooLong));
}

#[test]
fn a_binary_body_is_octets_but_its_header_is_lines() {
    let body: Vec<u8> = (0..=255u8).chain(std::iter::repeat_n(b'y', 2000)).chain([b'\r']).collect();
    let mut message = b"Content-Transfer-Encoding: binary\r\n\r\n".to_vec();
    message.extend_from_slice(&body);
    let (out, problem) = read_chunks(true, &[&message[..10], &message[10..]]);
    assert_eq!((out, problem), (message, None), "bare CR, LF, NUL and a 2000-octet line pass in a binary body");
    assert_eq!(read_chunks(true, &[b"Subject: a\nb\r\n\r\n"]).1, Some(DataProblem::BareNewline));
    let loops = read_chunks(true, &[b"Received: 1\r\nReceived: 2\r\nReceived: 3\r\n\r\nbody"]);
    assert_eq!(loops.1, Some(DataProblem::TooManyReceived));
}

#[test]
fn chunks_count_against_the_size_limit() {
    let mut reader = DataReader::chunked(10, 1000, 50, true);
    let mut out = Vec::new();
    reader.feed(b"A: b\r\n\r\n\x00\x01", &mut out);
    assert_eq!(reader.problem(), None);
    reader.feed(b"\x02", &mut out);
    assert_eq!((reader.problem(), reader.size()), (Some(DataProblem::TooBig), 11));
    assert_eq!(out.len(), 10, "nothing is produced past a problem");
}

#[test]
fn the_first_message_id_is_kept_with_its_folding() {
    let message = |input: &[u8]| {
        let mut reader = DataReader::new(BIG, 1000, 50);
        let mut out = Vec::new();
        assert!(reader.feed(input, &mut out).is_some());
        reader.message_id()
    };
    assert_eq!(message(b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n.\r\n"), Some("<a@b>".into()));
    assert_eq!(
        message(b"message-id:\r\n <a@b>\r\nMessage-ID: <c@d>\r\n\r\n.\r\n"),
        Some("<a@b>".into()),
        "folded, and only the first"
    );
    assert_eq!(message(b"Subject: x\r\n\r\nMessage-ID: <in@body>\r\n.\r\n"), None, "not in the body");
    let long = format!("Message-ID: <{}@b>\r\n\r\n.\r\n", "x".repeat(5000));
    assert!(message(long.as_bytes()).is_some_and(|id| id.len() <= 256));
}
