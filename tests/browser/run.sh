#!/usr/bin/env bash
# The admin status page in a real headless Chromium: see page.py. Installs chromium,
# chromium-driver (Debian) and selenium (PyPI) when missing (as root), builds the proxy,
# runs it with a loopback admin listener, and drives the page. Screenshots land in
# target/screenshots/ (BROWSER_SHOTS=DIR to put them elsewhere).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python3 -c "import selenium" 2>/dev/null || pip install -q selenium
(cd "$ROOT" && cargo build --quiet --bin xoauth2-proxy)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/xoauth2-proxy
SHOTS=${BROWSER_SHOTS:-$ROOT/target/screenshots}
mkdir -p "$SHOTS"
WORK=$(mktemp -d)
PID=
GPID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null
    [ -n "$GPID" ] && kill "$GPID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
# The interop runner's fake Google: token endpoint and simulated consent.
GPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 "$ROOT/tests/interop/fake_google.py" --port "$GPORT" --client-id browser-test \
    --client-secret browser-test --refresh-token "1//alice=alice@gmail.com" >"$WORK/google.log" 2>&1 &
GPID=$!
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$GPORT/health" >/dev/null 2>&1 && break
    sleep 0.1
done
cat > "$WORK/config.toml" <<CONF
state_dir = "state"
[[listener]]
protocol = "imap"
bind = "127.0.0.1:0"
upstream = "127.0.0.1:9"
[providers.google]
client_id = "browser-test"
client_secret = "browser-test"
token_url = "http://127.0.0.1:$GPORT/token"
auth_url = "http://127.0.0.1:$GPORT/auth"
[[account]]
email = "alice@gmail.com"
[[account]]
email = "bob@example.org"
[admin]
bind = "127.0.0.1:0"
CONF
PASSWORD=$("$BIN" password add alice@gmail.com -c "$WORK/config.toml" --label laptop | tail -n 1)
# Alice was authorized once; then Google revoked the grant.
echo "1//alice" | "$BIN" import alice@gmail.com -c "$WORK/config.toml" --refresh-token-stdin >/dev/null
curl -sf -X POST "http://127.0.0.1:$GPORT/control/revoke" >/dev/null
"$BIN" serve -c "$WORK/config.toml" >"$WORK/serve.log" 2>&1 &
PID=$!
bind_of() { grep "$1" "$WORK/serve.log" | sed -n 's/.*bind=\([0-9.:]*\).*/\1/p' | head -1; }
for _ in $(seq 100); do
    [ -n "$(bind_of 'admin listener')" ] && [ -n "$(bind_of 'listening')" ] && break
    sleep 0.1
done
ADMIN=$(bind_of 'admin listener')
IMAP=$(bind_of 'listening')
[ -n "$ADMIN" ] && [ -n "$IMAP" ] || { cat "$WORK/serve.log"; echo "serve did not start" >&2; exit 1; }
python3 "$HERE/page.py" "http://$ADMIN" "${IMAP%:*}" "${IMAP##*:}" "$SHOTS" "$PASSWORD"
