//! Cluster mode: several real `serve` processes on one real redis-server (`[store] kind =
//! "redis"`), against the fake Google and Gmail. Skipped with a notice when redis-server is not
//! installed, unless XOAUTH2_PROXY_REQUIRE_REDIS=1.

mod cmd;
mod harness;
mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use harness::{config_text_with_limits, ListenerSpec, Proxy, TEST_LIMITS};
use support::redis::RedisServer;
use support::{FakeGoogle, FakeImap, FakeSmtp, SmtpMode, TestClient, TestPki, UpstreamTls};
use xoauth2_proxy::account::AccountKey;
use xoauth2_proxy::secret::Secret;

const ALICE: &str = "alice@gmail.com";
const BOB: &str = "bob@gmail.com";
const CAROL: &str = "carol@gmail.com";

/// One `serve` process of the cluster.
struct Node {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    imap: SocketAddr,
    smtp: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(text: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        let (child, log) = cmd::serve_logging(&config, "info");
        let mut node = Node {
            child,
            log,
            imap: SocketAddr::from(([0, 0, 0, 0], 0)),
            smtp: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            _dir: dir,
        };
        node.imap = node.bound(&["listening", "protocol=\"imap\""]);
        node.smtp = node.bound(&["listening", "protocol=\"smtp\""]);
        node.admin = node.bound(&["admin listener"]);
        node
    }

    fn bound(&self, markers: &[&str]) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log.lock().unwrap().clone();
            if let Some(addr) = cmd::bind_in_log(log.iter().map(String::as_str), markers) {
                return addr;
            }
            assert!(Instant::now() < deadline, "serve did not start: {log:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_lines_with(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Fakes, one Redis, a master key, and the config text every node shares.
struct Cluster {
    google: FakeGoogle,
    _pki: TestPki,
    _imap: FakeImap,
    _smtp: FakeSmtp,
    redis: RedisServer,
    dir: tempfile::TempDir,
    text: String,
}

impl Cluster {
    async fn start(limits: &str) -> Option<Cluster> {
        let redis = RedisServer::start()?;
        let google = FakeGoogle::start().await;
        let pki = TestPki::new();
        let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
        let smtp = FakeSmtp::start(&google, &pki, SmtpMode::StartTls).await;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        std::fs::write(&key, format!("{:064x}\n", rand::random::<u128>())).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let listeners = [
            ListenerSpec::new("imap", imap.addr),
            ListenerSpec::new("smtp", smtp.addr).upstream_tls("starttls"),
        ];
        let mut text =
            config_text_with_limits(&google, &pki, &listeners, &[ALICE, BOB, CAROL], limits);
        text.push_str(&format!(
            "\n[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"test\"\nkey_file = \"{}\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n",
            redis.url(),
            key.display()
        ));
        Some(Cluster {
            google,
            _pki: pki,
            _imap: imap,
            _smtp: smtp,
            redis,
            dir,
            text,
        })
    }

    fn nodes(&self, n: usize) -> Vec<Node> {
        (0..n).map(|_| Node::start(&self.text)).collect()
    }

    /// A config file for CLI commands on the cluster's store.
    fn cli_config(&self) -> PathBuf {
        let path = self.dir.path().join("cli.toml");
        std::fs::write(&path, &self.text).unwrap();
        path
    }

    /// `xoauth2-proxy ARGS -c CONFIG` to completion.
    fn cli(&self, args: &[&str], stdin: Option<&str>) -> cmd::Output {
        let mut argv: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        argv.push("-c".into());
        argv.push(self.cli_config().display().to_string());
        cmd::run_blocking(&argv, stdin, &[])
    }

    /// Import a refresh token the fake knows and add a password, through the CLI.
    fn authorize(&self, email: &str) -> String {
        let refresh = format!("1//refresh-{email}");
        self.google.add_refresh_token(&refresh, email);
        let out = self.cli(&["import", email, "--refresh-token-stdin"], Some(&refresh));
        assert!(out.ok(), "{}", out.stderr);
        let out = self.cli(&["password", "add", email], None);
        assert!(out.ok(), "{}", out.stderr);
        out.stdout.lines().last().unwrap().trim().to_string()
    }
}

/// SMTP AUTH PLAIN through the proxy; the reply code (None: no answer, e.g. the node is gone).
async fn smtp_auth(addr: SocketAddr, email: &str, password: &str) -> Option<u16> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut tcp = tokio::io::BufReader::new(tcp);
    // The code of the next reply (its last line: "NNN " rather than "NNN-").
    async fn reply(tcp: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> Option<u16> {
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(60), tcp.read_line(&mut line));
            if read.await.ok()?.ok()? == 0 {
                return None;
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.get(..3)?.parse().ok();
            }
        }
    }
    reply(&mut tcp).await?;
    tcp.get_mut()
        .write_all(b"EHLO cluster.test\r\n")
        .await
        .ok()?;
    reply(&mut tcp).await?;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{email}\0{password}"));
    let auth = format!("AUTH PLAIN {plain}\r\n");
    tcp.get_mut().write_all(auth.as_bytes()).await.ok()?;
    let code = reply(&mut tcp).await;
    let _ = tcp.get_mut().write_all(b"QUIT\r\n").await;
    code
}

