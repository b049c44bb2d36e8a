//! A tiny fake Hugging Face hub on 127.0.0.1 for tests: std `TcpListener` + one thread, one
//! request per connection (`Connection: close`), stopped and joined when dropped.
//!
//! It serves the URL layout hf-hub's sync API uses:
//! - `GET /api/models/{org}/{name}/revision/{rev}`: JSON with `sha` and `siblings`;
//! - `GET|HEAD /{org}/{name}/resolve/{rev}/{path}`: the file, with `ETag`, `X-Repo-Commit`,
//!   `Content-Range` and `Range` support (hf-hub asks `Range: bytes=0-0` for metadata, then
//!   `Range: bytes=N-` to download). Weight files (`.safetensors`, `.bin`, `.ckpt`) are served
//!   like LFS files on the real hub: a `302` to `/cdn-lfs/...` carrying `X-Linked-Etag`,
//!   `X-Linked-Size` and `X-Repo-Commit`;
//! - `404` (with `X-Error-Code`) for unknown repos, revisions and files, `401` when a private
//!   repo is asked without `Authorization: Bearer <token>`.
//!
//! Every request is logged so tests can check what was (not) fetched.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A repo served by the fake hub: every file under `root` (relative paths, `/`-separated).
#[derive(Clone, Debug)]
pub struct FakeRepo {
    pub id: String,
    pub sha: String,
    pub root: PathBuf,
    /// `Some(token)`: private, only served with `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Files listed in the repo info but answered with 404 (to test file errors).
    pub broken: Vec<String>,
}

impl FakeRepo {
    pub fn new(id: &str, sha: &str, root: &Path) -> Self {
        FakeRepo { id: id.into(), sha: sha.into(), root: root.into(), token: None, broken: vec![] }
    }

    /// Every file of the repo, as sorted `/`-separated relative paths.
    pub fn files(&self) -> Vec<String> {
        super::files_under(&self.root).into_iter().collect()
    }
}

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    /// The request target, percent-decoded, without the query.
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

struct State {
    repos: BTreeMap<String, FakeRepo>,
    log: Mutex<Vec<Logged>>,
    stop: AtomicBool,
}

/// The running server; stops when dropped.
pub struct FakeHub {
    addr: SocketAddr,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

/// At most this many connections per server: a runaway client cannot keep a test alive.
const MAX_CONNECTIONS: usize = 5000;

impl FakeHub {
    pub fn start(repos: Vec<FakeRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            repos: repos.into_iter().map(|r| (r.id.clone(), r)).collect(),
            log: Mutex::new(vec![]),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                if st.stop.load(Ordering::SeqCst) || n >= MAX_CONNECTIONS {
                    break;
                }
                if let Ok(stream) = stream {
                    let _ = handle(&st, addr, stream);
                }
            }
        });
        FakeHub { addr, state, thread: Some(thread) }
    }

    /// The endpoint to give the client, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop up.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) =
                u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or(""), 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A stable fake etag (FNV-1a 64 of the contents, twice with different seeds).
pub fn etag_of(data: &[u8]) -> String {
    let fnv =
        |seed: u64| data.iter().fold(seed, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    format!("{:016x}{:016x}", fnv(0xcbf29ce484222325), fnv(0x84222325cbf29ce4))
}

fn is_lfs(path: &str) -> bool {
    [".safetensors", ".bin", ".ckpt", ".pt"].iter().any(|ext| path.ends_with(ext))
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn new(status: u16) -> Self {
        Resp { status, headers: vec![], body: vec![] }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
    fn error(status: u16, code: &str, msg: &str) -> Self {
        Resp::new(status)
            .header("Content-Type", "application/json")
            .header("X-Error-Code", code)
            .header("X-Error-Message", msg)
            .body(serde_json::json!({ "error": msg }).to_string())
    }
}

fn handle(st: &State, addr: SocketAddr, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(()); // the wake-up connection, or a client that gave up
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        if headers.len() > 100 {
            break;
        }
    }
    if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<u64>().ok()) {
        std::io::copy(&mut (&mut reader).take(len.min(1 << 20)), &mut std::io::sink())?;
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let raw_path = target.split('?').next().unwrap_or("").to_string();
    st.log.lock().unwrap().push(Logged {
        method: method.clone(),
        path: percent_decode(&raw_path),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    });

    let resp = route(st, addr, &method, &raw_path, &headers);
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", resp.body.len()));
    stream.write_all(out.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(&resp.body)?;
    }
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Other",
    }
}

/// The repo whose id `path` starts with (`org/name/...`), and the rest of the path.
fn split_repo<'a>(st: &'a State, path: &'a str) -> Option<(&'a FakeRepo, &'a str)> {
    st.repos.values().find_map(|r| {
        path.strip_prefix(r.id.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .map(|rest| (r, rest))
    })
}

fn authorized(repo: &FakeRepo, headers: &BTreeMap<String, String>) -> Result<(), Resp> {
    let Some(token) = &repo.token else { return Ok(()) };
    match headers.get("authorization") {
        Some(a) if *a == format!("Bearer {token}") => Ok(()),
        Some(_) => {
            Err(Resp::error(401, "RepoNotFound", "Invalid credentials in Authorization header"))
        }
        None => Err(Resp::error(401, "RepoNotFound", "Repository not found or access restricted")),
    }
}

