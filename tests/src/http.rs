//! A minimal HTTP/1.1 client and a `bitdelta serve` process for the server's tests and
//! benchmarks: loopback only, one request per connection, chunked bodies decoded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent-events body, in order.
    pub fn events(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

/// How long a request may wait for its answer: the wgpu check's requests, the slowest, take
/// about 50 s on lavapipe with cold caches on a Zen 4 host and about 100 s with both cores busy
/// besides; a server that has not answered in 7 minutes is stuck.
pub const READ_TIMEOUT: Duration = Duration::from_secs(420);

/// `method path` on `addr` (`host:port`) with an optional JSON body.
pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = raw[split + 4..].to_vec();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let header = |name: &str| {
        head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()))
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        payload = dechunk(&payload)?;
    }
    Ok(Response { status, content_type: header("content-type").unwrap_or_default(), body: String::from_utf8_lossy(&payload).to_string() })
}

fn dechunk(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| std::io::Error::other("bad chunk"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).map_err(|_| std::io::Error::other(format!("bad chunk size `{size_text}`")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(std::io::Error::other("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A running `bitdelta serve`, stopped when dropped.
pub struct Server {
    child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    stacks_taken: AtomicBool,
}

impl Server {
    /// Starts `bin serve --base BASE --deltas DELTAS --addr 127.0.0.1:0 EXTRA…` and waits for its
    /// `listening on` line. Its stderr (one line per request) is inherited.
    pub fn start(bin: &Path, base: &Path, deltas: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(["serve", "--base"])
            .arg(base)
            .arg("--deltas")
            .arg(deltas)
            .args(["--addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start bitdelta serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line).expect("read the server's first line");
        let addr = match line.trim().strip_prefix("listening on http://") {
            Some(a) => a.to_string(),
            None => {
                let _ = child.kill();
                panic!("the server did not start: first line `{}`, status {:?}", line.trim(), child.wait());
            }
        };
        Server { child, addr, stacks_taken: AtomicBool::new(false) }
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, None).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.stacks()))
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> Response {
        request(&self.addr, "POST", path, Some(&body.to_string())).unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.stacks()))
    }

    /// Every thread's stack in the server, as gdb prints them (or why not), once per server:
    /// what a request that never got its answer was waiting on.
    pub fn stacks(&self) -> String {
        if self.stacks_taken.swap(true, Ordering::SeqCst) {
            return "(the server's threads: printed with another request's failure)".into();
        }
        let pid = self.pid().to_string();
        match Command::new("timeout").args(["120", "gdb", "-p", &pid, "-batch", "-ex", "thread apply all bt 40"]).output() {
            Ok(o) => format!("the server's threads (gdb):\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Err(e) => format!("(no stacks: running gdb: {e})"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
