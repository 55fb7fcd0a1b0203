//! The local mesh: a certificate authority in the state directory, short-lived service
//! certificates carrying SPIFFE IDs, and the TLS side of a front that requires them.
//!
//! [`Authority::load_or_create`] keeps `ca.crt` and `ca.key` (mode 0600) in a directory and
//! reuses them. [`Authority::issue`] writes `<service>.crt` / `<service>.key` (0600, replaced
//! atomically) with the URI SAN `spiffe://<trust domain>/svc/<service>` and loopback SANs.
//! [`TlsFront`] is the server side of an mTLS front: client certificates must chain to the
//! authority and carry an allowed SPIFFE ID, checked during the handshake so anything else is
//! refused there; its certificate can be replaced at any time for new handshakes
//! ([`TlsFront::set_certificate`]) without touching open connections.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use crate::error::MeshError;
use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MeshError + '_ {
    move |source| MeshError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cert_err(e: impl fmt::Display) -> MeshError {
    MeshError::Certificate(e.to_string())
}

/// A certificate issued to a service.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate file (PEM).
    pub cert_path: PathBuf,
    /// The key file (PEM, mode 0600).
    pub key_path: PathBuf,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The key, PEM.
    pub key_pem: String,
    /// Its serial number, hex with colons.
    pub serial: String,
    /// When it expires.
    pub not_after: SystemTime,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
}

