//! Real TLS handshakes over loopback TCP between the guest-facing server config and the
//! upstream client config; leaf caching; CA generation time; refusals.

use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Serves one TLS connection on 127.0.0.1 with `server`, echoing one line; the client
/// connects with `client` to `name`. Returns the echoed bytes or the client's error.
fn handshake(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>, name: &str) -> Result<Vec<u8>, String> {
    rt().block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let srv = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            if let Ok(mut tls) = acceptor.accept(sock).await {
                let mut buf = [0u8; 64];
                if let Ok(n) = tls.read(&mut buf).await {
                    let _ = tls.write_all(&buf[..n]).await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        let connector = tokio_rustls::TlsConnector::from(client);
        let sock = TcpStream::connect(addr).await.unwrap();
        let result = async {
            let mut tls = connector
                .connect(ServerName::try_from(name.to_string()).unwrap(), sock)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
            tls.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
            Ok(out)
        }
        .await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), srv).await;
        result
    })
}

fn cache() -> (Arc<InterceptCa>, Arc<LeafCache>) {
    let ca = Arc::new(InterceptCa::generate("test").unwrap());
    let leaves = Arc::new(LeafCache::new(Arc::clone(&ca), 8));
    (ca, leaves)
}

#[test]
fn guest_trusting_the_ca_completes_a_handshake_for_any_name() {
    let (ca, leaves) = cache();
    let client = upstream_config(true, &[ca.cert_pem().to_string()], false).unwrap();
    for name in ["api.example.test", "other.example.test"] {
        let out = handshake(server_config(Arc::clone(&leaves)).unwrap(), Arc::clone(&client), name).unwrap();
        assert_eq!(out, b"ping\n");
    }
    assert_eq!(leaves.len(), 2);
}

#[test]
fn untrusted_upstream_is_refused_unless_verification_is_off() {
    let (_ca, leaves) = cache();
    let other = InterceptCa::generate("other").unwrap();
    let strict = upstream_config(true, &[other.cert_pem().to_string()], false).unwrap();
    let err = handshake(server_config(Arc::clone(&leaves)).unwrap(), strict, "api.example.test").unwrap_err();
    assert!(err.contains("UnknownIssuer") || err.contains("invalid peer certificate"), "{err}");
    let lax = upstream_config(false, &[], false).unwrap();
    assert_eq!(handshake(server_config(leaves).unwrap(), lax, "api.example.test").unwrap(), b"ping\n");
}

#[test]
fn leaf_for_another_name_is_refused() {
    // The certificate is issued for the SNI: a client checking a different name fails.
    let (ca, leaves) = cache();
    let leaf = leaves.get("a.example.test").unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new({
            let mut r = rustls::RootCertStore::empty();
            r.add(ca.cert_der().clone()).unwrap();
            r
        }),
        provider(),
    )
    .build()
    .unwrap();
    use rustls::client::danger::ServerCertVerifier;
    let now = rustls::pki_types::UnixTime::now();
    let ok = ServerName::try_from("a.example.test").unwrap();
    let bad = ServerName::try_from("b.example.test").unwrap();
    assert!(verifier.verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &ok, &[], now).is_ok());
    assert!(verifier.verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &bad, &[], now).is_err());
}

#[test]
fn leaves_are_cached_and_the_cache_is_bounded() {
    let ca = Arc::new(InterceptCa::generate("t").unwrap());
    let leaves = LeafCache::new(ca, 2);
    let a1 = leaves.get("a.example.test").unwrap();
    let a2 = leaves.get("A.example.test.").unwrap();
    assert!(Arc::ptr_eq(&a1, &a2), "second lookup is the cached leaf");
    leaves.get("b.example.test").unwrap();
    leaves.get("a.example.test").unwrap(); // a is now most recent
    leaves.get("c.example.test").unwrap(); // evicts b
    assert_eq!(leaves.len(), 2);
    assert!(Arc::ptr_eq(&a1, &leaves.get("a.example.test").unwrap()));
    for bad in ["", "localhost", "10.0.0.1", "a..b", "*.example.test", "-a.test", &"a".repeat(64), "a b.test"] {
        assert!(leaves.get(bad).is_err(), "{bad:?}");
    }
    assert_eq!(leaves.len(), 2);
}

#[test]
fn ca_generation_time() {
    // Recorded in DESIGN.md ("Secrets": why a CA per sandbox): generation and the first
    // leaf are both cheap enough for every sandbox start.
    let t = Instant::now();
    let n = 20;
    for _ in 0..n {
        InterceptCa::generate("bench").unwrap();
    }
    let per_ca = t.elapsed() / n;
    let ca = Arc::new(InterceptCa::generate("bench").unwrap());
    let leaves = LeafCache::new(ca, 100);
    let t = Instant::now();
    for i in 0..n {
        leaves.get(&format!("h{i}.example.test")).unwrap();
    }
    let per_leaf = t.elapsed() / n;
    let t = Instant::now();
    for i in 0..n {
        leaves.get(&format!("h{i}.example.test")).unwrap();
    }
    let per_hit = t.elapsed() / n;
    eprintln!("interception CA: {per_ca:?} per CA, {per_leaf:?} per new leaf, {per_hit:?} per cached leaf");
    assert!(per_ca.as_millis() < 200, "{per_ca:?}");
    assert!(per_hit < per_leaf);
}

#[test]
fn user_ca_from_pem_and_from_a_private_file() {
    let ca = InterceptCa::generate("user").unwrap();
    let key_pem = ca.issuer.key().serialize_pem();
    let loaded = InterceptCa::from_pem(ca.cert_pem(), &key_pem).unwrap();
    let leaves = Arc::new(LeafCache::new(Arc::new(loaded), 4));
    let client = upstream_config(true, &[ca.cert_pem().to_string()], false).unwrap();
    assert_eq!(handshake(server_config(leaves).unwrap(), client, "x.example.test").unwrap(), b"ping\n");

    // A key that is not the certificate's is refused, naming the options only.
    let other = InterceptCa::generate("other").unwrap();
    let e = InterceptCa::from_pem(ca.cert_pem(), &other.issuer.key().serialize_pem()).unwrap_err();
    assert!(e.0.contains("intercept_ca_key does not belong"), "{e}");
    assert!(!e.0.contains("PRIVATE KEY"));

    // Paths: the key file must be private.
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("msb-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = dir.join("ca.key");
    std::fs::write(&key_path, &key_pem).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let p = key_path.to_str().unwrap();
    let e = config::key_pem_or_path(p, "tls.intercept_ca_key").unwrap_err();
    assert!(e.0.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(config::key_pem_or_path(p, "tls.intercept_ca_key").unwrap(), key_pem);
    let e = config::pem_or_path(dir.join("missing.pem").to_str().unwrap(), "tls.upstream_ca_cert").unwrap_err();
    assert!(e.0.starts_with("tls.upstream_ca_cert: cannot read"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!format!("{ca:?}").contains("PRIVATE"));
}
