//! `store.kind = "keyring"`: the store's master key lives in the OS keyring (Secret Service on
//! Linux and BSD, Keychain on macOS, Credential Manager on Windows) instead of `master.key`,
//! one entry per state directory. Created on first use under the store lock, so two processes
//! starting at once agree on one key.

use std::path::Path;

use rand::RngCore;
use zeroize::Zeroizing;

use super::key::parse_key;
use super::StoreError;

/// The keyring entry's service name.
pub const SERVICE: &str = "xoauth2-proxy";

/// The keyring entry's user name for the store in `dir`.
pub fn entry_user(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    format!("master key of {}", dir.display())
}

/// The master key for the store in `dir`, creating it if this is the store's first use.
/// The caller holds the store lock.
pub fn load_or_create(dir: &Path) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let entry =
        keyring::Entry::new(SERVICE, &entry_user(dir)).map_err(|e| keyring_error(dir, e))?;
    key_from_entry(&entry, dir)
}

pub(crate) fn key_from_entry(
    entry: &keyring::Entry,
    dir: &Path,
) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    match entry.get_password() {
        Ok(text) => {
            let text = Zeroizing::new(text);
            return parse_key(Path::new("the OS keyring entry"), text.as_bytes()).map_err(|_| {
                StoreError::Key(format!(
                    "the OS keyring entry \"{SERVICE}\" / \"{}\" does not hold a master key of this program; remove it (e.g. with seahorse or `secret-tool clear service {SERVICE}`) only if {} holds no store.enc you need",
                    entry_user(dir),
                    dir.display()
                ))
            });
        }
        Err(keyring::Error::NoEntry) => {}
        Err(e) => return Err(keyring_error(dir, e)),
    }
    let store_file = dir.join(super::file::STORE_FILE);
    if store_file.exists() {
        let hint = if dir.join(super::KEY_FILE).exists() {
            format!(
                "{} exists, so the store was made with store.kind = \"file\": set kind = \"file\" again",
                dir.join(super::KEY_FILE).display()
            )
        } else {
            "the keyring was reset or this is another user's keyring".to_string()
        };
        return Err(StoreError::Key(format!(
            "the OS keyring has no master key for {}, but {} exists and needs one ({hint}); a new key would not open it",
            dir.display(),
            store_file.display()
        )));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(key.as_mut());
    let hex: Zeroizing<String> = Zeroizing::new(key.iter().map(|b| format!("{b:02x}")).collect());
    entry
        .set_password(&hex)
        .map_err(|e| keyring_error(dir, e))?;
    // Some keyrings accept a write and keep nothing; find out now, not after storing secrets.
    match entry.get_password().map(Zeroizing::new) {
        Ok(back) if back.as_str() == hex.as_str() => Ok(key),
        Ok(_) => Err(StoreError::Key(
            "the OS keyring returned a different key than was just stored in it; use store.kind = \"file\" or store.key_file".into(),
        )),
        Err(e) => Err(keyring_error(dir, e)),
    }
}

fn keyring_error(dir: &Path, e: keyring::Error) -> StoreError {
    let alternative = format!(
        "or use store.kind = \"file\" (key in {}) or store.key_file = PATH (a key file, e.g. a systemd credential)",
        dir.join(super::KEY_FILE).display()
    );
    StoreError::Key(match e {
        keyring::Error::NoStorageAccess(why) | keyring::Error::PlatformFailure(why) => format!(
            "store.kind = \"keyring\" but no OS keyring is reachable ({why}). On Linux a Secret Service (GNOME Keyring, KWallet, KeePassXC) must run, unlocked, on the session D-Bus (DBUS_SESSION_BUS_ADDRESS); start one, {alternative}"
        ),
        other => format!("the OS keyring failed: {other}; {alternative}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyring::mock::MockCredential;

    fn mock_entry() -> keyring::Entry {
        keyring::Entry::new_with_credential(Box::new(MockCredential::default()))
    }

    #[test]
    fn first_use_creates_a_key_that_later_opens_find_again() {
        let tmp = tempfile::tempdir().unwrap();
        let entry = mock_entry();
        let first = key_from_entry(&entry, tmp.path()).unwrap();
        let again = key_from_entry(&entry, tmp.path()).unwrap();
        assert_eq!(*first, *again);
        assert_eq!(entry.get_password().unwrap().len(), 64);
    }

    #[test]
    fn unreachable_keyring_is_explained_with_the_alternatives() {
        let tmp = tempfile::tempdir().unwrap();
        let entry = mock_entry();
        let mock: &MockCredential = entry.get_credential().downcast_ref().unwrap();
        mock.set_error(keyring::Error::NoStorageAccess("no D-Bus session".into()));
        let err = key_from_entry(&entry, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("no OS keyring is reachable"), "{err}");
        assert!(err.contains("no D-Bus session"), "{err}");
        assert!(err.contains("store.kind = \"file\""), "{err}");
        assert!(err.contains("store.key_file"), "{err}");
    }

    #[test]
    fn a_missing_key_is_not_replaced_when_a_store_needs_the_old_one() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(super::super::file::STORE_FILE), b"x").unwrap();
        let entry = mock_entry();
        let err = key_from_entry(&entry, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("a new key would not open it"), "{err}");
        assert!(matches!(entry.get_password(), Err(keyring::Error::NoEntry)));
    }

    #[test]
    fn foreign_keyring_content_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let entry = mock_entry();
        entry.set_password("hunter2").unwrap();
        let err = key_from_entry(&entry, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("does not hold a master key"), "{err}");
        assert!(!err.contains("hunter2"));
    }
}
