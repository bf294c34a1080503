//! rustls server configuration from PEM files or a PKCS#12 (PFX) file with a password file.
//! TLS 1.2 and 1.3 only, with the aws-lc-rs provider chosen explicitly (its X25519 is a third
//! cheaper than ring's, and X25519 was a third of the server's CPU in STARTTLS churn). Legacy
//! senders that only speak older TLS can still deliver in plain text on port 25 (STARTTLS is
//! opportunistic there).

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{AdminSection, BindingSection, TlsMode};

/// A certificate or key that could not be loaded, naming the binding and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// The rustls configuration for a binding, or None when it has no TLS.
pub fn server_config(b: &BindingSection) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    if b.tls == TlsMode::None {
        return Ok(None);
    }
    let who = format!("binding {:?}", b.name);
    let (chain, key) = match (&b.certificate, &b.key, &b.pkcs12) {
        (Some(cert), Some(key), None) => load_pem(&who, cert, key)?,
        (None, None, Some(pfx)) => load_pkcs12(pfx, b.pkcs12_password_file.as_deref())
            .map_err(|e| TlsError(format!("{who}: pkcs12 {}: {e}", pfx.display())))?,
        _ => {
            return Err(TlsError(format!(
                "binding {:?}: TLS needs certificate + key or pkcs12",
                b.name
            )));
        }
    };
    // SMTP is not HTTP: no ALPN; session tickets are fine.
    build(&format!("binding {:?}", b.name), chain, key, &[]).map(Some)
}

/// The admin endpoint's TLS configuration (`[admin] certificate` + `key`), or None.
pub fn admin_config(a: &AdminSection) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    let (Some(cert), Some(key)) = (&a.certificate, &a.key) else {
        return Ok(None);
    };
    let (chain, key) = load_pem("admin", cert, key)?;
    build("admin", chain, key, &[b"http/1.1"]).map(Some)
}

type Chain = Vec<CertificateDer<'static>>;

/// A certificate chain and its key from PEM files; errors name `who` and the file.
fn load_pem(
    who: &str,
    cert: &Path,
    key: &Path,
) -> Result<(Chain, PrivateKeyDer<'static>), TlsError> {
    let err = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        TlsError(format!("{who}: {what} {}: {e}", path.display()))
    };
    let chain: Chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err("certificate", cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("certificate", cert, &e))?;
    if chain.is_empty() {
        return Err(err("certificate", cert, &"no CERTIFICATE block found"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err("key", key, &e))?;
    Ok((chain, key))
}

/// The suites, cheapest first among equals: every one is AEAD with forward secrecy. The
/// SHA-256 suites come first because their key schedule (a dozen HMACs per handshake, more with
/// tickets) runs on the CPU's SHA extensions, while SHA-384 has none on most x86: with
/// AES-256-GCM-SHA384 first, SHA-512 blocks were 12 % of the server's CPU in STARTTLS churn.
/// AES-128-GCM is a 128-bit-secure choice (RFC 8446 makes it the one suite every TLS 1.3 peer
/// must support); ChaCha20 serves CPUs without AES instructions.
static CIPHER_SUITES: &[rustls::SupportedCipherSuite] = &[
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
];

/// Key exchange, in order: X25519 first (what clients send a share for), then the NIST curves.
static KX_GROUPS: &[&dyn rustls::crypto::SupportedKxGroup] = &[
    rustls::crypto::aws_lc_rs::kx_group::X25519,
    rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
    rustls::crypto::aws_lc_rs::kx_group::SECP384R1,
];

fn build(
    who: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        kx_groups: KX_GROUPS.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError(format!("{who}: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            TlsError(format!(
                "{who}: certificate and key do not match or are unusable: {e}"
            ))
        })?;
    cfg.max_early_data_size = 0;
    // Our order of CIPHER_SUITES, not the client's: most clients list AES-256 first.
    cfg.ignore_client_order = true;
    // Resumption without server memory: TLS 1.3 PSKs and TLS 1.2 tickets sealed with keys that
    // rotate every 6 hours (and at a reload); a client that resumes skips the certificate
    // signature and its check. Sessions of TLS 1.2 clients without ticket support are kept
    // by ID, bounded.
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| TlsError(format!("{who}: session tickets: {e}")))?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    // One ticket per handshake (rustls sends 2): a client resumes once per connection and gets
    // a fresh ticket each time it does; each ticket costs a key derivation and a seal.
    cfg.send_tls13_tickets = 1;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

fn load_pkcs12(
    path: &Path,
    password_file: Option<&Path>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let password = match password_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("password file {}: {e}", p.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        None => String::new(),
    };
    let ks = p12_keystore::KeyStore::from_pkcs12(
        &data,
        &password,
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .map_err(|e| format!("cannot decode (wrong password?): {e}"))?;
    let (_, chain) = ks
        .private_key_chain()
        .ok_or("no private key with a certificate chain inside")?;
    let certs: Vec<CertificateDer<'static>> = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    if certs.is_empty() {
        return Err("the private key has no certificate".into());
    }
    let key = PrivateKeyDer::try_from(chain.key().as_der().to_vec()).map_err(|e| e.to_string())?;
    Ok((certs, key))
}

/// `TLSv1.3 TLS13_AES_256_GCM_SHA384`, for logs and the Received header.
pub fn describe(conn: &rustls::CommonState) -> String {
    let v = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    match conn.negotiated_cipher_suite() {
        Some(s) => format!("{v} {:?}", s.suite()),
        None => v.to_string(),
    }
}