/// An IMAP LOGIN through the proxy; the tagged answer and the client (to keep the session).
async fn imap_login(addr: SocketAddr, email: &str, password: &str) -> (String, TestClient) {
    let mut c = TestClient::connect(addr).await;
    c.read_line().await;
    c.send_line(&format!("a1 LOGIN {email} {password}")).await;
    let answer = c.read_imap_tagged("a1").await.0;
    (answer, c)
}

async fn readyz(addr: SocketAddr) -> (u16, String) {
    let mut c = TestClient::connect(addr).await;
    c.send(format!(
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    let r = c.read_http_response().await;
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_copy_round_trips_three_accounts_between_a_file_and_redis() {
    let Some(cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    // A file store with three accounts, sealed with the key the cluster uses.
    let file_dir = cluster.dir.path().join("file-state");
    let file_config = xoauth2_proxy::config::StoreConfig {
        kind: xoauth2_proxy::config::StoreKind::File,
        key_file: Some(cluster.dir.path().join("master.key")),
    };
    let file_path = file_dir.join("store.enc");
    std::fs::create_dir_all(&file_dir).unwrap();
    std::fs::set_permissions(&file_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let file = xoauth2_proxy::store::Store::open(&file_dir, &file_config).unwrap();
    for email in [ALICE, BOB, CAROL] {
        let key = AccountKey::new(email);
        let token = Secret::new(format!("1//refresh-secret-{email}"));
        xoauth2_proxy::registry::save_refresh_token(&file, &key, &token).unwrap();
        xoauth2_proxy::registry::add_password(&file, &key, "phone").unwrap();
    }
    let file_arg = file_path.display().to_string();
    let out = cluster.cli(&["store", "copy", "--from", &file_arg], None);
    assert!(out.ok(), "{}", out.stderr);
    assert!(out.stdout.contains("Copied 3 account(s)"), "{}", out.stdout);

    // Redis holds ciphertext only; every command reads it.
    let raw = cluster.redis.command("GET test:store").unwrap();
    assert!(!raw.contains("refresh-secret"), "{raw}");
    assert!(!raw.contains("argon2"), "{raw}");
    let out = cluster.cli(&["password", "list", BOB], None);
    assert!(out.ok() && out.stdout.contains("phone"), "{out:?}");
    let out = cluster.cli(&["check"], None);
    let at = format!("the Redis store at {}", cluster.redis.url());
    assert!(out.stdout.contains(&at), "{out:?}");

    let back = cluster.dir.path().join("back.enc");
    let back_arg = back.display().to_string();
    let out = cluster.cli(&["store", "copy", "--to", &back_arg], None);
    assert!(out.ok(), "{}", out.stderr);
    let again = cluster.cli(&["store", "copy", "--to", &back_arg], None);
    assert!(
        !again.ok() && again.stderr.contains("already holds 3"),
        "{again:?}"
    );

    let copied = xoauth2_proxy::store::Store::file_at(&back, &file_dir, &file_config).unwrap();
    let json = |s: &xoauth2_proxy::store::Store| {
        let data = s.load().unwrap().0;
        serde_json::to_value(&data).unwrap()
    };
    assert_eq!(json(&copied), json(&file));
    assert_eq!(json(&copied)["accounts"].as_object().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_redis_lose_no_update() {
    let Some(cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    let config = xoauth2_proxy::config::Config::load(&cluster.cli_config()).unwrap();
    let writers: Vec<_> = (0..16)
        .map(|i| {
            let config = config.clone();
            std::thread::spawn(move || {
                let store =
                    xoauth2_proxy::store::Store::open(&config.state_dir, &config.store).unwrap();
                let key = AccountKey::new(ALICE);
                xoauth2_proxy::registry::add_password(&store, &key, &format!("l{i}")).unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let out = cluster.cli(&["password", "list", ALICE], None);
    assert_eq!(out.stdout.lines().count(), 16, "{}", out.stdout);
}

/// Logins over the nodes, `parallel` at a time, round robin; the SMTP reply codes.
async fn storm(nodes: &[SocketAddr], logins: usize, password: &str) -> Vec<Option<u16>> {
    let password = Arc::new(password.to_string());
    let gate = Arc::new(tokio::sync::Semaphore::new(48));
    let tasks: Vec<_> = (0..logins)
        .map(|i| {
            let (addr, password, gate) = (nodes[i % nodes.len()], password.clone(), gate.clone());
            tokio::spawn(async move {
                let _turn = gate.acquire().await.unwrap();
                smtp_auth(addr, ALICE, &password).await
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes
}

/// Give ALICE an access token that expired in Redis, so the storm starts with a refresh.
async fn expired_token(cluster: &Cluster, node: &Node, password: &str) {
    cluster.google.set_expires_in(1);
    assert_eq!(smtp_auth(node.smtp, ALICE, password).await, Some(235));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.google.set_expires_in(3599);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_1000_logins_over_3_proxies_on_an_expired_token_makes_one_token_request() {
    let Some(cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    let password = cluster.authorize(ALICE);
    let nodes = cluster.nodes(3);
    expired_token(&cluster, &nodes[0], &password).await;
    let before = cluster.google.token_requests();
    let addrs: Vec<_> = nodes.iter().map(|n| n.smtp).collect();
    let codes = storm(&addrs, 1000, &password).await;
    assert!(codes.iter().all(|c| *c == Some(235)), "{codes:?}");
    assert_eq!(cluster.google.token_requests() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_killed_during_the_storm_leaves_the_others_serving() {
    let Some(cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    let password = cluster.authorize(ALICE);
    let mut nodes = cluster.nodes(3);
    expired_token(&cluster, &nodes[0], &password).await;
    let before = cluster.google.token_requests();
    let survivors: Vec<_> = nodes[..2].iter().map(|n| n.smtp).collect();
    let doomed = nodes[2].smtp;
    let storm_on_all = tokio::spawn({
        let password = password.clone();
        async move { storm(&[survivors[0], survivors[1], doomed], 600, &password).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[2].kill9();
    let codes = storm_on_all.await.unwrap();
    for (i, code) in codes.iter().enumerate() {
        if i % 3 != 2 {
            assert_eq!(*code, Some(235), "login {i} on a surviving proxy");
        }
    }
    assert_eq!(cluster.google.token_requests() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_killed_holding_the_refresh_lock_delays_the_others_by_at_most_its_ttl() {
    let Some(cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    let password = cluster.authorize(ALICE);
    let mut nodes = cluster.nodes(2);
    // The first node asks, and hangs on the token endpoint while it holds the lock.
    cluster.google.set_delay(Duration::from_secs(30));
    let doomed = nodes[0].smtp;
    let pw = password.clone();
    let hanging = tokio::spawn(async move { smtp_auth(doomed, ALICE, &pw).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.google.token_requests() == 0 {
        assert!(Instant::now() < deadline, "the first node never asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes[0].kill9();
    let _ = hanging.await;
    cluster.google.set_delay(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(smtp_auth(nodes[1].smtp, ALICE, &password).await, Some(235));
    // The lock's TTL is 10 s; a generous bound above it.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_16th_imap_session_on_any_of_3_proxies_is_refused_with_limit() {
    let limits = format!("{TEST_LIMITS}imap_slot_wait_ms = 300\n");
    let Some(cluster) = Cluster::start(&limits).await else {
        return;
    };
    let password = cluster.authorize(ALICE);
    let mut nodes = cluster.nodes(3);
    let mut held = Vec::new();
    for i in 0..15 {
        let (answer, client) = imap_login(nodes[i % 3].imap, ALICE, &password).await;
        assert!(answer.starts_with("a1 OK"), "session {i}: {answer}");
        held.push(client);
    }
    for node in &nodes {
        let (answer, _) = imap_login(node.imap, ALICE, &password).await;
        assert!(answer.starts_with("a1 NO [LIMIT]"), "{answer}");
    }
    // A session closed on one proxy frees a slot for another.
    let mut first = held.remove(0);
    first.send_line("z LOGOUT").await;
    first.read_imap_tagged("z").await;
    let (answer, client) = imap_login(nodes[2].imap, ALICE, &password).await;
    assert!(answer.starts_with("a1 OK"), "{answer}");
    held.push(client);
    // A proxy killed with 5 sessions: their leases lapse within 60 s.
    nodes[1].kill9();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (answer, client) = imap_login(nodes[0].imap, ALICE, &password).await;
        if answer.starts_with("a1 OK") {
            held.push(client);
            break;
        }
        assert!(answer.starts_with("a1 NO [LIMIT]"), "{answer}");
        assert!(
            Instant::now() < deadline,
            "the killed proxy's sessions were not released"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_removed_through_the_cli_is_refused_on_all_3_proxies_within_1s() {
    let Some(cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    let password = cluster.authorize(ALICE);
    let nodes = cluster.nodes(3);
    for node in &nodes {
        assert_eq!(smtp_auth(node.smtp, ALICE, &password).await, Some(235));
    }
    let out = tokio::task::block_in_place(|| {
        cluster.cli(&["password", "remove", ALICE, "default"], None)
    });
    assert!(out.ok(), "{}", out.stderr);
    let removed = Instant::now();
    for node in &nodes {
        loop {
            if smtp_auth(node.smtp, ALICE, &password).await == Some(535) {
                break;
            }
            assert!(
                removed.elapsed() < Duration::from_secs(1),
                "still accepted after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_during_a_run_keeps_sessions_refuses_new_logins_for_a_while_then_recovers()
{
    let Some(mut cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    let password = cluster.authorize(ALICE);
    let nodes = cluster.nodes(3);
    let (answer, mut open) = imap_login(nodes[0].imap, ALICE, &password).await;
    assert!(answer.starts_with("a1 OK"), "{answer}");

    cluster.redis.kill();
    // Give the listeners a moment to notice the closed connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.send_line("n1 NOOP").await;
    assert!(open.read_imap_tagged("n1").await.0.starts_with("n1 OK"));
    for node in &nodes {
        for _ in 0..3 {
            let (answer, _) = imap_login(node.imap, ALICE, &password).await;
            assert!(answer.starts_with("a1 NO [UNAVAILABLE]"), "{answer}");
        }
        let (status, body) = readyz(node.admin).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("store"), "{body}");
    }

    tokio::task::block_in_place(|| cluster.redis.restart());
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(20);
        while smtp_auth(node.smtp, ALICE, &password).await != Some(235) {
            assert!(Instant::now() < deadline, "no recovery");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(readyz(node.admin).await.0, 200);
        assert_eq!(node.log_lines_with("the Redis store is unreachable"), 1);
        assert_eq!(node.log_lines_with("the Redis store is reachable"), 2);
    }
    open.send_line("n2 NOOP").await;
    assert!(open.read_imap_tagged("n2").await.0.starts_with("n2 OK"));
    // A Redis that lost the session counts (empty after a failover) gets them back from the
    // proxies' renewals: the open session counts again within a renewal period (10 s).
    let set = "test:imap:alice@gmail.com";
    assert!(cluster.redis.command(&format!("DEL {set}")).is_some());
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.redis.command(&format!("ZCARD {set}")).as_deref() != Some(":1\r\n") {
        assert!(
            Instant::now() < deadline,
            "the open session's lease was not renewed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_at_the_imap_cap_waits_for_a_session_that_ends_meanwhile() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let listeners = [ListenerSpec::new("imap", imap.addr)];
    let proxy = Proxy::start(&google, &pki, &listeners, &[ALICE]).await;
    let password = proxy.authorize(&google, ALICE);
    let addr = proxy.addrs[0];
    let mut held = Vec::new();
    for _ in 0..15 {
        let (answer, client) = imap_login(addr, ALICE, &password).await;
        assert!(answer.starts_with("a1 OK"), "{answer}");
        held.push(client);
    }
    // The 16th arrives while all 15 are open, and one ends while it waits (default 2 s).
    let pw = password.clone();
    let waiting = tokio::spawn(async move { imap_login(addr, ALICE, &pw).await.0 });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut leaving = held.remove(0);
    leaving.send_line("z LOGOUT").await;
    leaving.read_imap_tagged("z").await;
    let answer = waiting.await.unwrap();
    assert!(answer.starts_with("a1 OK"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_logins_spread_over_3_proxies_are_counted_and_slowed_together() {
    let Some(cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    let password = cluster.authorize(ALICE);
    let nodes = cluster.nodes(3);
    // Two wrong passwords on each proxy: no proxy alone has seen enough to slow down.
    for node in &nodes {
        for _ in 0..2 {
            assert_eq!(smtp_auth(node.smtp, ALICE, "wrong").await, Some(535));
        }
    }
    assert!(cluster
        .redis
        .command("GET test:fail:acct:alice@gmail.com")
        .unwrap()
        .contains("\r\n6\r\n"));
    // The 7th failure counts as the 7th: its answer waits the 7th's delay (3.2 s), not the
    // 3rd's (0.2 s) that the local count alone would give.
    let started = Instant::now();
    assert_eq!(smtp_auth(nodes[0].smtp, ALICE, "wrong").await, Some(535));
    let waited = started.elapsed();
    assert!(
        waited >= xoauth2_proxy::proxy::throttle::delay_for(7),
        "{waited:?}"
    );
    assert_eq!(smtp_auth(nodes[1].smtp, ALICE, &password).await, Some(235));
}

#[test]
fn the_kubernetes_example_configures_redis_and_the_proxy_protocol() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes.yaml");
    let yaml = std::fs::read_to_string(path).unwrap();
    let toml: String = yaml
        .lines()
        .skip_while(|l| !l.contains("config.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let config = xoauth2_proxy::config::Config::parse(
        &toml,
        std::path::Path::new("/etc/xoauth2-proxy/config.toml"),
    )
    .unwrap();
    assert!(matches!(
        config.store.kind,
        xoauth2_proxy::config::StoreKind::Redis { .. }
    ));
    assert_eq!(config.listeners.len(), 2);
    assert!(config
        .listeners
        .iter()
        .all(|l| l.proxy_protocol && !l.trusted_proxies.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_token_gmail_rejects_is_replaced_once_for_every_proxy() {
    let Some(cluster) = Cluster::start(TEST_LIMITS).await else {
        return;
    };
    let password = cluster.authorize(ALICE);
    let nodes = cluster.nodes(2);
    for node in &nodes {
        assert_eq!(smtp_auth(node.smtp, ALICE, &password).await, Some(235));
    }
    let before = cluster.google.token_requests();
    cluster.google.invalidate_access_tokens();
    for node in &nodes {
        assert_eq!(smtp_auth(node.smtp, ALICE, &password).await, Some(235));
    }
    assert_eq!(cluster.google.token_requests() - before, 1);
}
