//! The substitution engine for one guest→upstream HTTP/1.x connection (after TLS is
//! terminated): bytes in from the guest, bytes out to the upstream, or a [`Refusal`].
//!
//! Per request (pipelining is followed request by request):
//! - the head (≤ [`MAX_HEAD`]) is parsed with `httparse`; `Host` must be present once and
//!   agree with an absolute-form target; `CONNECT`, HTTP/2 and `Content-Length` together
//!   with `Transfer-Encoding` (request smuggling) are refused;
//! - a secret is *allowed* for the request when the `Host`, the SNI (for TLS; equal to
//!   `Host`) and the DNS name the destination address was pinned for all match one of its
//!   host patterns (and the connection is TLS unless `require_tls: false`);
//! - allowed secrets are substituted in the parts they enable (headers, the base64 inside
//!   `Basic` credentials, the query, the body); elsewhere their placeholder passes
//!   unchanged (it is not the value, and refusing it broke agents upstream: #1354);
//! - every other secret's placeholder, in any part and any spelling the scanner knows
//!   (see [`super::scan`]), inside `Basic` credentials and inside gzip/deflate bodies, is
//!   a violation — unless its action lets it through toward that host.
//! - bodies: fixed-length bodies that get a substitution are buffered (≤ [`MAX_SUBST_BODY`])
//!   and sent with a rewritten `Content-Length`; chunked bodies are substituted as they
//!   stream and re-encoded; other bodies stream through untouched, scanned.
//! - an `Upgrade` request turns the rest of the connection into opaque bytes, scanned for
//!   violations only.
//!
//! Invariants: memory per connection is bounded (head, chunk lines, trailers, scanner
//! tails, one buffered body); after a refusal nothing more is produced; no error or
//! `Debug` output contains a secret value.

use std::fmt;
use std::io::Write;
use std::sync::Arc;

use base64::Engine as _;

use super::config::{normalize_host, SecretSet, ViolationAction};
use super::scan::{self, Scanner, StreamReplacer};

/// Largest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 256;
/// Largest fixed-length body that is buffered for substitution.
pub const MAX_SUBST_BODY: u64 = 16 * 1024 * 1024;
/// Longest chunk-size line.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest decompressed body scanned for placeholders.
const MAX_INFLATED: u64 = 64 * 1024 * 1024;

/// Which part of a request carried a placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Sni,
    Path,
    Query,
    Header,
    BasicAuth,
    Body,
    Trailer,
    /// Bytes after an `Upgrade` (e.g. WebSocket frames).
    Upgraded,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Sni => "sni",
            Part::Path => "path",
            Part::Query => "query",
            Part::Header => "header",
            Part::BasicAuth => "basic_auth",
            Part::Body => "body",
            Part::Trailer => "trailer",
            Part::Upgraded => "upgraded_stream",
        }
    }
}

/// A placeholder headed somewhere its secret may not go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The secret's env var name (never its value).
    pub env: String,
    /// Where the request was headed (guest-supplied name, sanitised and bounded).
    pub destination: String,
    pub part: Part,
    pub action: ViolationAction,
}

/// Why a connection is cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("secret {} placeholder headed to {} in the {}", .0.env, .0.destination, .0.part.name())]
    Violation(Violation),
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    #[error("unsupported on an intercepted connection: {0}")]
    Unsupported(&'static str),
    #[error("too large: {0}")]
    TooLarge(&'static str),
}

/// What is known about the connection before its first byte.
#[derive(Debug, Clone, Default)]
pub struct ConnIdentity {
    /// TLS was terminated (the bytes fed are the decrypted stream).
    pub tls: bool,
    /// The ClientHello's server name.
    pub sni: Option<String>,
    /// The name the destination address was pinned for by this sandbox's DNS answers.
    pub pinned_name: Option<String>,
}

/// Printable, bounded rendering of a guest-supplied name for logs.
fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .take(255)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if s.is_empty() {
        s.push_str("(no host)");
    }
    s
}