/// The local certificate authority of one deployment.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    trust_domain: String,
    ca_pem: String,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The signing key stays out of debug output.
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// The authority in `dir` (created with its files on first use) for `trust_domain`
    /// (`<stack>.corral`).
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, MeshError> {
        crate::private::create_dir(dir).map_err(io_err(dir))?;
        crate::private::create_dir(&dir.join(SERVICES)).map_err(io_err(dir))?;
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        let (ca_pem, key) = if cert_path.exists() && key_path.exists() {
            // A key someone else could have planted or changed would let them mint identities.
            for p in [dir, key_path.as_path(), cert_path.as_path()] {
                if let Some(reason) = crate::private::untrusted(p).map_err(io_err(p))? {
                    return Err(MeshError::Untrusted {
                        path: p.to_path_buf(),
                        reason,
                    });
                }
            }
            let ca_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            (ca_pem, KeyPair::from_pem(&key_pem).map_err(cert_err)?)
        } else {
            let key = KeyPair::generate().map_err(cert_err)?;
            let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.distinguished_name
                .push(DnType::CommonName, format!("corral CA for {trust_domain}"));
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
            let cert = p.self_signed(&key).map_err(cert_err)?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            write_private(&cert_path, cert.pem().as_bytes())?;
            (cert.pem(), key)
        };
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(cert_err)?;
        Ok(Authority {
            issuer,
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_owned(),
            ca_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `spiffe://<trust domain>/svc/<service>`.
    pub fn spiffe_id(&self, service: &str) -> String {
        format!("spiffe://{}/svc/{service}", self.trust_domain)
    }

    /// Issues (or re-issues) the certificate of `service`, valid from now for `lifetime`, and
    /// writes it. Its start is backdated a minute, for clocks a little behind ours.
    pub fn issue(&self, service: &str, lifetime: Duration) -> Result<Issued, MeshError> {
        let skew = Duration::from_secs(60);
        self.issue_valid(
            service,
            time::OffsetDateTime::now_utc() - skew,
            lifetime + skew,
        )
    }

    /// Like [`Authority::issue`], valid from `not_before` for `lifetime` (tests use this for
    /// expired certificates).
    pub fn issue_valid(
        &self,
        service: &str,
        not_before: time::OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Issued, MeshError> {
        let id = self.spiffe_id(service);
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).map_err(cert_err)?;
        p.distinguished_name.push(DnType::CommonName, service);
        p.subject_alt_names
            .push(SanType::URI(id.clone().try_into().map_err(cert_err)?));
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        p.subject_alt_names
            .push(SanType::IpAddress("::1".parse().expect("ip")));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        let life = time::Duration::try_from(lifetime).map_err(cert_err)?;
        p.not_after = not_before + life;
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        // Services' files live in a folder of their own: a service called "ca" cannot
        // overwrite the authority's.
        let (cert_path, key_path) = (
            self.dir.join(SERVICES).join(format!("{service}.crt")),
            self.dir.join(SERVICES).join(format!("{service}.key")),
        );
        write_private(&key_path, key_pem.as_bytes())?;
        write_private(&cert_path, cert_pem.as_bytes())?;
        let serial = serial_of(cert.der())?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(p.not_after.unix_timestamp().max(0) as u64);
        Ok(Issued {
            cert_path,
            key_path,
            cert_pem,
            key_pem,
            serial,
            not_after,
            spiffe_id: id,
        })
    }
}

/// Writes an owner-only (0600) file through a new temporary and a rename, so a reader never
/// sees half of it and a link planted at the temporary's name is not followed.
fn write_private(path: &Path, data: &[u8]) -> Result<(), MeshError> {
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut f = crate::private::create_new(&tmp).map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// The folder of the authority's directory that holds the services' certificates and keys.
pub const SERVICES: &str = "services";

/// The serial number of a DER certificate, hex with colons.
pub fn serial_of(der: &[u8]) -> Result<String, MeshError> {
    let (_, x) = x509_parser::parse_x509_certificate(der).map_err(cert_err)?;
    Ok(x.raw_serial_as_string())
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ext in x.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) =
            ext.parsed_extension()
        {
            for name in &san.general_names {
                if let x509_parser::extensions::GeneralName::URI(u) = name {
                    out.push((*u).to_owned());
                }
            }
        }
    }
    out
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, MeshError> {
    let certs = pem_certs(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(cert_err)?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(certs, key, &provider).map_err(cert_err)?;
    Ok(Arc::new(ck))
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, MeshError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(cert_err)?;
    if certs.is_empty() {
        return Err(cert_err("no certificate in PEM"));
    }
    Ok(certs)
}

/// Serves the current certificate of a front; replaced atomically on rotation.
#[derive(Debug)]
struct Rotating(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Rotating {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Chain to the CA (webpki), then the SPIFFE ID must be in `allow` (empty: any from the CA).
#[derive(Debug)]
struct SpiffeVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: Vec<String>,
    denied: Arc<AtomicU64>,
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if verified.is_err() {
            self.denied.fetch_add(1, Ordering::Relaxed);
            return verified;
        }
        if self.allow.is_empty() || uri_sans(end_entity).iter().any(|u| self.allow.contains(u)) {
            return verified;
        }
        self.denied.fetch_add(1, Ordering::Relaxed);
        Err(rustls::Error::General(
            "client SPIFFE ID not allowed".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS side of an mTLS front.
#[derive(Debug, Clone)]
pub struct TlsFront {
    pub(crate) config: Arc<ServerConfig>,
    cert: Arc<Rotating>,
    denied: Arc<AtomicU64>,
}

impl TlsFront {
    /// A front presenting `cert_pem`/`key_pem`, requiring client certificates from the CA in
    /// `ca_pem` whose SPIFFE ID is in `allow` (empty: any certificate of the CA).
    pub fn new(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        allow: Vec<String>,
    ) -> Result<Self, MeshError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in pem_certs(ca_pem)? {
            roots.add(c).map_err(cert_err)?;
        }
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(cert_err)?;
        let denied = Arc::new(AtomicU64::new(0));
        let verifier = Arc::new(SpiffeVerifier {
            inner,
            allow,
            denied: denied.clone(),
        });
        let cert = Arc::new(Rotating(ArcSwap::new(certified_key(cert_pem, key_pem)?)));
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(cert_err)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(cert.clone());
        Ok(TlsFront {
            config: Arc::new(config),
            cert,
            denied,
        })
    }

    /// Presents a new certificate from the next handshake on.
    pub fn set_certificate(&self, cert_pem: &str, key_pem: &str) -> Result<(), MeshError> {
        self.cert.0.store(certified_key(cert_pem, key_pem)?);
        Ok(())
    }

    /// Handshakes refused: no certificate, another CA, expired, or a SPIFFE ID not allowed.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_persists_and_issues_spiffe_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path(), "shop.corral").unwrap();
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(p).unwrap().permissions()) & 0o777
        };
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
        let a = ca.issue("api", Duration::from_secs(3600)).unwrap();
        assert_eq!(a.spiffe_id, "spiffe://shop.corral/svc/api");
        assert_eq!(mode(&a.key_path), 0o600);
        let der = pem_certs(&a.cert_pem).unwrap().remove(0);
        assert_eq!(
            uri_sans(&der),
            vec!["spiffe://shop.corral/svc/api".to_owned()]
        );
        let b = ca.issue("api", Duration::from_secs(3600)).unwrap();
        assert_ne!(a.serial, b.serial);
        // Reloaded, the authority is the same CA.
        let again = Authority::load_or_create(dir.path(), "shop.corral").unwrap();
        assert_eq!(again.ca_pem(), ca.ca_pem());
        TlsFront::new(again.ca_pem(), &b.cert_pem, &b.key_pem, vec![]).unwrap();
    }
}
