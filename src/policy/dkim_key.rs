//! DKIM RSA keys parsed once, not once per signature.
//!
//! mail-auth 0.11 with ring keeps a DKIM key as its DER bytes, and ring rebuilds the key's
//! Montgomery constants from them on every verification: about 40 % of an RSA-2048 check. Once
//! a key record is in the TXT cache, [`faster`] makes a key with the same record parsed once
//! by aws-lc-rs (`ParsedPublicKey`), which replaces mail-auth's in the cache.
//!
//! The new key reads the record's `p=` tag itself, so it could in principle read another key
//! than mail-auth did (a record it splits differently). It is not trusted for that: until one
//! signature has verified under both keys, every check is mail-auth's own (and ours is only
//! compared with it); from then on the keys are the same key (a PKCS #1 v1.5 signature that
//! verifies under two moduli does not happen by chance), and ours answers alone. A signature
//! that passes under mail-auth's key and not under ours shows they differ (the record was
//! read again after the key rotated, or in another order): ours is then never asked again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY};
use base64::Engine;
use mail_auth::common::crypto::{Algorithm, CryptoError, VerifyingKey};
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::Canonicalization;

/// mail-auth's key for a record, and the same record's key parsed once for rsa-sha256 (rsa-sha1,
/// which ringmx does not accept as a pass anyway, stays with mail-auth's key).
struct Parsed {
    theirs: Arc<DomainKey>,
    sha256: ParsedPublicKey,
    /// A signature verified under both keys.
    confirmed: AtomicBool,
    /// A signature verified under mail-auth's key and not under ours: not the same key.
    refuted: AtomicBool,
}

/// A key for `record` (a DKIM key record's text) that checks what `theirs` (mail-auth's key
/// from the same record) checks, parsed once; `None` when the record is not an RSA key that
/// aws-lc-rs reads.
pub fn faster(theirs: Arc<DomainKey>, record: &[u8]) -> Option<DomainKey> {
    let f = theirs.f;
    Some(DomainKey {
        p: Box::new(parse(theirs, record)?),
        f,
    })
}

fn parse(theirs: Arc<DomainKey>, record: &[u8]) -> Option<Parsed> {
    let key = rsa_key(record)?;
    let sha256 =
        ParsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, &key).ok()?;
    Some(Parsed {
        theirs,
        sha256,
        confirmed: AtomicBool::new(false),
        refuted: AtomicBool::new(false),
    })
}