/// A writer that scans what a decoder inflates.
struct InflateScan {
    scanner: Scanner,
    hit: Option<usize>,
    total: u64,
}

impl Write for InflateScan {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.total += buf.len() as u64;
        if self.total > MAX_INFLATED {
            return Err(std::io::Error::other("inflated body over the scan bound"));
        }
        if self.hit.is_none() {
            self.hit = self.scanner.feed(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Inflater {
    Gzip(flate2::write::MultiGzDecoder<InflateScan>),
    Zlib(flate2::write::ZlibDecoder<InflateScan>),
}

/// Scanning and substitution state of one body.
struct BodyCtx {
    destination: String,
    /// Secret indices that are violations in this request.
    violators: Vec<usize>,
    scanner: Scanner,
    inflater: Option<Inflater>,
    /// Secret indices substituted in this body.
    subs: Vec<usize>,
    replacer: StreamReplacer,
}

enum ChunkPhase {
    Size(Vec<u8>),
    Data(u64),
    DataEnd(Vec<u8>),
    Trailers(Vec<u8>),
}

enum State {
    Head,
    Fixed { remaining: u64, ctx: BodyCtx, hold: Option<(Vec<u8>, Vec<u8>)> },
    Chunked { ctx: BodyCtx, phase: ChunkPhase },
    Opaque { ctx: BodyCtx },
    Failed,
}

/// The engine for one connection.
pub struct Substituter {
    set: Arc<SecretSet>,
    id: ConnIdentity,
    state: State,
    buf: Vec<u8>,
    /// After an `Upgrade` request: the opaque state begins once its body is done.
    upgrade_next: bool,
    /// Bytes of the set's shared body budget this connection holds (a buffered body).
    reserved: u64,
}

impl Drop for Substituter {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for Substituter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Substituter").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Substituter {
    /// Starts a connection; refuses at once when the SNI itself carries a placeholder.
    pub fn new(set: Arc<SecretSet>, id: ConnIdentity) -> Result<Substituter, Refusal> {
        if let Some(sni) = &id.sni {
            let pats: Vec<&[u8]> = set.secrets.iter().map(|s| s.placeholder.as_bytes()).collect();
            if let Some(i) = scan::find_any(sni.as_bytes(), &pats) {
                let s = &set.secrets[i];
                let action = set.action_for(s).clone();
                if !action.passes(sni) {
                    return Err(Refusal::Violation(Violation {
                        env: s.env.clone(),
                        destination: sanitize(sni),
                        part: Part::Sni,
                        action,
                    }));
                }
            }
        }
        Ok(Substituter { set, id, state: State::Head, buf: Vec::new(), upgrade_next: false, reserved: 0 })
    }

    /// Feeds the next bytes from the guest; appends the bytes for the upstream to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        if let State::Failed = self.state {
            return Err(Refusal::Malformed("connection already refused"));
        }
        let r = self.run(data, out);
        if r.is_err() {
            self.state = State::Failed;
            self.buf.clear();
            self.release();
        }
        r
    }

    /// Takes `n` bytes of the shared body budget; false when it would go over.
    fn reserve(&mut self, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        let budget = &self.set.buffered;
        let mut cur = budget.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(n) > super::config::MAX_BUFFERED_BODIES {
                return false;
            }
            match budget.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.reserved += n;
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Gives back what [`Substituter::reserve`] took.
    fn release(&mut self) {
        if self.reserved > 0 {
            self.set.buffered.fetch_sub(self.reserved, std::sync::atomic::Ordering::AcqRel);
            self.reserved = 0;
        }
    }

    /// The guest closed its sending side: anything incomplete is an error.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Refusal> {
        match &self.state {
            State::Head if self.buf.is_empty() => Ok(()),
            State::Opaque { .. } => Ok(()),
            State::Failed => Err(Refusal::Malformed("connection already refused")),
            _ => {
                let _ = out;
                self.state = State::Failed;
                Err(Refusal::Malformed("connection closed in the middle of a request"))
            }
        }
    }

    fn run(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        loop {
            match &mut self.state {
                State::Failed => return Err(Refusal::Malformed("connection already refused")),
                State::Head => {
                    if data.is_empty() {
                        return Ok(());
                    }
                    // Look for the end of the head across the old and new bytes; copy
                    // at most what a head may hold.
                    let old = self.buf.len();
                    let start = old.saturating_sub(3);
                    let take = data.len().min(MAX_HEAD + 1 - old.min(MAX_HEAD));
                    self.buf.extend_from_slice(&data[..take]);
                    let Some(end) = find(&self.buf[start..], b"\r\n\r\n").map(|i| start + i + 4) else {
                        if self.buf.len() > MAX_HEAD {
                            return Err(Refusal::TooLarge("request head over 64 KiB"));
                        }
                        return Ok(());
                    };
                    if end > MAX_HEAD {
                        return Err(Refusal::TooLarge("request head over 64 KiB"));
                    }
                    data = &data[end - old..];
                    self.buf.truncate(end);
                    let head = std::mem::take(&mut self.buf);
                    self.on_head(&head, out)?;
                }
                State::Fixed { remaining, ctx, hold } => {
                    let n = (*remaining).min(data.len() as u64) as usize;
                    let (piece, rest) = data.split_at(n);
                    scan_body(&self.set, ctx, piece, Part::Body)?;
                    match hold {
                        Some((_, body)) => body.extend_from_slice(piece),
                        None => out.extend_from_slice(piece),
                    }
                    *remaining -= n as u64;
                    data = rest;
                    if *remaining == 0 {
                        finish_inflate(&self.set, ctx, Part::Body)?;
                        if let Some((head, body)) = hold.take() {
                            let subs = subs_of(&self.set, &ctx.subs);
                            let mut new_body = Vec::with_capacity(body.len());
                            scan::replace_literal(&body, &subs, &mut new_body);
                            out.extend_from_slice(&set_content_length(&head, new_body.len()));
                            out.extend_from_slice(&new_body);
                        }
                        self.end_request();
                    } else {
                        return Ok(());
                    }
                }
                State::Chunked { ctx, phase } => {
                    if data.is_empty() {
                        return Ok(());
                    }
                    let substituting = !ctx.subs.is_empty();
                    match phase {
                        ChunkPhase::Size(line) => {
                            let (taken, done) = take_line(line, data, MAX_CHUNK_LINE)
                                .ok_or(Refusal::TooLarge("chunk-size line over 4 KiB"))?;
                            if !substituting {
                                out.extend_from_slice(&data[..taken]);
                            }
                            data = &data[taken..];
                            if done {
                                let size = parse_chunk_size(line)?;
                                *phase = if size == 0 { ChunkPhase::Trailers(Vec::new()) } else { ChunkPhase::Data(size) };
                            }
                        }
                        ChunkPhase::Data(remaining) => {
                            let n = (*remaining).min(data.len() as u64) as usize;
                            let (piece, rest) = data.split_at(n);
                            scan_body(&self.set, ctx, piece, Part::Body)?;
                            if substituting {
                                let subs = subs_of(&self.set, &ctx.subs);
                                let mut replaced = Vec::new();
                                ctx.replacer.feed(piece, &subs, &mut replaced);
                                write_chunk(&replaced, out);
                            } else {
                                out.extend_from_slice(piece);
                            }
                            *remaining -= n as u64;
                            data = rest;
                            if *remaining == 0 {
                                *phase = ChunkPhase::DataEnd(Vec::new());
                            }
                        }
                        ChunkPhase::DataEnd(got) => {
                            while got.len() < 2 && !data.is_empty() {
                                got.push(data[0]);
                                data = &data[1..];
                            }
                            if got.len() == 2 {
                                if got.as_slice() != b"\r\n" {
                                    return Err(Refusal::Malformed("chunk data longer than its size"));
                                }
                                if !substituting {
                                    out.extend_from_slice(b"\r\n");
                                }
                                *phase = ChunkPhase::Size(Vec::new());
                            }
                        }
                        ChunkPhase::Trailers(t) => {
                            let old = t.len();
                            let start = old.saturating_sub(3);
                            let take = data.len().min(MAX_HEAD + 1 - old.min(MAX_HEAD));
                            t.extend_from_slice(&data[..take]);
                            // Trailers end at an empty line: "\r\n" right away or "\r\n\r\n".
                            let end = if t.starts_with(b"\r\n") {
                                Some(2)
                            } else {
                                find(&t[start..], b"\r\n\r\n").map(|i| start + i + 4)
                            };
                            let Some(end) = end else {
                                if t.len() > MAX_HEAD {
                                    return Err(Refusal::TooLarge("chunked trailers over 64 KiB"));
                                }
                                return Ok(());
                            };
                            if end > MAX_HEAD {
                                return Err(Refusal::TooLarge("chunked trailers over 64 KiB"));
                            }
                            data = &data[end - old..];
                            t.truncate(end);
                            let trailers = std::mem::take(t);
                            finish_inflate(&self.set, ctx, Part::Body)?;
                            let mut ts = Scanner::new(violator_pats(&self.set, &ctx.violators));
                            if let Some(i) = ts.feed(&trailers) {
                                return Err(violation(&self.set, ctx.violators[i], &ctx.destination, Part::Trailer));
                            }
                            if substituting {
                                let subs = subs_of(&self.set, &ctx.subs);
                                let mut replaced = Vec::new();
                                ctx.replacer.finish(&subs, &mut replaced);
                                write_chunk(&replaced, out);
                                out.extend_from_slice(b"0\r\n");
                            }
                            out.extend_from_slice(&trailers);
                            self.end_request();
                        }
                    }
                }
                State::Opaque { ctx } => {
                    if data.is_empty() {
                        return Ok(());
                    }
                    if let Some(i) = ctx.scanner.feed(data) {
                        return Err(violation(&self.set, ctx.violators[i], &ctx.destination, Part::Upgraded));
                    }
                    out.extend_from_slice(data);
                    return Ok(());
                }
            }
        }
    }

    fn end_request(&mut self) {
        self.release();
        let prev = std::mem::replace(&mut self.state, State::Head);
        if self.upgrade_next {
            self.upgrade_next = false;
            if let State::Fixed { mut ctx, .. } | State::Chunked { mut ctx, .. } = prev {
                ctx.scanner.reset();
                self.state = State::Opaque { ctx };
            }
        }
    }

    /// Which secrets are allowed for a request to `host`.
    fn allowed(&self, host: &str) -> Vec<bool> {
        let id = &self.id;
        self.set
            .secrets
            .iter()
            .map(|s| {
                let tls_ok = if id.tls {
                    match &id.sni {
                        Some(sni) => s.allows(sni) && normalize_host(sni) == host,
                        None => false,
                    }
                } else {
                    !s.require_tls
                };
                let pin_ok = id.pinned_name.as_deref().is_some_and(|n| s.allows(n));
                tls_ok && pin_ok && s.allows(host)
            })
            .collect()
    }

    fn on_head(&mut self, head: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        if head.starts_with(b"PRI * HTTP/2") {
            return Err(Refusal::Unsupported("HTTP/2 (only HTTP/1.x is intercepted)"));
        }
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut hs);
        match req.parse(head) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            Ok(_) => return Err(Refusal::Malformed("request head does not parse")),
            Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge("more than 256 header fields")),
            Err(_) => return Err(Refusal::Malformed("request head does not parse")),
        }
        let method = req.method.unwrap_or("");
        let target = req.path.unwrap_or("");
        let version = req.version.unwrap_or(1);
        if method.eq_ignore_ascii_case("CONNECT") {
            return Err(Refusal::Unsupported("CONNECT inside an intercepted connection"));
        }

        // Host: exactly one; an absolute-form target must name the same authority.
        let mut host_hdr: Option<&[u8]> = None;
        let mut cl: Option<u64> = None;
        let mut te: Option<&[u8]> = None;
        let mut upgrade = false;
        let mut encoding: Option<&[u8]> = None;
        for h in req.headers.iter() {
            let n = h.name;
            if n.eq_ignore_ascii_case("host") {
                if host_hdr.replace(h.value).is_some() {
                    return Err(Refusal::Malformed("more than one Host header"));
                }
            } else if n.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value).ok().map(str::trim).filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
                let v: u64 = v.and_then(|v| v.parse().ok()).ok_or(Refusal::Malformed("invalid Content-Length"))?;
                if cl.replace(v).is_some() {
                    return Err(Refusal::Malformed("more than one Content-Length header"));
                }
            } else if n.eq_ignore_ascii_case("transfer-encoding") {
                if te.replace(h.value).is_some() {
                    return Err(Refusal::Unsupported("more than one Transfer-Encoding header"));
                }
            } else if n.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if n.eq_ignore_ascii_case("content-encoding") && encoding.replace(h.value).is_some() {
                return Err(Refusal::Unsupported("more than one Content-Encoding header"));
            }
        }
        let host = match host_hdr {
            Some(h) => normalize_host(std::str::from_utf8(h).map_err(|_| Refusal::Malformed("Host is not text"))?),
            None if version == 0 => self.id.sni.as_deref().map(normalize_host).unwrap_or_default(),
            None => return Err(Refusal::Malformed("HTTP/1.1 request without Host")),
        };
        let lower = target.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let after = &target[target.find("//").unwrap() + 2..];
            let authority = after.split(['/', '?', '#']).next().unwrap_or("");
            let authority = authority.rsplit('@').next().unwrap_or("");
            if normalize_host(authority) != host {
                return Err(Refusal::Malformed("absolute-form target names another host than Host"));
            }
        }
        let chunked = match te {
            None => false,
            Some(v) if trim(v).eq_ignore_ascii_case(b"chunked") => true,
            Some(_) => return Err(Refusal::Unsupported("Transfer-Encoding other than chunked")),
        };
        if chunked && cl.is_some() {
            return Err(Refusal::Malformed("both Content-Length and Transfer-Encoding (request smuggling)"));
        }

        let destination = sanitize(&host);
        let allowed = self.allowed(&host);
        let set = Arc::clone(&self.set);
        let violators: Vec<usize> = (0..set.secrets.len())
            .filter(|&i| !allowed[i] && !set.action_for(&set.secrets[i]).passes(&host))
            .collect();
        let vpats = violator_pats(&set, &violators);
        let check = |bytes: &[u8], part: Part| -> Result<(), Refusal> {
            match scan::find_any(bytes, &vpats) {
                Some(i) => Err(violation(&set, violators[i], &destination, part)),
                None => Ok(()),
            }
        };
        let subs_where = |pick: fn(&super::config::Injection) -> bool| -> Vec<usize> {
            (0..set.secrets.len()).filter(|&i| allowed[i] && pick(&set.secrets[i].injection)).collect()
        };

        // Request target.
        let (path, query) = match target.find('?') {
            Some(q) => (&target[..q], Some(&target[q + 1..])),
            None => (target, None),
        };
        check(path.as_bytes(), Part::Path)?;
        let mut new_target = path.as_bytes().to_vec();
        if let Some(q) = query {
            check(q.as_bytes(), Part::Query)?;
            new_target.push(b'?');
            let idx = subs_where(|j| j.query);
            if idx.is_empty() {
                new_target.extend_from_slice(q.as_bytes());
            } else {
                let enc: Vec<(Vec<u8>, Vec<u8>)> = idx
                    .iter()
                    .flat_map(|&i| {
                        let s = &set.secrets[i];
                        let v = pct(s.value.expose());
                        let p = s.placeholder.as_bytes();
                        [(p.to_vec(), v.clone()), (pct(p), v)]
                    })
                    .collect();
                let pairs: Vec<(&[u8], &[u8])> = enc.iter().map(|(p, v)| (p.as_slice(), v.as_slice())).collect();
                scan::replace_literal(q.as_bytes(), &pairs, &mut new_target);
            }
        }

        // Headers.
        let hdr_subs = subs_of(&set, &subs_where(|j| j.headers));
        let basic_subs = subs_of(&set, &subs_where(|j| j.basic_auth));
        let mut new_head = Vec::with_capacity(head.len() + 64);
        new_head.extend_from_slice(method.as_bytes());
        new_head.push(b' ');
        new_head.extend_from_slice(&new_target);
        new_head.extend_from_slice(if version == 0 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" });
        for h in req.headers.iter() {
            check(h.name.as_bytes(), Part::Header)?;
            check(h.value, Part::Header)?;
            let mut value = Vec::with_capacity(h.value.len());
            let is_auth = h.name.eq_ignore_ascii_case("authorization") || h.name.eq_ignore_ascii_case("proxy-authorization");
            let basic = if is_auth { basic_credentials(h.value) } else { None };
            if let Some((scheme, creds)) = basic {
                check(&creds, Part::BasicAuth)?;
                let mut replaced = Vec::with_capacity(creds.len());
                scan::replace_literal(&creds, &basic_subs, &mut replaced);
                value.extend_from_slice(scheme);
                value.push(b' ');
                value.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(&replaced).as_bytes());
            } else {
                scan::replace_literal(h.value, &hdr_subs, &mut value);
            }
            new_head.extend_from_slice(h.name.as_bytes());
            new_head.extend_from_slice(b": ");
            new_head.extend_from_slice(&value);
            new_head.extend_from_slice(b"\r\n");
        }
        new_head.extend_from_slice(b"\r\n");

        // Body.
        let identity = encoding.is_none_or(|e| trim(e).eq_ignore_ascii_case(b"identity"));
        let body_subs: Vec<usize> = if identity { subs_where(|j| j.body) } else { Vec::new() };
        let inflater = if !identity && !violators.is_empty() {
            let sink = InflateScan { scanner: Scanner::new(vpats.clone()), hit: None, total: 0 };
            let e = trim(encoding.unwrap_or_default()).to_ascii_lowercase();
            Some(match e.as_slice() {
                b"gzip" | b"x-gzip" => Inflater::Gzip(flate2::write::MultiGzDecoder::new(sink)),
                b"deflate" => Inflater::Zlib(flate2::write::ZlibDecoder::new(sink)),
                _ => return Err(Refusal::Unsupported("a body Content-Encoding that cannot be inspected")),
            })
        } else {
            None
        };
        let ctx = BodyCtx {
            destination,
            scanner: Scanner::new(vpats),
            violators,
            inflater,
            subs: body_subs,
            replacer: StreamReplacer::default(),
        };
        self.upgrade_next = upgrade;
        if chunked {
            out.extend_from_slice(&new_head);
            self.state = State::Chunked { ctx, phase: ChunkPhase::Size(Vec::new()) };
        } else {
            let len = cl.unwrap_or(0);
            let hold = if !ctx.subs.is_empty() && len > 0 {
                if len > MAX_SUBST_BODY {
                    return Err(Refusal::TooLarge("body over 16 MiB with inject_body on"));
                }
                if !self.reserve(len) {
                    return Err(Refusal::TooLarge(
                        "bodies held for substitution across this sandbox's connections over 64 MiB",
                    ));
                }
                // Grows as the body arrives: a head alone never allocates the whole length.
                Some((new_head, Vec::with_capacity((len as usize).min(64 * 1024))))
            } else {
                out.extend_from_slice(&new_head);
                None
            };
            self.state = State::Fixed { remaining: len, ctx, hold };
            if len == 0 {
                if let State::Fixed { ctx, .. } = &mut self.state {
                    finish_inflate(&self.set, ctx, Part::Body)?;
                }
                self.end_request();
            }
        }
        Ok(())
    }
}