fn check_rev(repo: &FakeRepo, rev: &str) -> Result<(), Resp> {
    if rev == "main" || rev == repo.sha {
        Ok(())
    } else {
        Err(Resp::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")))
    }
}

fn read_file(repo: &FakeRepo, file: &str) -> Option<Vec<u8>> {
    if file.is_empty() || file.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return None;
    }
    if repo.broken.iter().any(|b| b == file) {
        return None;
    }
    let path = repo.root.join(file);
    if path.is_file() {
        std::fs::read(path).ok()
    } else {
        None
    }
}

/// Serves `data` honouring a `Range: bytes=a-b` / `bytes=a-` / `bytes=-n` header.
fn ranged(data: &[u8], headers: &BTreeMap<String, String>) -> Resp {
    let size = data.len();
    let Some(spec) = headers.get("range").and_then(|r| r.strip_prefix("bytes=")) else {
        return Resp::new(200).header("Accept-Ranges", "bytes").body(data.to_vec());
    };
    let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
    let (start, end) = match (a.trim().parse::<usize>().ok(), b.trim().parse::<usize>().ok()) {
        (Some(s), Some(e)) => (s, e.min(size.saturating_sub(1))),
        (Some(s), None) => (s, size.saturating_sub(1)),
        (None, Some(n)) => (size.saturating_sub(n), size.saturating_sub(1)),
        (None, None) => return Resp::new(416).header("Content-Range", format!("bytes */{size}")),
    };
    if size == 0 || start >= size || start > end {
        return Resp::new(416).header("Content-Range", format!("bytes */{size}"));
    }
    Resp::new(206)
        .header("Accept-Ranges", "bytes")
        .header("Content-Range", format!("bytes {start}-{end}/{size}"))
        .body(data[start..=end].to_vec())
}

fn route(
    st: &State,
    addr: SocketAddr,
    method: &str,
    raw_path: &str,
    headers: &BTreeMap<String, String>,
) -> Resp {
    if method != "GET" && method != "HEAD" {
        return Resp::error(405, "MethodNotAllowed", "only GET and HEAD");
    }
    // Repo info.
    if let Some(rest) = raw_path.strip_prefix("/api/models/") {
        let Some((repo_part, rev)) = rest.rsplit_once("/revision/") else {
            return Resp::error(404, "NotFound", "unknown API route");
        };
        let repo_id = percent_decode(repo_part);
        let Some(repo) = st.repos.get(&repo_id) else {
            return Resp::error(404, "RepoNotFound", "Repository not found");
        };
        if let Err(r) = authorized(repo, headers) {
            return r;
        }
        if let Err(r) = check_rev(repo, &percent_decode(rev)) {
            return r;
        }
        let siblings: Vec<_> =
            repo.files().into_iter().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({
            "id": repo.id,
            "modelId": repo.id,
            "sha": repo.sha,
            "private": repo.token.is_some(),
            "siblings": siblings,
        });
        return Resp::new(200).header("Content-Type", "application/json").body(body.to_string());
    }
    // LFS files, after the redirect (like the CDN: no auth, ranges).
    if let Some(rest) = raw_path.strip_prefix("/cdn-lfs/") {
        let rest = percent_decode(rest);
        let Some((repo, file)) = split_repo(st, &rest) else {
            return Resp::error(404, "NotFound", "no such blob");
        };
        let Some(data) = read_file(repo, file) else {
            return Resp::error(404, "NotFound", "no such blob");
        };
        return ranged(&data, headers).header("ETag", format!("\"{}\"", etag_of(&data)));
    }
    // `/{org}/{name}/resolve/{rev}/{path}`.
    let Some((repo_part, rest)) = raw_path.trim_start_matches('/').split_once("/resolve/") else {
        return Resp::error(404, "NotFound", "unknown route");
    };
    let Some(repo) = st.repos.get(&percent_decode(repo_part)) else {
        return Resp::error(404, "RepoNotFound", "Repository not found");
    };
    if let Err(r) = authorized(repo, headers) {
        return r;
    }
    let Some((rev, file)) = rest.split_once('/') else {
        return Resp::error(404, "EntryNotFound", "no file");
    };
    if let Err(r) = check_rev(repo, &percent_decode(rev)) {
        return r;
    }
    let file = percent_decode(file);
    let Some(data) = read_file(repo, &file) else {
        return Resp::error(404, "EntryNotFound", &format!("{file} does not exist on \"{rev}\""))
            .header("X-Repo-Commit", repo.sha.clone());
    };
    let etag = etag_of(&data);
    if is_lfs(&file) {
        return Resp::new(302)
            .header("Location", format!("http://{addr}/cdn-lfs/{}/{file}", repo.id))
            .header("X-Repo-Commit", repo.sha.clone())
            .header("X-Linked-Etag", format!("\"{etag}\""))
            .header("X-Linked-Size", data.len().to_string())
            .header("ETag", format!("\"pointer-{etag}\""));
    }
    ranged(&data, headers)
        .header("ETag", format!("\"{etag}\""))
        .header("X-Repo-Commit", repo.sha.clone())
}
