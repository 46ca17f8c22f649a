//! A real `redis-server` (the Debian package) on a free loopback port, with its data in a temp
//! dir and an append-only file, so a restart keeps what was written. Tests that need one skip
//! with a notice when it is not installed, unless `XOAUTH2_PROXY_REQUIRE_REDIS=1` (CI) makes
//! its absence a failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl RedisServer {
    /// A running server, or None (after a printed notice) when redis-server is missing and
    /// not required.
    pub fn start() -> Option<RedisServer> {
        if !installed() {
            let required = std::env::var("XOAUTH2_PROXY_REQUIRE_REDIS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "redis-server is not installed and XOAUTH2_PROXY_REQUIRE_REDIS=1"
            );
            eprintln!(
                "NOTICE: skipping: redis-server is not installed (apt-get install redis-server)"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let mut server = RedisServer {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: tempfile::tempdir().unwrap(),
        };
        server.run();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        self.command("PING").is_some_and(|r| r.starts_with("+PONG"))
    }

    /// One inline command's raw answer (for tests that look at what Redis holds).
    pub fn command(&self, line: &str) -> Option<String> {
        let mut tcp = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        tcp.write_all(format!("{line}\r\n").as_bytes()).ok()?;
        let mut buf = vec![0u8; 1 << 20];
        let n = tcp.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Kill the server at once (like a crash); its data stays in the append-only file.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
