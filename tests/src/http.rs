//! A tiny HTTP/1.1 client on [`std::net::TcpStream`] (no extra crates) for
//! the API tests and benchmarks: one-shot requests, and streamed bodies
//! read as they arrive — server-sent events (`data:` payloads) or NDJSON
//! lines — so that a test can read a few events and then drop the socket
//! mid-stream. It decodes `Transfer-Encoding: chunked` (what axum streams
//! with) and `Content-Length` bodies, and reads to the end otherwise.
//!
//! Also [`ApiProc`]: a `nakshatra` process that serves the HTTP API, with
//! its base URL read from the `api on http://IP:PORT` line it prints.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::Proc;

/// How long a read may block before the request fails (a hung server
/// fails the test instead of hanging it).
pub const READ_TIMEOUT: Duration = Duration::from_secs(180);

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; `Value::Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Splits `http://host:port/path?q` into (`host:port`, `/path?q`).
/// A URL without a scheme is taken as `host:port/path`.
pub fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

/// The body of a response being read: de-chunks `chunked` bodies, stops
/// at `Content-Length`, or reads until the server closes.
struct Body {
    inner: BufReader<TcpStream>,
    mode: Mode,
}

enum Mode {
    /// Bytes left in the current chunk (0: read the next chunk header).
    Chunked { left: usize, done: bool },
    /// Bytes left of a `Content-Length` body.
    Length(usize),
    /// Until EOF.
    Close,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match &mut self.mode {
            Mode::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let n = buf.len().min(*left);
                let got = self.inner.read(&mut buf[..n])?;
                if got == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body shorter than Content-Length",
                    ));
                }
                *left -= got;
                Ok(got)
            }
            Mode::Close => self.inner.read(buf),
            Mode::Chunked { left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut line = String::new();
                    if self.inner.read_line(&mut line)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before the last chunk",
                        ));
                    }
                    let size = line.trim().split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size, 16).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("bad chunk size line {line:?}"),
                        )
                    })?;
                    if size == 0 {
                        // Trailers, then the blank line.
                        loop {
                            let mut t = String::new();
                            if self.inner.read_line(&mut t)? == 0 || t.trim().is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                    *left = size;
                }
                let n = buf.len().min(*left);
                let got = self.inner.read(&mut buf[..n])?;
                if got == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed mid-chunk",
                    ));
                }
                *left -= got;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    self.inner.read_exact(&mut crlf)?;
                }
                Ok(got)
            }
        }
    }
}

/// A response whose body is read as it arrives. Dropping it closes the
/// connection (a client that goes away mid-stream).
pub struct Stream {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    body: BufReader<Body>,
    sent: Instant,
}

impl Stream {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// When the request was sent (for time-to-first-token).
    pub fn sent_at(&self) -> Instant {
        self.sent
    }

    /// The next body line without its line end; `None` at the end of the
    /// body.
    pub fn next_line(&mut self) -> io::Result<Option<String>> {
        let mut buf = Vec::new();
        if self.body.read_until(b'\n', &mut buf)? == 0 {
            return Ok(None);
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
    }

    /// The payload of the next server-sent event's `data:` field(s)
    /// (several `data:` lines of one event joined with `\n`); comments
    /// (keep-alives) and other fields are skipped. `None` at the end of the
    /// body.
    pub fn next_event(&mut self) -> io::Result<Option<String>> {
        let mut data: Option<String> = None;
        loop {
            let Some(line) = self.next_line()? else {
                return Ok(data);
            };
            if line.is_empty() {
                if data.is_some() {
                    return Ok(data);
                }
                continue;
            }
            if let Some(v) = line.strip_prefix("data:") {
                let v = v.strip_prefix(' ').unwrap_or(v);
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(v);
                    }
                    None => data = Some(v.to_string()),
                }
            }
        }
    }

    /// The next non-empty NDJSON line, parsed. `None` at the end of the
    /// body; `Err` for a line that is not JSON.
    pub fn next_json_line(&mut self) -> io::Result<Option<serde_json::Value>> {
        loop {
            let Some(line) = self.next_line()? else {
                return Ok(None);
            };
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {line:?}")));
        }
    }

    /// The rest of the body.
    pub fn read_rest(&mut self) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        self.body.read_to_end(&mut v)?;
        Ok(v)
    }

    /// Closes the connection now (both directions), as a client that
    /// goes away does.
    pub fn disconnect(self) {
        let _ = self
            .body
            .get_ref()
            .inner
            .get_ref()
            .shutdown(std::net::Shutdown::Both);
    }
}

