//! SMTP AUTH credentials: a `users_file` of `user:argon2-hash` lines (PHC strings, as written by
//! `ringmx hash-password`). Verification is deliberately slow (argon2), so the runtime runs it
//! on the blocking pool, never on a core's reactor.

use std::collections::HashMap;
use std::path::Path;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// The users allowed to authenticate.
#[derive(Debug, Clone, Default)]
pub struct Users {
    hashes: HashMap<String, String>,
    /// Verified against for unknown users, so they cost the same time as known ones.
    dummy: String,
}

impl Users {
    /// Read `path`; errors name the file and line.
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Users::parse(&text).map_err(|(line, e)| format!("{}:{line}: {e}", path.display()))
    }

    /// Parse `user:hash` lines (blank lines and `#` comments ignored).
    pub fn parse(text: &str) -> Result<Users, (usize, String)> {
        let mut hashes = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err((i + 1, "expected user:argon2-hash".into()));
            };
            PasswordHash::new(hash)
                .map_err(|e| (i + 1, format!("user {user:?}: not an argon2 PHC hash: {e}")))?;
            if hashes.insert(user.to_string(), hash.to_string()).is_some() {
                return Err((i + 1, format!("user {user:?} is listed twice")));
            }
        }
        let dummy = hash_password("no such user").map_err(|e| (0, e))?;
        Ok(Users { hashes, dummy })
    }

    /// Whether `password` is right for `user`. Unknown users cost a verification too, so timing
    /// does not tell which user names exist.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.hashes.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.dummy.as_str(), false),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && known
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// No users.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// An argon2id PHC hash of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| format!("reading /dev/urandom: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        let users = Users::parse(&format!("# users\nalice:{h}\n")).unwrap();
        assert!(users.verify("alice", "s3cret"));
        assert!(!users.verify("alice", "wrong"));
        assert!(!users.verify("bob", "s3cret"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        assert_eq!(Users::parse("\nalice\n").unwrap_err().0, 2);
        assert_eq!(Users::parse("alice:plaintext\n").unwrap_err().0, 1);
    }
}
