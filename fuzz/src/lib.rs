//! What the fuzz targets share: reading a request (headers and body) out
//! of the fuzzer's bytes, in a form the seeds can be written in by hand.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Splits `data` into headers and a body: header lines `name: value` up to
/// the first empty line, the rest is the body. Lines that are not valid
/// headers are skipped (the HTTP server would have refused them before any
/// parser of ours saw them).
pub fn request(data: &[u8]) -> (HeaderMap, &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii_start();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    (headers, body)
}
