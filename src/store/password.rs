//! Local app passwords: generated here, shown once, stored only as salted Argon2id hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::Rng;

use crate::secret::Secret;

/// No 0/O/1/l/I: people type these passwords into old clients.
const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
const LENGTH: usize = 24;

/// A fresh random password (about 140 bits).
pub fn generate() -> Secret {
    let mut rng = rand::rngs::OsRng;
    let s: String = (0..LENGTH)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    Secret::new(s)
}

/// Argon2id (library defaults: 19 MiB, 2 passes) PHC string with a random salt.
pub fn hash(password: &Secret) -> Result<String, String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing password: {e}"))
}

/// Constant-time check of `password` against a stored PHC string; false on any malformed hash.
pub fn verify(password: &[u8], phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_password_verifies_against_its_hash_only() {
        let p = generate();
        assert_eq!(p.expose().len(), LENGTH);
        let h = hash(&p).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains(p.expose()));
        assert!(verify(p.expose().as_bytes(), &h));
        assert!(!verify(b"wrong", &h));
        assert!(!verify(p.expose().as_bytes(), "garbage"));
        assert_ne!(generate().expose(), p.expose());
    }
}
