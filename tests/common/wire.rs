//! HTTP/1.1 framing primitives shared by the mock provider (`mock.rs`) and the
//! test client (`client.rs`): line and header-block reading, chunk decoding and
//! encoding, and a few header helpers. Header names are always lowercased here.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Header list with lowercased names, values trimmed of surrounding whitespace.
pub type Headers = Vec<(String, String)>;

/// Longest accepted start line, header line or chunk-size line.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest accepted header block (all header lines together).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Most header fields accepted in one block.
pub const MAX_HEADERS: usize = 512;
/// The chunk that ends a chunked body when no trailers follow.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A start line (request line or status line) and the header block after it.
#[derive(Debug, Clone)]
pub struct Head {
    pub start_line: String,
    pub headers: Headers,
}

pub fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub fn eof(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, msg.into())
}

/// Reads one line terminated by LF; a CR right before the LF is removed.
/// `Ok(None)` means the peer closed the connection before sending any byte of it.
pub async fn read_line<R>(r: &mut R, max: usize) -> io::Result<Option<Vec<u8>>>
where
    R: AsyncBufRead + Unpin,
{
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(eof(format!(
                "connection closed in the middle of a line ({} bytes read: {:?})",
                line.len(),
                String::from_utf8_lossy(&line[..line.len().min(80)])
            )));
        }
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..pos]);
            r.consume(pos + 1);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > max {
                return Err(invalid(format!("line longer than {max} bytes")));
            }
            return Ok(Some(line));
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        r.consume(n);
        if line.len() > max {
            return Err(invalid(format!("line longer than {max} bytes")));
        }
    }
}

/// Reads a start line plus header block. `Ok(None)` means a clean EOF before the
/// first byte (the normal end of a keep-alive connection). Empty lines before the
/// start line are skipped when `skip_leading_empty` is set (RFC 9112 §2.2 lets a
/// server do that).
pub async fn read_head<R>(r: &mut R, skip_leading_empty: bool) -> io::Result<Option<Head>>
where
    R: AsyncBufRead + Unpin,
{
    let first = loop {
        match read_line(r, MAX_LINE).await? {
            None => return Ok(None),
            Some(line) if line.is_empty() && skip_leading_empty => continue,
            Some(line) => break line,
        }
    };
    let start_line = String::from_utf8(first).map_err(|_| invalid("start line is not UTF-8"))?;
    let headers = read_header_block(r).await?;
    Ok(Some(Head {
        start_line,
        headers,
    }))
}

/// Reads header lines up to and including the empty line that ends the block
/// (used for the head and for chunked trailers).
pub async fn read_header_block<R>(r: &mut R) -> io::Result<Headers>
where
    R: AsyncBufRead + Unpin,
{
    let mut headers = Headers::new();
    let mut total = 0usize;
    loop {
        let line = read_line(r, MAX_LINE)
            .await?
            .ok_or_else(|| eof("connection closed inside a header block"))?;
        if line.is_empty() {
            return Ok(headers);
        }
        total += line.len();
        if total > MAX_HEADER_BLOCK {
            return Err(invalid(format!(
                "header block larger than {MAX_HEADER_BLOCK} bytes"
            )));
        }
        if headers.len() >= MAX_HEADERS {
            return Err(invalid(format!("more than {MAX_HEADERS} header fields")));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(invalid("obsolete header line folding"));
        }
        let text = String::from_utf8_lossy(&line);
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| invalid(format!("header line without a colon: {text:?}")))?;
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return Err(invalid(format!("bad header name in line {text:?}")));
        }
        headers.push((
            name.to_ascii_lowercase(),
            value.trim_matches(|c| c == ' ' || c == '\t').to_string(),
        ));
    }
}

/// First value of header `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Every value of header `name` (case-insensitive), in order.
pub fn header_all<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Whether any comma-separated element of any `name` field equals `token`
/// (case-insensitive), e.g. `has_token(h, "connection", "close")`.
pub fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    header_all(headers, name)
        .iter()
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the final transfer coding is `chunked`.
pub fn is_chunked(headers: &[(String, String)]) -> bool {
    header_all(headers, "transfer-encoding")
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|t| !t.is_empty())
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
}

/// The Content-Length, if present. Several fields or a list must all agree.
pub fn content_length(headers: &[(String, String)]) -> io::Result<Option<u64>> {
    let mut found: Option<u64> = None;
    for value in header_all(headers, "content-length") {
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(format!("bad Content-Length {value:?}")));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| invalid(format!("Content-Length out of range: {value:?}")))?;
            match found {
                Some(prev) if prev != n => {
                    return Err(invalid(format!(
                        "conflicting Content-Length values {prev} and {n}"
                    )))
                }
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// Reads one chunk of a chunked body: `Ok(Some(data))` for a data chunk,
/// `Ok(None)` for the last chunk (size 0). After `None` the caller must read the
/// trailer section with [`read_header_block`]. Chunk extensions are ignored.
pub async fn read_chunk<R>(r: &mut R, max_chunk: usize) -> io::Result<Option<Vec<u8>>>
where
    R: AsyncBufRead + Unpin,
{
    let line = read_line(r, MAX_LINE)
        .await?
        .ok_or_else(|| eof("connection closed where a chunk-size line was expected"))?;
    let text = String::from_utf8_lossy(&line);
    let size_text = text.split(';').next().unwrap_or("").trim();
    if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!("bad chunk-size line {text:?}")));
    }
    let size = usize::from_str_radix(size_text, 16)
        .map_err(|_| invalid(format!("chunk size out of range: {text:?}")))?;
    if size == 0 {
        return Ok(None);
    }
    if size > max_chunk {
        return Err(invalid(format!(
            "chunk of {size} bytes exceeds the limit of {max_chunk}"
        )));
    }
    let mut data = vec![0u8; size];
    r.read_exact(&mut data).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            eof(format!("connection closed inside a {size}-byte chunk"))
        } else {
            e
        }
    })?;
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            eof("connection closed right after chunk data (no CRLF)")
        } else {
            e
        }
    })?;
    if crlf != *b"\r\n" {
        return Err(invalid(format!(
            "chunk data not followed by CRLF (got {crlf:?})"
        )));
    }
    Ok(Some(data))
}

/// Frames `data` as one chunk (`<hex size>\r\n<data>\r\n`). Empty input gives an
/// empty vector, since a zero-size chunk would end the body.
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Standard reason phrase, or "" for codes without one (e.g. 529).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Splits an SSE body into events: each piece ends right after the empty line
/// that terminates an event (CRLF, LF or CR line endings, as in the WHATWG
/// parser). Blank lines with nothing before them stay attached to the next
/// event; bytes after the last blank line form a final piece.
pub fn split_sse_events(body: &[u8]) -> Vec<Vec<u8>> {
    let mut events = Vec::new();
    let mut start = 0usize;
    let mut line_start = 0usize;
    let mut has_content = false;
    let mut i = 0usize;
    while i < body.len() {
        let term = match body[i] {
            b'\r' if body.get(i + 1) == Some(&b'\n') => 2,
            b'\r' | b'\n' => 1,
            _ => {
                has_content = true;
                i += 1;
                continue;
            }
        };
        let empty_line = i == line_start;
        i += term;
        line_start = i;
        if empty_line && has_content {
            events.push(body[start..i].to_vec());
            start = i;
            has_content = false;
        }
    }
    if start < body.len() {
        events.push(body[start..].to_vec());
    }
    events
}