/// The bytes of a key record's `p=` tag (RFC 6376 §3.6.1), white space dropped and
/// base64-decoded, when its `k=` (if any) is `rsa`.
fn rsa_key(record: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(record).ok()?;
    let mut p = None;
    for tag in text.split(';') {
        let Some((name, value)) = tag.split_once('=') else {
            continue;
        };
        match name.trim() {
            "p" => p = Some(value),
            "k" if !value.trim().eq_ignore_ascii_case("rsa") => return None,
            _ => {}
        }
    }
    let b64: String = p?.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

impl Parsed {
    fn ours(&self, input: &[u8], signature: &[u8], algorithm: Algorithm) -> mail_auth::Result<()> {
        match algorithm {
            Algorithm::RsaSha256 => self
                .sha256
                .verify_sig(input, signature)
                .map_err(|_| mail_auth::Error::Crypto(CryptoError::FailedVerification)),
            _ => self.theirs.p.verify_bytes(input, signature, algorithm),
        }
    }
}

impl VerifyingKey for Parsed {
    fn verify<'a>(
        &self,
        headers: &mut dyn Iterator<Item = (&'a [u8], &'a [u8])>,
        signature: &[u8],
        canonicalization: Canonicalization,
        algorithm: Algorithm,
    ) -> mail_auth::Result<()> {
        let mut data = Vec::with_capacity(256);
        canonicalization.canonicalize_headers(headers, &mut data);
        self.verify_bytes(&data, signature, algorithm)
    }

    fn verify_bytes(
        &self,
        input: &[u8],
        signature: &[u8],
        algorithm: Algorithm,
    ) -> mail_auth::Result<()> {
        if self.confirmed.load(Ordering::Relaxed) {
            return self.ours(input, signature, algorithm);
        }
        let theirs = self.theirs.p.verify_bytes(input, signature, algorithm);
        if theirs.is_ok() && !self.refuted.load(Ordering::Relaxed) {
            let same = self.ours(input, signature, algorithm).is_ok();
            let settled = if same { &self.confirmed } else { &self.refuted };
            settled.store(true, Ordering::Relaxed);
        }
        theirs
    }

    fn public_key_bits(&self) -> usize {
        self.theirs.p.public_key_bits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::common::parse::TxtRecordParser;

    /// An RSA-2048 key record and a signature over b"signed data" (rsa-sha256), made with
    /// openssl; and a record for another key.
    fn fixture() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringmx-dkim-key-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl missing: apt-get install openssl");
            assert!(out.status.success(), "{args:?}");
            out.stdout
        };
        run(&["genrsa", "-out", "k.pem", "2048"]);
        run(&["genrsa", "-out", "other.pem", "2048"]);
        std::fs::write(dir.join("data"), b"signed data").unwrap();
        let sig = run(&["dgst", "-sha256", "-sign", "k.pem", "data"]);
        let record = |pem: &str| {
            let der = run(&["rsa", "-in", pem, "-pubout", "-outform", "DER"]);
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            // Folded with white space inside the base64, as long records often are.
            let (a, b) = b64.split_at(100);
            format!("v=DKIM1; k=rsa; h=sha256; p={a} \t {b}").into_bytes()
        };
        let (good, other) = (record("k.pem"), record("other.pem"));
        std::fs::remove_dir_all(&dir).unwrap();
        (good, other, sig)
    }

    fn theirs(record: &[u8]) -> Arc<DomainKey> {
        Arc::new(DomainKey::parse(record).unwrap())
    }

    #[test]
    fn the_same_answers_as_mail_auth() {
        let (good, _, sig) = fixture();
        let data = b"signed data";
        let key = faster(theirs(&good), &good).unwrap();
        let mut bad_sig = sig.clone();
        bad_sig[10] ^= 1;
        for _ in 0..2 {
            // Before and after the first pass confirms the key.
            assert!(key.p.verify_bytes(data, &sig, Algorithm::RsaSha256).is_ok());
            assert!(
                key.p
                    .verify_bytes(b"other data", &sig, Algorithm::RsaSha256)
                    .is_err()
            );
            assert!(
                key.p
                    .verify_bytes(data, &bad_sig, Algorithm::RsaSha256)
                    .is_err()
            );
            assert!(key.p.verify_bytes(data, &sig, Algorithm::RsaSha1).is_err());
            assert!(
                key.p
                    .verify_bytes(data, &sig, Algorithm::Ed25519Sha256)
                    .is_err()
            );
        }
        assert_eq!(key.p.public_key_bits(), 2048);
        assert_eq!(key.f, theirs(&good).f);
    }

    #[test]
    fn a_key_read_differently_is_never_used() {
        // mail-auth's key is `other`'s, ours is read from `good`: what `good` signed must not
        // pass, however often it is tried.
        let (good, other, sig) = fixture();
        let key = faster(theirs(&other), &good).unwrap();
        for _ in 0..3 {
            assert!(
                key.p
                    .verify_bytes(b"signed data", &sig, Algorithm::RsaSha256)
                    .is_err()
            );
        }
    }

    /// Whether `key` was confirmed, and whether it was refuted.
    fn settled(key: &Parsed) -> (bool, bool) {
        (
            key.confirmed.load(Ordering::Relaxed),
            key.refuted.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn a_key_that_differs_is_not_asked_again() {
        // mail-auth's key is `good`'s, ours is `other`'s (the record rotated between the two
        // reads): mail-auth's passes decide, and after the first one ours is set aside, not
        // checked with every signature until the entry expires.
        let (good, other, sig) = fixture();
        let key = parse(theirs(&good), &other).unwrap();
        assert_eq!(settled(&key), (false, false));
        for _ in 0..3 {
            assert!(
                key.verify_bytes(b"signed data", &sig, Algorithm::RsaSha256)
                    .is_ok()
            );
            assert!(
                key.verify_bytes(b"other data", &sig, Algorithm::RsaSha256)
                    .is_err()
            );
            assert_eq!(settled(&key), (false, true));
        }
        // The same key read by both: confirmed by the first pass, never refuted.
        let key = parse(theirs(&good), &good).unwrap();
        assert!(
            key.verify_bytes(b"other data", &sig, Algorithm::RsaSha256)
                .is_err()
        );
        assert_eq!(settled(&key), (false, false));
        assert!(
            key.verify_bytes(b"signed data", &sig, Algorithm::RsaSha256)
                .is_ok()
        );
        assert_eq!(settled(&key), (true, false));
    }

    #[test]
    fn records_it_does_not_read() {
        for record in [
            &b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="[..],
            b"v=DKIM1; p=",
            b"v=DKIM1; p=!!!",
            b"v=DKIM1; p=AAAA",
            b"v=DKIM1",
            b"\xff",
        ] {
            assert!(rsa_key(record).is_none_or(|k| {
                ParsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, &k).is_err()
            }));
        }
    }
}
