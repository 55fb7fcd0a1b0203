//! mTLS fronts over real sockets: who gets through, who is refused, and rotation.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod common;

use corral_core::mesh::{serial_of, Authority, Issued, TlsFront};
use corral_core::proxy::{Proxy, ProxyConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn echo_backend() -> SocketAddr {
    common::serve(|mut s| {
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf) {
            let _ = s.write_all(&buf[..n]);
        }
    })
}

struct Setup {
    rt: tokio::runtime::Runtime,
    ca: Authority,
    proxy: Arc<Proxy>,
    _dir: tempfile::TempDir,
}

fn setup(allow: &[&str]) -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path(), "shop.corral").unwrap();
    let front = ca.issue("db", Duration::from_secs(3600)).unwrap();
    let allow = allow.iter().map(|s| ca.spiffe_id(s)).collect();
    let tls = TlsFront::new(ca.ca_pem(), &front.cert_pem, &front.key_pem, allow).unwrap();
    let proxy = Proxy::bind_tls(
        "127.0.0.1:0".parse().unwrap(),
        ProxyConfig::default(),
        rt.handle(),
        tls,
    )
    .unwrap();
    proxy.set_upstreams(vec![("db-0".into(), echo_backend(), 1)]);
    Setup {
        rt,
        ca,
        proxy,
        _dir: dir,
    }
}

/// Connects with `client` (None: no certificate) trusting `ca_pem`; returns the echo and the
/// serial of the certificate the front presented, or the error.
fn call(s: &Setup, ca_pem: &str, client: Option<&Issued>) -> Result<(String, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
            builder
                .with_client_auth_cert(
                    certs,
                    PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
                )
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let front = s.proxy.local_addr();
    s.rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(front)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let serial = {
            let (_, conn) = tls.get_ref();
            serial_of(conn.peer_certificates().unwrap()[0].as_ref()).unwrap()
        };
        // TLS 1.3 reports a refused client certificate after the handshake: on first use.
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok((String::from_utf8_lossy(&buf).into_owned(), serial))
    })
}

#[test]
fn an_allowed_client_gets_through_and_everyone_else_is_refused() {
    let s = setup(&["api"]);
    let api = s.ca.issue("api", Duration::from_secs(3600)).unwrap();
    assert_eq!(call(&s, s.ca.ca_pem(), Some(&api)).unwrap().0, "ping");

    assert!(
        call(&s, s.ca.ca_pem(), None).is_err(),
        "no client certificate"
    );
    let other_dir = tempfile::tempdir().unwrap();
    let other = Authority::load_or_create(other_dir.path(), "shop.corral").unwrap();
    let forged = other.issue("api", Duration::from_secs(3600)).unwrap();
    assert!(
        call(&s, s.ca.ca_pem(), Some(&forged)).is_err(),
        "a certificate from another CA"
    );
    let old =
        s.ca.issue_valid(
            "api",
            time::OffsetDateTime::now_utc() - time::Duration::hours(3),
            Duration::from_secs(3600),
        )
        .unwrap();
    assert!(
        call(&s, s.ca.ca_pem(), Some(&old)).is_err(),
        "an expired certificate"
    );
    let worker = s.ca.issue("worker", Duration::from_secs(3600)).unwrap();
    assert!(
        call(&s, s.ca.ca_pem(), Some(&worker)).is_err(),
        "a SPIFFE ID outside allow"
    );

    let tls = s.proxy.tls().unwrap();
    assert_eq!(
        tls.denied(),
        3,
        "other CA, expired and not allowed are refused by the verifier"
    );
    assert_eq!(
        s.proxy.tls_refused(),
        4,
        "and with no certificate at all, four handshakes failed"
    );
    assert_eq!(s.proxy.totals().0.connections, 1);
}

#[test]
fn rotation_changes_the_certificate_of_new_connections() {
    let s = setup(&[]);
    let api = s.ca.issue("api", Duration::from_secs(3600)).unwrap();
    let (_, before) = call(&s, s.ca.ca_pem(), Some(&api)).unwrap();
    let renewed = s.ca.issue("db", Duration::from_secs(3600)).unwrap();
    s.proxy
        .tls()
        .unwrap()
        .set_certificate(&renewed.cert_pem, &renewed.key_pem)
        .unwrap();
    let (echo, after) = call(&s, s.ca.ca_pem(), Some(&api)).unwrap();
    assert_eq!(echo, "ping");
    assert_ne!(before, after);
    assert_eq!(after, renewed.serial);
}

#[test]
fn the_authority_keeps_its_files_apart_owner_only_and_trusts_no_planted_key() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let ca = Authority::load_or_create(&tls, "shop.corral").unwrap();
    let ca_pem = std::fs::read_to_string(tls.join("ca.crt")).unwrap();
    // A service named "ca" gets its own files, not the authority's.
    let issued = ca.issue("ca", Duration::from_secs(3600)).unwrap();
    assert_eq!(issued.cert_path, tls.join("services").join("ca.crt"));
    assert_eq!(std::fs::read_to_string(tls.join("ca.crt")).unwrap(), ca_pem);
    for f in ["ca.crt", "ca.key", "services/ca.crt", "services/ca.key"] {
        assert_eq!(
            std::fs::metadata(tls.join(f)).unwrap().mode() & 0o777,
            0o600,
            "{f}"
        );
    }
    assert_eq!(std::fs::metadata(&tls).unwrap().mode() & 0o777, 0o700);
    drop(ca);
    // A key others could have written is refused, not adopted.
    std::fs::set_permissions(tls.join("ca.key"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = Authority::load_or_create(&tls, "shop.corral").unwrap_err();
    assert!(e.to_string().contains("others can write it"), "{e}");
    std::fs::set_permissions(tls.join("ca.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Authority::load_or_create(&tls, "shop.corral").is_ok());
}

/// A plain round trip through the front, without TLS.
fn plain_call(s: &Setup) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.proxy.local_addr())?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"ping")?;
    let mut buf = [0u8; 16];
    let n = c.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn set_tls_turns_the_mesh_off_and_on_again_on_the_same_listener() {
    let s = setup(&["api"]);
    let api = s.ca.issue("api", Duration::from_secs(3600)).unwrap();
    assert!(
        plain_call(&s).map_or(true, |echo| echo != "ping"),
        "mTLS front: a plain client gets no echo"
    );
    s.proxy.set_tls(None);
    assert_eq!(plain_call(&s).unwrap(), "ping", "plain now");
    let front = s.ca.issue("db", Duration::from_secs(3600)).unwrap();
    let allow = vec![s.ca.spiffe_id("api")];
    s.proxy.set_tls(Some(
        TlsFront::new(s.ca.ca_pem(), &front.cert_pem, &front.key_pem, allow).unwrap(),
    ));
    assert_eq!(call(&s, s.ca.ca_pem(), Some(&api)).unwrap().0, "ping");
    assert!(plain_call(&s).map_or(true, |echo| echo != "ping"));
}
