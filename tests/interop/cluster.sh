# Cluster phase of the interop test, sourced by run.sh once Dovecot, the fake Google and the
# first proxy (with its file store) are up: three `serve` replicas share one redis-server
# ([store] kind = "redis", the file store copied in with `store copy --from`), behind HAProxy in
# TCP mode with `send-proxy-v2`, in front of the real Dovecot. cluster_smtp.py sends 200
# messages through HAProxy, kills one replica with SIGKILL on the way, and checks every message
# arrived exactly once, byte-identical.

say "cluster: 3 replicas on one Redis behind HAProxy (send-proxy-v2)"
missing=()
for p in redis-server haproxy; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "cluster: apt-get install ${missing[*]} failed"
fi

C=$T/cluster
mkdir -p "$C/redis"
# Ports after the main block: Redis, HAProxy, three replicas.
read -r P_REDIS P_HA P_R1 P_R2 P_R3 < <(python3 - "$((BASE + 20))" <<'EOF'
import socket, sys
found, port = [], int(sys.argv[1])
while len(found) < 5 and port < 65000:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        found.append(port)
    except OSError:
        pass
    finally:
        s.close()
    port += 1
print(*found)
EOF
)
[ -n "${P_R3:-}" ] || die "cluster: no free ports after $((BASE + 20))"

redis-server --bind 127.0.0.1 --port "$P_REDIS" --dir "$C/redis" --save "" --appendonly yes \
    --daemonize no </dev/null >"$C/redis.log" 2>&1 &
PIDS_FG="$PIDS_FG $!"
wait_port 127.0.0.1 "$P_REDIS" 10 || die "cluster: redis-server did not start: $(tail -3 "$C/redis.log")"

replica_config() { # n port
    cat <<EOF
state_dir = "$C/r$1"

[providers.google]
client_id = "$CLIENT_ID"
client_secret = "$CLIENT_SECRET"
token_url = "http://127.0.0.1:$P_FG/token"

[store]
kind = "redis"
url = "redis://127.0.0.1:$P_REDIS/0"
prefix = "interop"
key_file = "$P/state/master.key"

[limits]
upstream_timeout_secs = 10
shutdown_grace_secs = 2

[[listener]]
protocol = "smtp"
bind = "127.0.0.1:$2"
local_tls = "none"
upstream = "127.0.0.2:$P_DV_SUBS"
upstream_tls = "implicit"
upstream_ca = "$T/pki/ca.pem"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]

[[account]]
email = "$USER_EMAIL"
EOF
}
i=0
for port in $P_R1 $P_R2 $P_R3; do
    i=$((i + 1))
    replica_config "$i" "$port" >"$C/r$i.toml"
done

out=$("$BIN" store copy --from "$P/state/store.enc" -c "$C/r1.toml" 2>&1) &&
    pass "cluster: store copy --from moves the file store into Redis ($out)" ||
    die "cluster: store copy --from failed: $out"
redis_has_plaintext=$(python3 - "$P_REDIS" "$APP_PASSWORD" "$REFRESH_TOKEN" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"GET interop:store\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    data += chunk
    head = data.find(b"\r\n")
    if not chunk or (head > 0 and len(data) >= head + 2 + int(data[1:head]) + 2):
        break
print(len(data), any(x.encode() in data for x in sys.argv[2:] + ["argon2"]))
EOF
)
[[ $redis_has_plaintext == *" False" ]] &&
    pass "cluster: Redis holds the store sealed (${redis_has_plaintext% *} bytes, no password, hash or refresh token)" ||
    fail "cluster: Redis store in the clear or missing: $redis_has_plaintext"

REPLICA_PIDS=()
i=0
for port in $P_R1 $P_R2 $P_R3; do
    i=$((i + 1))
    "$BIN" serve -c "$C/r$i.toml" </dev/null >/dev/null 2>"$C/r$i.log" &
    REPLICA_PIDS+=($!)
    PIDS_FG="$PIDS_FG $!"
done
ok=1
i=0
for port in $P_R1 $P_R2 $P_R3; do
    i=$((i + 1))
    for _ in $(seq 150); do
        grep -q "listening.*bind=127.0.0.1:$port\b" "$C/r$i.log" 2>/dev/null && break
        sleep 0.1
    done
    grep -q "listening.*bind=127.0.0.1:$port\b" "$C/r$i.log" || ok=
done
[ -n "$ok" ] && pass "cluster: 3 replicas serving on one Redis" ||
    die "cluster: replicas did not come up: $(tail -3 "$C"/r*.log)"

cat >"$C/haproxy.cfg" <<EOF
global
    maxconn 512

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch

frontend smtp
    bind 127.0.0.1:$P_HA
    default_backend replicas

backend replicas
    balance roundrobin
    server r1 127.0.0.1:$P_R1 send-proxy-v2 check inter 300 fall 1 rise 2
    server r2 127.0.0.1:$P_R2 send-proxy-v2 check inter 300 fall 1 rise 2
    server r3 127.0.0.1:$P_R3 send-proxy-v2 check inter 300 fall 1 rise 2
EOF
haproxy -c -f "$C/haproxy.cfg" >"$C/haproxy-check.log" 2>&1 ||
    die "cluster: haproxy rejects its config: $(tail -3 "$C/haproxy-check.log")"
haproxy -db -f "$C/haproxy.cfg" </dev/null >"$C/haproxy.log" 2>&1 &
PIDS_FG="$PIDS_FG $!"
wait_port 127.0.0.1 "$P_HA" 10 || die "cluster: haproxy did not start: $(tail -3 "$C/haproxy.log")"
pass "cluster: HAProxy $(haproxy -v | head -1 | cut -d' ' -f3) in TCP mode with send-proxy-v2 in front"

while IFS= read -r line; do
    case $line in
    "PASS: "*) PASSED=$((PASSED + 1)); echo "$line" ;;
    "FAIL: "*) FAILED=$((FAILED + 1)); echo "$line" ;;
    "cluster_smtp.py exit 0") ;;
    "cluster_smtp.py exit "*) FAILED=$((FAILED + 1)); echo "FAIL: ${line} (crashed or timed out; see above)" ;;
    *) echo "   $line" ;;
    esac
done < <(timeout 300 python3 "$HERE/cluster_smtp.py" "$T/env.json" "$P_HA" "${REPLICA_PIDS[1]}" \
    "$C/r1.log" "$C/r2.log" "$C/r3.log" 2>&1; echo "cluster_smtp.py exit $?")
