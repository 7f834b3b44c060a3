//! RFC 3461 section 4 xtext, the encoding of the DSN parameters ENVID and ORCPT: read by the SMTP
//! server (`smtp`) and written again by the SMTP client (`deliver`), so it belongs to neither.

/// Decodes RFC 3461 4 xtext: printable ASCII except `+` and `=`, and `+XX` hex escapes.
/// Lower-case hex digits are accepted too (be liberal in what you accept).
pub fn xtext_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                let hex = text.get(i + 1..i + 3)?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'!'..=b'~' if bytes[i] != b'=' => {
                out.push(bytes[i]);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes text as xtext (RFC 3461 4), for passing ENVID or ORCPT on.
pub fn xtext_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}
