//! An account's identity. Clients, the config and the store spell emails in many ways
//! (`Alice@Gmail.com `); an [`AccountKey`] is the one normalized form, made once where a name
//! enters the program, and every lookup and store key uses it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The normalized email that identifies an account: trimmed, ASCII-lowercased.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountKey(String);

impl AccountKey {
    pub fn new(email: &str) -> AccountKey {
        AccountKey(email.trim().to_ascii_lowercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountKey({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_email_are_one_key() {
        assert_eq!(
            AccountKey::new(" Alice@Gmail.COM\t"),
            AccountKey::new("alice@gmail.com")
        );
        assert_eq!(
            AccountKey::new("Alice@Gmail.com").as_str(),
            "alice@gmail.com"
        );
        assert_eq!(
            serde_json::to_string(&AccountKey::new("A@x.com")).unwrap(),
            "\"a@x.com\""
        );
    }
}
