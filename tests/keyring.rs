//! `store.kind = "keyring"` against a real Secret Service. CI runs this file inside
//! `dbus-run-session` with an unlocked gnome-keyring and XOAUTH2_PROXY_TEST_KEYRING=1 (see
//! .ci/run); a plain `cargo test` without a session bus skips the Secret Service test and still
//! checks the error a user without a keyring gets.

mod cmd;
mod support;

use std::path::Path;

use xoauth2_proxy::store::os_keyring;

const ALICE: &str = "alice@gmail.com";
const CONFIG: &str =
    "state_dir = \"state\"\n\n[store]\nkind = \"keyring\"\n\n[[account]]\nemail = \"alice@gmail.com\"\n";

fn secret_service_expected() -> bool {
    if std::env::var_os("XOAUTH2_PROXY_TEST_KEYRING").is_some() {
        return true;
    }
    if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none() {
        eprintln!("skipped: no session D-Bus (CI runs this with XOAUTH2_PROXY_TEST_KEYRING=1)");
    } else {
        eprintln!("skipped: set XOAUTH2_PROXY_TEST_KEYRING=1 to use this session's keyring");
    }
    false
}

fn args(config: &Path, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.push("-c".into());
    v.push(config.display().to_string());
    v
}

/// Removes the keyring entry of a state dir when the test ends, however it ends.
struct Forget(std::path::PathBuf);

impl Drop for Forget {
    fn drop(&mut self) {
        if let Ok(entry) =
            keyring::Entry::new(os_keyring::SERVICE, &os_keyring::entry_user(&self.0))
        {
            let _ = entry.delete_credential();
        }
    }
}

#[test]
fn master_key_lives_in_the_secret_service_and_first_users_agree_on_it() {
    if !secret_service_expected() {
        return;
    }
    let cfg = cmd::ConfigDir::from_text(CONFIG);
    let state = cfg.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let _forget = Forget(state.clone());
    // Four processes open the new store at once: one creates the key, all use it.
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let a = args(
                &cfg.path,
                &["password", "add", ALICE, "--label", &format!("c{i}")],
            );
            std::thread::spawn(move || cmd::run_blocking(&a, None, &[]))
        })
        .collect();
    for run in runs {
        let out = run.join().unwrap();
        assert!(out.ok(), "{out:?}");
    }
    assert!(!state.join("master.key").exists(), "no key on disk");
    assert!(state.join("store.enc").exists());
    let list = cmd::run_blocking(&args(&cfg.path, &["password", "list", ALICE]), None, &[]);
    assert!(list.ok(), "{list:?}");
    for i in 0..4 {
        assert!(list.stdout.contains(&format!("c{i}\t")), "{}", list.stdout);
    }
    let entry = keyring::Entry::new(os_keyring::SERVICE, &os_keyring::entry_user(&state)).unwrap();
    let key = entry.get_password().unwrap();
    assert_eq!(key.len(), 64);
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn keyring_store_without_a_reachable_keyring_names_the_alternatives() {
    let cfg = cmd::ConfigDir::from_text(CONFIG);
    let out = cmd::run_blocking(
        &args(&cfg.path, &["password", "add", ALICE]),
        None,
        &[("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("no OS keyring is reachable"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("store.kind = \"file\""),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("store.key_file"), "{}", out.stderr);
    assert!(!cfg.state_dir().join("store.enc").exists());
}