fn violation(set: &SecretSet, i: usize, destination: &str, part: Part) -> Refusal {
    let s = &set.secrets[i];
    Refusal::Violation(Violation {
        env: s.env.clone(),
        destination: destination.to_string(),
        part,
        action: set.action_for(s).clone(),
    })
}

fn violator_pats<'a>(set: &'a SecretSet, idx: &[usize]) -> Vec<&'a [u8]> {
    idx.iter().map(|&i| set.secrets[i].placeholder.as_bytes()).collect()
}

fn subs_of<'a>(set: &'a SecretSet, idx: &[usize]) -> Vec<(&'a [u8], &'a [u8])> {
    idx.iter()
        .map(|&i| (set.secrets[i].placeholder.as_bytes(), set.secrets[i].value.expose()))
        .collect()
}

fn scan_body(set: &SecretSet, ctx: &mut BodyCtx, piece: &[u8], part: Part) -> Result<(), Refusal> {
    if let Some(i) = ctx.scanner.feed(piece) {
        return Err(violation(set, ctx.violators[i], &ctx.destination, part));
    }
    if let Some(inf) = &mut ctx.inflater {
        let r = match inf {
            Inflater::Gzip(d) => d.write_all(piece),
            Inflater::Zlib(d) => d.write_all(piece),
        };
        let hit = match inf {
            Inflater::Gzip(d) => d.get_ref().hit,
            Inflater::Zlib(d) => d.get_ref().hit,
        };
        if let Some(i) = hit {
            return Err(violation(set, ctx.violators[i], &ctx.destination, part));
        }
        r.map_err(|_| Refusal::Malformed("compressed body does not decode (or inflates past 64 MiB)"))?;
    }
    Ok(())
}

