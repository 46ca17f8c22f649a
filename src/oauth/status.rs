//! What a running `serve` knows about its access tokens, written to `state_dir/status.json` so
//! `accounts` in another process can show it. Nothing secret: expiry times, the last refresh's
//! outcome in words, and the writer's process id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const STATUS_FILE: &str = "status.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The `serve` process that wrote this.
    pub pid: u32,
    /// Unix seconds of the write.
    pub updated_at: i64,
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountStatus {
    /// Unix seconds when the cached access token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<i64>,
    /// Unix seconds of the last token request, whatever its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_at: Option<i64>,
    /// The last token request's failure in words; None after a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATUS_FILE)
}

/// Write atomically (readers never see half a file); failures are only logged: the status is
/// a convenience, never a reason to fail a login.
pub fn write(state_dir: &Path, status: &Status) {
    let result = serde_json::to_vec_pretty(status)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            crate::store::write_atomic(&path(state_dir), &bytes).map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot write the token status file");
    }
}

/// The status a running `serve` left, if that process is still alive.
pub fn read_live(state_dir: &Path) -> Option<Status> {
    let bytes = std::fs::read(path(state_dir)).ok()?;
    let status: Status = serde_json::from_slice(&bytes).ok()?;
    process_alive(status.pid).then_some(status)
}

fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_dir = Path::new("/proc");
    if proc_dir.join("self").exists() {
        proc_dir.join(pid.to_string()).exists()
    } else {
        // No procfs (macOS): trust the file; its timestamps are shown with it.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_of_a_dead_process_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let mut status = Status {
            pid: std::process::id(),
            updated_at: 1,
            ..Default::default()
        };
        status.accounts.insert(
            "a@x.com".into(),
            AccountStatus {
                access_token_expires_at: Some(5),
                ..Default::default()
            },
        );
        write(tmp.path(), &status);
        assert_eq!(read_live(tmp.path()), Some(status.clone()));
        if Path::new("/proc/self").exists() {
            status.pid = u32::MAX - 1;
            write(tmp.path(), &status);
            assert_eq!(read_live(tmp.path()), None);
        }
    }
}
