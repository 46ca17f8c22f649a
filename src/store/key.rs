//! The master key and the sealing every store backend uses: XChaCha20-Poly1305 with a random
//! nonce, the record's magic as associated data. The key comes from `master.key` in the state
//! dir, a configured key file, or the OS keyring; no backend ever writes it anywhere.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::Zeroizing;

use super::{check_private, io_err, StoreError};

const NONCE_LEN: usize = 24;

/// The store's master key. `Debug` shows nothing of it; it is wiped on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

/// Why sealed bytes could not be opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Unsealed {
    /// Not a record of this kind (wrong magic, too short).
    Format,
    /// The key does not fit, or the bytes were changed.
    Decrypt,
}

impl MasterKey {
    pub(crate) fn from_bytes(key: Zeroizing<[u8; 32]>) -> MasterKey {
        MasterKey(key)
    }

    /// `magic` ‖ nonce ‖ ciphertext of `plain`, authenticated together with `magic`.
    pub fn seal(&self, magic: &[u8; 8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = XChaCha20Poly1305::new(self.0.as_ref().into());
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: magic,
                },
            )
            .map_err(|_| StoreError::Other("encryption failed".into()))?;
        let mut out = Vec::with_capacity(magic.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(magic);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plaintext of bytes made by [`MasterKey::seal`] with the same magic.
    pub fn open(&self, magic: &[u8; 8], bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>, Unsealed> {
        if bytes.len() < magic.len() + NONCE_LEN || &bytes[..magic.len()] != magic {
            return Err(Unsealed::Format);
        }
        let nonce = &bytes[magic.len()..magic.len() + NONCE_LEN];
        let cipher = XChaCha20Poly1305::new(self.0.as_ref().into());
        cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: &bytes[magic.len() + NONCE_LEN..],
                    aad: magic,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| Unsealed::Decrypt)
    }
}

pub(crate) fn parse_key(path: &Path, bytes: &[u8]) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let text = std::str::from_utf8(bytes).unwrap_or("").trim();
    let mut key = Zeroizing::new([0u8; 32]);
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).unwrap_or("00");
            key[i] = u8::from_str_radix(hex, 16).unwrap_or(0);
        }
        Ok(key)
    } else if bytes.len() == 32 {
        key.copy_from_slice(bytes);
        Ok(key)
    } else {
        Err(StoreError::Key(format!(
            "{} is not a master key (expected 64 hex characters)",
            path.display()
        )))
    }
}

pub(crate) fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    check_private(path, &meta)?;
    let mut bytes = Zeroizing::new(Vec::new());
    f.read_to_end(&mut bytes).map_err(io_err(path))?;
    parse_key(path, &bytes)
}

pub(crate) fn load_or_create_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    match read_key_file(path) {
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(key.as_mut());
    let hex: Zeroizing<String> = Zeroizing::new(key.iter().map(|b| format!("{b:02x}")).collect());
    // create_new: if another process won the race, use its key instead of ours.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(format!("{}\n", hex.as_str()).as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(io_err(path))?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key_file(path),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_only_with_the_same_key_and_magic() {
        let key = MasterKey::from_bytes(Zeroizing::new([7u8; 32]));
        let sealed = key.seal(b"XO2PTEST", b"refresh-secret").unwrap();
        assert!(!sealed.windows(14).any(|w| w == b"refresh-secret"));
        assert_eq!(
            key.open(b"XO2PTEST", &sealed).unwrap().as_slice(),
            b"refresh-secret"
        );
        assert_eq!(key.open(b"XO2POTHR", &sealed), Err(Unsealed::Format));
        let other = MasterKey::from_bytes(Zeroizing::new([8u8; 32]));
        assert_eq!(other.open(b"XO2PTEST", &sealed), Err(Unsealed::Decrypt));
        assert_eq!(format!("{key:?}"), "MasterKey([redacted])");
    }
}