fn finish_inflate(set: &SecretSet, ctx: &mut BodyCtx, part: Part) -> Result<(), Refusal> {
    if let Some(inf) = ctx.inflater.take() {
        let (r, hit) = match inf {
            Inflater::Gzip(d) => match d.finish() {
                Ok(s) => (Ok(()), s.hit),
                Err(e) => (Err(e), None),
            },
            Inflater::Zlib(d) => match d.finish() {
                Ok(s) => (Ok(()), s.hit),
                Err(e) => (Err(e), None),
            },
        };
        if let Some(i) = hit {
            return Err(violation(set, ctx.violators[i], &ctx.destination, part));
        }
        r.map_err(|_| Refusal::Malformed("compressed body does not decode"))?;
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let e = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(s, |e| e + 1);
    &v[s..e]
}

/// Takes bytes of `data` into `line` up to and including LF; `(taken, complete)`;
/// `None` when the line exceeds `max`.
fn take_line(line: &mut Vec<u8>, data: &[u8], max: usize) -> Option<(usize, bool)> {
    let (taken, done) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (i + 1, true),
        None => (data.len(), false),
    };
    line.extend_from_slice(&data[..taken]);
    (line.len() <= max).then_some((taken, done))
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, Refusal> {
    let bad = Refusal::Malformed("invalid chunk size");
    let body = line.strip_suffix(b"\r\n").ok_or(bad.clone())?;
    let digits = body.split(|&b| b == b';').next().unwrap_or_default();
    let digits = trim(digits);
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad);
    }
    let mut v = 0u64;
    for &b in digits {
        v = v * 16 + hex_val(b).ok_or(bad.clone())? as u64;
    }
    Ok(v)
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn write_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// `Basic <base64>` ⇒ (scheme as sent, decoded credentials).
fn basic_credentials(value: &[u8]) -> Option<(&[u8], Vec<u8>)> {
    let v = trim(value);
    let sp = v.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = v.split_at(sp);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let b64 = trim(rest);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(b64))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64))
        .ok()?;
    Some((scheme, decoded))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn pct(bytes: &[u8]) -> Vec<u8> {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::percent_encode(bytes, SET).to_string().into_bytes()
}

/// The head with its `Content-Length` value replaced.
fn set_content_length(head: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 8);
    for line in head.split_inclusive(|&b| b == b'\n') {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with(b"content-length:") {
            out.extend_from_slice(format!("Content-Length: {len}\r\n").as_bytes());
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}
