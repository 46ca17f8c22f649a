//! Login overhead of the Redis store: a second proxy process on the same upstream with
//! `[store] kind = "redis"` (a private redis-server), warm, against the file-store proxy;
//! IMAP logins alternate between the two and the p50s are compared. Skipped (with a note)
//! when redis-server is not installed.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{login, Proto, Route};
use crate::support::redis::RedisServer;
use crate::support::TestPki;
use crate::{authorize, config_text, free_ports, ms, percentile, progress, Env, ProxyProcess};
use crate::{round, BENCH_USER};

/// The proxy on Redis, its store's server, and the bench account's password there.
struct RedisProxy {
    proxy: ProxyProcess,
    _redis: RedisServer,
    password: String,
    _dir: tempfile::TempDir,
}

async fn start(env: &Env, pki: &TestPki) -> Result<Option<RedisProxy>, String> {
    let Some(redis) = RedisServer::start() else {
        return Ok(None);
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let key = dir.path().join("master.key");
    write_key(&key)?;
    let addrs = free_ports()?;
    let mut text = config_text(&env.google, pki, &env.upstream, addrs);
    text.push_str(&format!(
        "\n[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"bench\"\nkey_file = \"{}\"\n",
        redis.url(),
        key.display()
    ));
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    let password = authorize(&config, &env.google, BENCH_USER)?;
    let mut proxy = ProxyProcess::start(dir.path(), &config, addrs)?;
    proxy.ready().await?;
    Ok(Some(RedisProxy {
        proxy,
        _redis: redis,
        password,
        _dir: dir,
    }))
}

fn write_key(path: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let hex: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn timed(route: &Route) -> Result<Duration, String> {
    let t = Instant::now();
    let c = login(Proto::Imap, route, BENCH_USER, 1024)
        .await
        .map_err(|e| format!("login failed: {e}"))?;
    let took = t.elapsed();
    drop(c);
    Ok(took)
}

/// IMAP login p50/p99 through the file-store proxy and the Redis-store proxy, interleaved.
pub async fn phase(env: &Env, pki: &TestPki, samples: usize) -> Result<Value, String> {
    progress(&format!("redis store: {samples} logins per store"));
    let Some(on_redis) = start(env, pki).await? else {
        return Ok(json!({"skipped": "redis-server is not installed"}));
    };
    let file = env.route(Proto::Imap, true);
    let redis = Route::Proxied {
        addr: on_redis.proxy.imap,
        password: on_redis.password.clone(),
    };
    // Warm: password cache, access token, connections to Redis.
    for _ in 0..20 {
        timed(&file).await?;
        timed(&redis).await?;
    }
    let (mut f, mut r) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for i in 0..samples {
        if i % 2 == 0 {
            f.push(timed(&file).await?);
            r.push(timed(&redis).await?);
        } else {
            r.push(timed(&redis).await?);
            f.push(timed(&file).await?);
        }
    }
    f.sort();
    r.sort();
    let diff = |a: Duration, b: Duration| round((a.as_secs_f64() - b.as_secs_f64()) * 1e3, 3);
    let (f50, r50) = (percentile(&f, 50.0), percentile(&r, 50.0));
    let (f99, r99) = (percentile(&f, 99.0), percentile(&r, 99.0));
    Ok(json!({
        "samples": samples,
        "file_p50_ms": ms(f50),
        "redis_p50_ms": ms(r50),
        "overhead_p50_ms": diff(r50, f50),
        "file_p99_ms": ms(f99),
        "redis_p99_ms": ms(r99),
        "overhead_p99_ms": diff(r99, f99),
    }))
}

/// The table rows.
pub fn render(out: &mut String, r: &Value) {
    use std::fmt::Write as _;
    if r.is_null() {
        return;
    }
    if let Some(why) = r["skipped"].as_str() {
        let _ = writeln!(out, "\n2b. login with the Redis store: skipped ({why})");
        return;
    }
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        out,
        "\n{:<36} {:>10} {:>10} {:>9}  {:<9} met",
        "2b. IMAP login, Redis vs file store", "file", "redis", "overhead", "target"
    );
    for (p, limit) in [("p50", Some(0.5)), ("p99", None)] {
        let over = f(&r[format!("overhead_{p}_ms")]);
        let _ = writeln!(
            out,
            "{:<36} {:>10.3} {:>10.3} {over:>9.3}  {:<9} {}",
            format!("   {p} (ms, {} logins each, warm)", r["samples"]),
            f(&r[format!("file_{p}_ms")]),
            f(&r[format!("redis_{p}_ms")]),
            limit.map(|l| format!("<= {l}")).unwrap_or_default(),
            match limit {
                Some(l) if over <= l => "yes",
                Some(_) => "NO",
                None => "",
            }
        );
    }
}
