//! A small W3C WebDriver client for tests of the page: starts Debian's
//! `chromedriver`, opens one headless Chromium session, and drives it over
//! plain HTTP/1.1 (`std::net::TcpStream` and serde_json, no other crate).
//!
//! ```no_run
//! use nakshatra_e2e::webdriver::Browser;
//! let b = Browser::start().expect("chromedriver");
//! b.goto("http://127.0.0.1:8080/").unwrap();
//! let send = b.find("#send").unwrap();
//! b.click(&send).unwrap();
//! ```
//!
//! Paths: `CHROMEDRIVER` (default `/usr/bin/chromedriver`) and `CHROMIUM`
//! (default `/usr/bin/chromium`).

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key of a W3C element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long one WebDriver command may take (a new session starts Chromium,
/// which is slow on a busy 2-core machine).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A WebDriver failure: the driver could not be started or reached, or it
/// answered a command with an error.
#[derive(Debug, Clone)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// What WebDriver calls return.
pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// The `chromedriver` binary: `CHROMEDRIVER` or `/usr/bin/chromedriver`.
pub fn chromedriver_path() -> PathBuf {
    std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

/// The Chromium binary: `CHROMIUM` or `/usr/bin/chromium`.
pub fn chromium_path() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// An element of the page (a W3C element reference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

impl Element {
    /// The element reference as JSON, to pass as a script argument.
    pub fn to_json(&self) -> Value {
        json!({ ELEMENT_KEY: self.0 })
    }
}

/// A `chromedriver` process with one headless Chromium session. The session
/// is deleted and the driver killed (with everything it started) on drop.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromedriver` on a free loopback port and opens a headless
    /// Chromium session (1280×900, a fresh profile, no network of its own
    /// beyond what the page asks for). `Err` says what is missing or broke.
    pub fn start() -> Result<Browser> {
        let driver_bin = chromedriver_path();
        let chromium = chromium_path();
        if !driver_bin.exists() {
            return err(format!(
                "{} is missing: install chromium and chromium-driver (apt-get install chromium chromium-driver) or set CHROMEDRIVER",
                driver_bin.display()
            ));
        }
        if !chromium.exists() {
            return err(format!(
                "{} is missing: install chromium (apt-get install chromium) or set CHROMIUM",
                chromium.display()
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| Error(format!("tempdir: {e}")))?;
        let port = free_port()?;
        let log = dir.path().join("chromedriver.log");
        let out = File::create(&log).map_err(|e| Error(format!("{}: {e}", log.display())))?;
        let out2 = out
            .try_clone()
            .map_err(|e| Error(format!("{}: {e}", log.display())))?;
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(out2)
            // Its own process group, so that drop can end the browser too.
            .process_group(0)
            .spawn()
            .map_err(|e| Error(format!("cannot start {}: {e}", driver_bin.display())))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            dir,
        };
        b.wait_ready(Duration::from_secs(30))?;
        let profile = b.dir.path().join("profile");
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium.to_string_lossy(),
                        "args": [
                            "--headless",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-quic",
                            "--no-first-run",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--disable-dev-shm-usage",
                            format!("--user-data-dir={}", profile.display()),
                            "--window-size=1280,900",
                        ],
                    },
                    "goog:loggingPrefs": { "browser": "ALL" },
                }
            }
        });
        let v = b.raw("POST", "/session", Some(&caps)).map_err(|e| {
            Error(format!(
                "new session: {e}; chromedriver log:\n{}",
                b.driver_log()
            ))
        })?;
        match v["sessionId"].as_str() {
            Some(id) => b.session = id.to_string(),
            None => return err(format!("new session: no sessionId in {v}")),
        }
        Ok(b)
    }

    fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ready = http(self.addr, "GET", "/status", None, Duration::from_secs(2))
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .is_some_and(|v| v["value"]["ready"].as_bool() == Some(true));
            if ready {
                return Ok(());
            }
            if let Ok(Some(status)) = self.driver.try_wait() {
                return err(format!(
                    "chromedriver exited ({status}) before it was ready:\n{}",
                    self.driver_log()
                ));
            }
            if Instant::now() >= deadline {
                return err(format!(
                    "chromedriver not ready within {within:?}:\n{}",
                    self.driver_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What chromedriver wrote so far (its last 8 KiB).
    pub fn driver_log(&self) -> String {
        let s =
            std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default();
        let mut start = s.len().saturating_sub(8192);
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s[start..].to_string()
    }

    /// One WebDriver command at `path` (absolute); the `value` of the answer.
    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = match (method, body) {
            (_, Some(b)) => Some(b.to_string()),
            ("POST", None) => Some("{}".to_string()),
            _ => None,
        };
        let (status, text) = http(self.addr, method, path, body.as_deref(), COMMAND_TIMEOUT)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Error(format!(
                "{method} {path}: HTTP {status}, not JSON ({e}): {}",
                text.chars().take(300).collect::<String>()
            ))
        })?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if status != 200 || value.get("error").is_some_and(|e| e.is_string()) {
            return err(format!(
                "{method} {path}: HTTP {status}: {}: {}",
                value["error"].as_str().unwrap_or("error"),
                value["message"].as_str().unwrap_or_default()
            ));
        }
        Ok(value)
    }

    /// A command of this session (`path` under `/session/{id}`).
    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Loads `url` and waits for it (the document's load event).
    pub fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(&json!({ "url": url })))
            .map(|_| ())
    }

    /// The document's title.
    pub fn title(&self) -> Result<String> {
        Ok(self
            .cmd("GET", "/title", None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Every element matching the CSS selector `css` (none: empty).
    pub fn find_all(&self, css: &str) -> Result<Vec<Element>> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        let Some(list) = v.as_array() else {
            return err(format!("elements {css}: not a list: {v}"));
        };
        list.iter()
            .map(|e| match e[ELEMENT_KEY].as_str() {
                Some(id) => Ok(Element(id.to_string())),
                None => err(format!("elements {css}: not an element reference: {e}")),
            })
            .collect()
    }

    /// The first element matching `css` (`Err` when none does).
    pub fn find(&self, css: &str) -> Result<Element> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        match v[ELEMENT_KEY].as_str() {
            Some(id) => Ok(Element(id.to_string())),
            None => err(format!("element {css}: not an element reference: {v}")),
        }
    }

    /// Clicks `e` (scrolled into view first, as a user would).
    pub fn click(&self, e: &Element) -> Result<()> {
        self.cmd("POST", &format!("/element/{}/click", e.0), None)
            .map(|_| ())
    }

    /// Empties an input or textarea.
    pub fn clear(&self, e: &Element) -> Result<()> {
        self.cmd("POST", &format!("/element/{}/clear", e.0), None)
            .map(|_| ())
    }

    /// Types `text` into `e` as key presses.
    pub fn send_keys(&self, e: &Element, text: &str) -> Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(&json!({ "text": text })),
        )
        .map(|_| ())
    }

    /// The rendered text of `e` (what a user sees; hidden text is empty).
    pub fn text(&self, e: &Element) -> Result<String> {
        Ok(self
            .cmd("GET", &format!("/element/{}/text", e.0), None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Attribute `name` of `e` (`None`: not set).
    pub fn attribute(&self, e: &Element, name: &str) -> Result<Option<String>> {
        let v = self.cmd("GET", &format!("/element/{}/attribute/{name}", e.0), None)?;
        Ok(v.as_str().map(String::from))
    }

    /// Runs `script` (a function body: `arguments[i]` are `args`, `return`
    /// gives the result) in the page and returns what it returned.
    pub fn execute(&self, script: &str, args: &[Value]) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// A screenshot of the window, PNG bytes.
    pub fn screenshot_png(&self) -> Result<Vec<u8>> {
        let v = self.cmd("GET", "/screenshot", None)?;
        let Some(b64) = v.as_str() else {
            return err("screenshot: not a string");
        };
        base64_decode(b64).ok_or_else(|| Error("screenshot: bad base64".into()))
    }

    /// Writes a screenshot of the window to `path` (a PNG file), creating
    /// its directory.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let png = self.screenshot_png()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error(format!("{}: {e}", dir.display())))?;
        }
        std::fs::write(path, png).map_err(|e| Error(format!("{}: {e}", path.display())))
    }

    /// The browser console's messages since the last call (best effort:
    /// empty when the driver cannot say).
    pub fn console_log(&self) -> Vec<String> {
        let Ok(v) = self.cmd("POST", "/se/log", Some(&json!({ "type": "browser" }))) else {
            return Vec::new();
        };
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        format!(
                            "{} {}",
                            e["level"].as_str().unwrap_or("?"),
                            e["message"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = http(self.addr, "DELETE", &path, None, Duration::from_secs(10));
        }
        // The driver leads its own process group: end it and whatever of the
        // browser is left.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error(format!("bind: {e}")))?;
    let port = l
        .local_addr()
        .map_err(|e| Error(format!("local_addr: {e}")))?
        .port();
    Ok(port)
}

/// One HTTP/1.1 request (`Connection: close`): the status code and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let what = |e: std::io::Error| Error(format!("{method} {path} to {addr}: {e}"));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(what)?;
    s.set_read_timeout(Some(timeout)).map_err(what)?;
    s.set_write_timeout(Some(timeout)).map_err(what)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str("Content-Type: application/json; charset=utf-8\r\n");
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).map_err(what)?;
    // Read the header, then exactly the body it announces: the driver may
    // keep the connection open whatever the request asked.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).map_err(what)?;
        if n == 0 {
            return err(format!(
                "{method} {path}: the connection closed before a full HTTP header"
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut payload = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    let Some(status) = status else {
        return err(format!("{method} {path}: bad status line in {head:?}"));
    };
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        if k == "content-length" {
            length = v.parse::<usize>().ok();
        } else if k == "transfer-encoding" && v.contains("chunked") {
            chunked = true;
        }
    }
    loop {
        let complete = if chunked {
            dechunk(&payload).is_some()
        } else if let Some(n) = length {
            payload.len() >= n
        } else {
            false
        };
        if complete {
            break;
        }
        let n = s.read(&mut buf).map_err(what)?;
        if n == 0 {
            if chunked || length.is_some() {
                return err(format!("{method} {path}: the connection closed mid-body"));
            }
            break;
        }
        payload.extend_from_slice(&buf[..n]);
    }
    if chunked {
        payload =
            dechunk(&payload).ok_or_else(|| Error(format!("{method} {path}: bad chunked body")))?;
    } else if let Some(n) = length {
        payload.truncate(n);
    }
    Ok((status, String::from_utf8_lossy(&payload).into_owned()))
}

/// The body of a `Transfer-Encoding: chunked` message (`None`: cut short
/// or malformed).
pub fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&b[..eol]).ok()?;
        let size_hex = size_field.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// Standard base64 (with or without padding; whitespace ignored; `None`:
/// a byte outside the alphabet).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b'\r' | b'\n' | b' ' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