/// Sends `METHOD url` with `headers` and `body` (`Content-Length` set
/// when the body is not empty or the method is POST/PUT) and returns the
/// response once its headers are read; the body is read as it arrives.
/// The connection is `Connection: close`.
pub fn stream(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Stream> {
    let (host, path) = split_url(url);
    let sock = TcpStream::connect(&host)?;
    sock.set_read_timeout(Some(READ_TIMEOUT))?;
    sock.set_nodelay(true)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut w = sock.try_clone()?;
    let sent = Instant::now();
    w.write_all(req.as_bytes())?;
    w.write_all(body)?;
    w.flush()?;
    let mut r = BufReader::new(sock);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let chunked = find_header(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mode = if method == "HEAD" || status == 204 || status == 304 {
        Mode::Length(0)
    } else if chunked {
        Mode::Chunked {
            left: 0,
            done: false,
        }
    } else if let Some(n) = find_header(&headers, "content-length").and_then(|v| v.parse().ok()) {
        Mode::Length(n)
    } else {
        Mode::Close
    };
    Ok(Stream {
        status,
        headers,
        body: BufReader::new(Body { inner: r, mode }),
        sent,
    })
}

/// Sends a request and reads the whole response.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut s = stream(method, url, headers, body)?;
    let body = s.read_rest()?;
    Ok(Response {
        status: s.status,
        headers: std::mem::take(&mut s.headers),
        body,
    })
}

/// `GET url`; panics (with the URL) when the request cannot be made.
pub fn get(url: &str) -> Response {
    request("GET", url, &[], &[]).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// `POST url` with a JSON body; panics (with the URL) when the request
/// cannot be made.
pub fn post_json(url: &str, body: &serde_json::Value) -> Response {
    request(
        "POST",
        url,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// `POST url` with a JSON body, the response read as it arrives; panics
/// (with the URL) when the request cannot be made.
pub fn post_json_stream(url: &str, body: &serde_json::Value) -> Stream {
    stream(
        "POST",
        url,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// The text of an OpenAI streamed chat (or completion) read to
/// `data: [DONE]`: the `delta.content` (or `text`) pieces joined, and the
/// parsed events (`[DONE]` left out). `Err` for an event that is not JSON,
/// an `{"error":..}` event, or a stream that ends without `[DONE]`.
pub fn read_openai_stream(s: &mut Stream) -> Result<(String, Vec<serde_json::Value>), String> {
    let mut text = String::new();
    let mut events = Vec::new();
    loop {
        match s.next_event() {
            Ok(Some(d)) if d == "[DONE]" => return Ok((text, events)),
            Ok(Some(d)) => {
                let v: serde_json::Value =
                    serde_json::from_str(&d).map_err(|e| format!("{e}: event {d:?}"))?;
                if v.get("error").is_some() {
                    return Err(format!("error event after {text:?}: {d}"));
                }
                if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(c);
                } else if let Some(c) = v["choices"][0]["text"].as_str() {
                    text.push_str(c);
                }
                events.push(v);
            }
            Ok(None) => return Err(format!("stream ended without [DONE] after {text:?}")),
            Err(e) => return Err(format!("read error after {text:?}: {e}")),
        }
    }
}

/// Metric `name`'s value in Prometheus text: the sum over every series
/// of that name (any labels); `None` when no series has it.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    metric_where(text, name, |_| true)
}

/// Metric `name`'s value summed over the series whose labels include
/// `label` (e.g. `outcome="cancelled"`); `None` when no series matches.
pub fn metric_labeled(text: &str, name: &str, label: &str) -> Option<f64> {
    metric_where(text, name, |labels| {
        labels.split(',').any(|l| l.trim() == label)
    })
}

/// Metric `name` summed over the series whose label list (the text
/// between the braces, empty when none) `keep` accepts.
fn metric_where(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some(lv) => lv,
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        if !keep(labels) {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// A `nakshatra` process that serves the HTTP API (`nakshatra api ...`
/// or `nakshatra node join ... --api ADDR`): a [`Proc`] (killed when
/// dropped) and its base URL.
pub struct ApiProc {
    proc: Proc,
    /// Its base URL, `http://IP:PORT`, from its `api on` line.
    pub base: String,
}

impl ApiProc {
    /// Starts `nakshatra --data-dir DIR ARGS` and waits (up to `within`)
    /// for its `api on http://...` line; when `want_listen` also for a
    /// `listening on` line (a serving node's address).
    pub fn spawn(data_dir: &Path, args: &[&str], want_listen: bool, within: Duration) -> ApiProc {
        let mut p = ApiProc {
            proc: Proc::spawn(&[], data_dir, args),
            base: String::new(),
        };
        let deadline = Instant::now() + within;
        while p.base.is_empty() || (want_listen && p.proc.addrs.is_empty()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match p.proc.lines.recv_timeout(left) {
                Ok(line) => p.take_line(&line),
                Err(_) => panic!(
                    "no `api on` line{} within {within:?} from `nakshatra {}`; stderr:\n{}",
                    if want_listen {
                        " and `listening on`"
                    } else {
                        ""
                    },
                    args.join(" "),
                    p.stderr()
                ),
            }
        }
        while let Ok(line) = p.proc.lines.recv_timeout(Duration::from_millis(50)) {
            p.take_line(&line);
        }
        p
    }

    fn take_line(&mut self, line: &str) {
        if let Some(a) = line.strip_prefix("listening on ") {
            self.proc.addrs.push(a.trim().to_string());
        } else if let Some(u) = line.strip_prefix("api on ") {
            self.base = u.trim().trim_end_matches('/').to_string();
        }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl std::ops::Deref for ApiProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for ApiProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
