#!/usr/bin/env bash
# Interop test: the real xoauth2-proxy binary between real mail clients (curl, Python's
# imaplib/smtplib/poplib) and a real Dovecot that validates OAuth bearer tokens by RFC 7662
# introspection against a fake Google token endpoint. See tests/interop/README.md.
#
#   sudo bash tests/interop/run.sh        (root: installs missing Debian packages)
#
# Environment:
#   INTEROP_PROFILE=release   build and test target/release (default: debug, the fast build)
#   XOAUTH2_PROXY_BIN=PATH    test this binary, skip the cargo build
#   INTEROP_KEEP=1            keep the temp dir (configs, logs) even when everything passed
#   INTEROP_PORT_BASE=N       first port to try (default 24100); 20 consecutive free ports used
#   INTEROP_ONLY=recipes      run only the README's client recipes (recipes.py), not checks.py
#
# Prints one line per check and closes with `N passed, M failed`; exits 1 if any failed.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
T0=$(date +%s)

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
say() { echo "== $*"; }
die() {
    fail "$*"
    exit 1 # the EXIT trap stops everything and prints the closing line
}

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------
if [ "$(id -u)" != 0 ]; then
    echo "run as root: installs packages and runs Dovecot as root (mail user uid 5000)" >&2
    exit 1
fi
say "packages"
missing=()
# The clients of the README's recipes come from Debian too (recipes.py runs them).
for p in dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond dovecot-lmtpd curl openssl python3 \
    thunderbird libnss3-tools fetchmail getmail6 mutt neomutt msmtp php-cli libphp-phpmailer; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null &&
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        {
            echo "apt-get install failed" >&2
            exit 1
        }
fi
for c in dovecot doveadm curl openssl python3; do
    command -v "$c" >/dev/null || {
        echo "missing command $c" >&2
        exit 1
    }
done
T_PKG=$(date +%s)

# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
PROFILE=${INTEROP_PROFILE:-debug}
if [ -n "${XOAUTH2_PROXY_BIN:-}" ]; then
    BIN=$XOAUTH2_PROXY_BIN
else
    say "cargo build ($PROFILE)"
    flag=()
    [ "$PROFILE" = release ] && flag=(--release)
    (cd "$ROOT" && cargo build --quiet --bin xoauth2-proxy "${flag[@]}") || {
        echo "cargo build failed" >&2
        exit 1
    }
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/xoauth2-proxy
    case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
fi
[ -x "$BIN" ] || {
    echo "no binary at $BIN" >&2
    exit 1
}
T_BUILD=$(date +%s)

# ---------------------------------------------------------------------------------------------
# Temp dir, cleanup
# ---------------------------------------------------------------------------------------------
T=$(mktemp -d /tmp/xoauth2-interop.XXXXXX)
chmod 755 "$T" # Dovecot's unprivileged processes must reach their sockets and the mail home

PIDS_FG= PID_SINK= PID_PROXY= DOVECOT_CONF=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$PID_PROXY" ] && kill -0 "$PID_PROXY" 2>/dev/null; then
        kill -TERM "$PID_PROXY" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$PID_PROXY" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID_PROXY" 2>/dev/null
    fi
    if [ -n "$DOVECOT_CONF" ] && [ -f "$T/dovecot/run/master.pid" ]; then
        local mp
        mp=$(cat "$T/dovecot/run/master.pid" 2>/dev/null)
        if [ -n "$mp" ] && kill -0 "$mp" 2>/dev/null; then
            kill -TERM "$mp" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$mp" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$mp" 2>/dev/null
        fi
    fi
    for p in $PID_SINK $PIDS_FG; do
        kill -TERM "$p" 2>/dev/null
    done
    for p in $PID_SINK $PIDS_FG; do
        wait "$p" 2>/dev/null
    done
    if ((FAILED > 0)); then
        echo "-- logs kept in $T (proxy.log, dovecot/dovecot.log, fake_google.log, smtp_to_lmtp.log)"
        if [ -z "${INTEROP_NO_LOGS:-}" ]; then
            for f in proxy.log dovecot/dovecot.log; do
                [ -f "$T/$f" ] && { echo "-- last lines of $f:"; tail -n 25 "$T/$f"; }
            done
        fi
    elif [ -n "${INTEROP_KEEP:-}" ]; then
        echo "-- kept $T"
    else
        rm -rf "$T"
    fi
    local t1
    t1=$(date +%s)
    echo "-- time: packages $((T_PKG - T0)) s, build $((T_BUILD - T_PKG)) s, tests $((t1 - T_BUILD)) s"
    echo "$PASSED passed, $FAILED failed"
    if ((FAILED > 0)); then exit 1; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Ports: 20 consecutive ports free on 127.0.0.1 and 127.0.0.2
# ---------------------------------------------------------------------------------------------
BASE=$(python3 - "${INTEROP_PORT_BASE:-24100}" <<'EOF'
import socket, sys
start = int(sys.argv[1])
def free(port):
    for host in ("127.0.0.1", "127.0.0.2"):
        s = socket.socket()
        # As the servers will: a port that only has TIME_WAIT leftovers is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True
for base in range(start, 60000, 20):
    if all(free(p) for p in range(base, base + 20)):
        print(base)
        break
EOF
)
[ -n "$BASE" ] || die "no free block of 20 ports"
P_FG=$((BASE + 0))        # fake Google (token + introspection)
P_SINK=$((BASE + 1))      # SMTP -> LMTP relay for Dovecot submission
P_LMTP=$((BASE + 2))      # Dovecot LMTP
P_DV_IMAP=$((BASE + 3))   # Dovecot IMAP, STARTTLS (143-style) on 127.0.0.2
P_DV_IMAPS=$((BASE + 4))  # Dovecot IMAP, implicit TLS (993-style)
P_DV_POP3=$((BASE + 5))   # Dovecot POP3, STLS (110-style)
P_DV_POP3S=$((BASE + 6))  # Dovecot POP3, implicit TLS (995-style)
P_DV_SUB=$((BASE + 7))    # Dovecot submission, STARTTLS (587-style)
P_DV_SUBS=$((BASE + 8))   # Dovecot submission, implicit TLS (465-style)
P_PX_IMAP=$((BASE + 10))        # proxy imap -> imaps
P_PX_IMAP_ST=$((BASE + 11))     # proxy imap -> imap + STARTTLS
P_PX_SMTP=$((BASE + 12))        # proxy smtp -> submissions
P_PX_SMTP_ST=$((BASE + 13))     # proxy smtp -> submission + STARTTLS
P_PX_POP3=$((BASE + 14))        # proxy pop3 -> pop3s
P_PX_POP3_ST=$((BASE + 15))     # proxy pop3 -> pop3 + STLS
P_PX_IMAPS_LOCAL=$((BASE + 16)) # proxy imap, local implicit TLS -> imaps
P_PX_SMTP_LOCAL_ST=$((BASE + 17)) # proxy smtp, local STARTTLS -> submissions
P_PX_IMAP_NOCA=$((BASE + 18))   # proxy imap -> imaps, no upstream_ca (must refuse the cert)

USER_EMAIL=alice@example.com
CLIENT_ID=interop-client.apps.googleusercontent.com
CLIENT_SECRET=GOCSPX-interop-secret
REFRESH_TOKEN="1//interop-refresh-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
MS_USER=bob@example.com # a Microsoft account, authorized with login --device
MS_CLIENT_ID=00000000-0000-4000-8000-00000000c11e
MS_TENANT=interop-tenant.example
MAIL_UID=5000

# ---------------------------------------------------------------------------------------------
# PKI: a CA and a server certificate for localhost, 127.0.0.1 and 127.0.0.2
# ---------------------------------------------------------------------------------------------
say "setup in $T (ports $BASE-$((BASE + 19)))"
mkdir -p "$T/pki"
(
    cd "$T/pki" &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout ca-key.pem -out ca.pem -days 2 -subj "/CN=xoauth2-proxy interop CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout server-key.pem -out server.csr -subj "/CN=localhost" &&
        printf '%s\n' 'basicConstraints=CA:FALSE' \
            'keyUsage=critical,digitalSignature,keyEncipherment' \
            'extendedKeyUsage=serverAuth' \
            'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2' >ext.cnf &&
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
            -out server.pem -days 2 -extfile ext.cnf
) >"$T/pki/openssl.log" 2>&1 && pass "setup: CA and server certificate generated with openssl" ||
    die "setup: openssl failed: $(tail -3 "$T/pki/openssl.log")"

# ---------------------------------------------------------------------------------------------
# Fake Google and the SMTP->LMTP relay
# ---------------------------------------------------------------------------------------------
python3 "$HERE/fake_google.py" --port "$P_FG" --client-id "$CLIENT_ID" \
    --client-secret "$CLIENT_SECRET" --refresh-token "$REFRESH_TOKEN=$USER_EMAIL" \
    --ms-client-id "$MS_CLIENT_ID" --device-user "$MS_USER" \
    </dev/null >"$T/fake_google.log" 2>&1 &
PIDS_FG=$!
python3 "$HERE/smtp_to_lmtp.py" --port "$P_SINK" --lmtp-port "$P_LMTP" \
    </dev/null >"$T/smtp_to_lmtp.log" 2>&1 &
PID_SINK=$!

wait_port() { # host port seconds
    python3 - "$@" <<'EOF'
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.time() + secs
while time.time() < end:
    try:
        socket.create_connection((host, port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
EOF
}
wait_port 127.0.0.1 "$P_FG" 10 || die "setup: fake Google did not start: $(tail -3 "$T/fake_google.log")"
wait_port 127.0.0.1 "$P_SINK" 10 || die "setup: SMTP->LMTP relay did not start"

# ---------------------------------------------------------------------------------------------
# Dovecot
# ---------------------------------------------------------------------------------------------
D=$T/dovecot
HOME_DIR=$T/home/alice
mkdir -p "$D" "$HOME_DIR/Maildir/"{cur,new,tmp}
# The seeded message: UID 1. LF line ends on disk, as Maildir stores them.
cat >"$HOME_DIR/Maildir/cur/1700000000.M1P1.interop:2,S" <<'EOF'
Return-Path: <bob@example.net>
From: Bob <bob@example.net>
To: Alice <alice@example.com>
Subject: seeded message for the interop test
Date: Tue, 14 Nov 2023 22:13:20 +0000
Message-ID: <seed-1@interop.test>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Hello Alice,

this message was in the mailbox before the test started.
.
..a line that starts with two dots
EOF
MS_HOME=$T/home/bob
mkdir -p "$MS_HOME/Maildir/"{cur,new,tmp}
cat >"$MS_HOME/Maildir/cur/1700000001.M1P1.interop:2,S" <<'EOF'
From: Carol <carol@example.net>
To: Bob <bob@example.com>
Subject: for Bob via Microsoft

Bob's mailbox, reached with a token from the fake Microsoft identity platform.
EOF
chown -R "$MAIL_UID:$MAIL_UID" "$T/home"

cat >"$D/oauth2.conf" <<EOF
introspection_mode = post
introspection_url = http://127.0.0.1:$P_FG/introspect
force_introspection = yes
active_attribute = active
active_value = true
username_attribute = email
scope = https://mail.google.com/
EOF
{
    echo "$USER_EMAIL::$MAIL_UID:$MAIL_UID::$HOME_DIR::"
    echo "$MS_USER::$MAIL_UID:$MAIL_UID::$MS_HOME::"
} >"$D/users"
DOVECOT_CONF=$D/dovecot.conf
cat >"$DOVECOT_CONF" <<EOF
instance_name = xoauth2-interop-$BASE
base_dir = $D/run
state_dir = $D/state
log_path = $D/dovecot.log
info_log_path = $D/dovecot.log
protocols = imap pop3 submission lmtp
listen = 127.0.0.2
ssl = required
ssl_cert = <$T/pki/server.pem
ssl_key = <$T/pki/server-key.pem
disable_plaintext_auth = yes
auth_mechanisms = xoauth2 oauthbearer
auth_cache_size = 0
auth_failure_delay = 0
auth_verbose = yes
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l lport=%a mpid=%e %c %k session=<%{session}>
mail_location = maildir:~/Maildir
first_valid_uid = $MAIL_UID
last_valid_uid = $MAIL_UID
default_login_user = dovenull
default_internal_user = dovecot
hostname = mail.interop.test
postmaster_address = postmaster@example.com
submission_relay_host = 127.0.0.1
submission_relay_port = $P_SINK
submission_relay_trusted = yes
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = $D/oauth2.conf
}
userdb {
  driver = passwd-file
  args = $D/users
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.2
    port = $P_DV_IMAP
  }
  inet_listener imaps {
    address = 127.0.0.2
    port = $P_DV_IMAPS
    ssl = yes
  }
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.2
    port = $P_DV_POP3
  }
  inet_listener pop3s {
    address = 127.0.0.2
    port = $P_DV_POP3S
    ssl = yes
  }
}
service submission-login {
  inet_listener submission {
    address = 127.0.0.2
    port = $P_DV_SUB
  }
  inet_listener submissions {
    address = 127.0.0.2
    port = $P_DV_SUBS
    ssl = yes
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $P_LMTP
  }
}
# No auth penalty: repeated failures from 127.0.0.1 must not be delayed.
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
EOF
if dovecot -c "$DOVECOT_CONF" </dev/null >"$D/start.log" 2>&1; then
    ok=1
    for p in $P_DV_IMAP $P_DV_IMAPS $P_DV_POP3 $P_DV_POP3S $P_DV_SUB $P_DV_SUBS; do
        wait_port 127.0.0.2 "$p" 10 || ok=
    done
    wait_port 127.0.0.1 "$P_LMTP" 10 || ok=
    [ -n "$ok" ] && pass "setup: Dovecot $(dovecot --version | cut -d' ' -f1) started (IMAP, POP3, submission on 127.0.0.2; LMTP)" ||
        die "setup: Dovecot listeners did not come up: $(tail -5 "$D/dovecot.log")"
else
    die "setup: dovecot failed to start: $(cat "$D/start.log")"
fi

# ---------------------------------------------------------------------------------------------
# Proxy config, credentials via the real CLI, serve
# ---------------------------------------------------------------------------------------------
P=$T/proxy
mkdir -p "$P"
CFG=$P/config.toml
listener() { # protocol port upstream-port upstream-tls [local-tls] [ca:yes|no]
    echo
    echo "[[listener]]"
    echo "protocol = \"$1\""
    echo "bind = \"127.0.0.1:$2\""
    echo "local_tls = \"${5:-none}\""
    echo "upstream = \"127.0.0.2:$3\""
    echo "upstream_tls = \"$4\""
    [ "${6:-yes}" = yes ] && echo "upstream_ca = \"$T/pki/ca.pem\""
}
{
    cat <<EOF
# Written by tests/interop/run.sh
state_dir = "state"

[tls]
cert = "$T/pki/server.pem"
key = "$T/pki/server-key.pem"

[providers.google]
client_id = "$CLIENT_ID"
client_secret = "$CLIENT_SECRET"
token_url = "http://127.0.0.1:$P_FG/token"

[providers.microsoft]
client_id = "$MS_CLIENT_ID"
tenant = "$MS_TENANT"
auth_url = "http://127.0.0.1:$P_FG/{tenant}/oauth2/v2.0/authorize"
token_url = "http://127.0.0.1:$P_FG/{tenant}/oauth2/v2.0/token"
device_url = "http://127.0.0.1:$P_FG/{tenant}/oauth2/v2.0/devicecode"

[limits]
upstream_timeout_secs = 10
preauth_timeout_secs = 30
shutdown_grace_secs = 2
EOF
    listener imap "$P_PX_IMAP" "$P_DV_IMAPS" implicit
    listener imap "$P_PX_IMAP_ST" "$P_DV_IMAP" starttls
    listener smtp "$P_PX_SMTP" "$P_DV_SUBS" implicit
    listener smtp "$P_PX_SMTP_ST" "$P_DV_SUB" starttls
    listener pop3 "$P_PX_POP3" "$P_DV_POP3S" implicit
    listener pop3 "$P_PX_POP3_ST" "$P_DV_POP3" starttls
    listener imap "$P_PX_IMAPS_LOCAL" "$P_DV_IMAPS" implicit implicit
    listener smtp "$P_PX_SMTP_LOCAL_ST" "$P_DV_SUBS" implicit starttls
    listener imap "$P_PX_IMAP_NOCA" "$P_DV_IMAPS" implicit none no
    cat <<EOF

[[account]]
email = "$USER_EMAIL"

[[account]]
email = "$MS_USER"
provider = "microsoft"
EOF
} >"$CFG"

stats() { curl -s "http://127.0.0.1:$P_FG/control/stats"; }
stat_field() { stats | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

# import: a bad token is refused, the real one is stored after exactly one refresh
before=$(stat_field token_requests)
out=$(echo "1//not-a-known-token" | "$BIN" import "$USER_EMAIL" -c "$CFG" --refresh-token-stdin 2>&1)
rc=$?
after=$(stat_field token_requests)
[ $rc = 1 ] && [ $((after - before)) = 1 ] && [[ $out == *invalid_grant* || $out == *revoked* ]] && pass "cli: import refuses a refresh token the token endpoint rejects (exit 1: ${out##*$'\n'})" ||
    fail "cli: import of an unknown refresh token: exit $rc (want 1), token requests $before -> $after (want +1); output: $out"
before=$(stat_field token_requests)
out=$(echo "$REFRESH_TOKEN" | "$BIN" import "$USER_EMAIL" -c "$CFG" --refresh-token-stdin 2>&1)
rc=$?
after=$(stat_field token_requests)
[ $rc = 0 ] && [ $((after - before)) = 1 ] &&
    pass "cli: import stores the refresh token after one refresh ($out)" ||
    die "cli: import failed: exit $rc, token requests $before -> $after; output: $out"

out=$("$BIN" password add "$USER_EMAIL" -c "$CFG" --label interop 2>"$P/password-add.err")
rc=$?
APP_PASSWORD=$(printf '%s\n' "$out" | tail -n 1)
[ $rc = 0 ] && [ ${#APP_PASSWORD} -ge 12 ] && [[ $APP_PASSWORD != *" "* ]] &&
    pass "cli: password add prints the password alone on the last line (${#APP_PASSWORD} chars)" ||
    die "cli: password add: exit $rc, stdout: $out; stderr: $(cat "$P/password-add.err")"

# Microsoft: the device-code login driven through the CLI against the fake identity platform
out=$(timeout 60 "$BIN" login "$MS_USER" -c "$CFG" --device </dev/null 2>&1)
rc=$?
[ $rc = 0 ] && [[ $out == *INTEROP42* ]] && [[ $out == *microsoft.com/devicelogin* ]] &&
    [[ $out == *"Authorized $MS_USER"* ]] &&
    pass "cli: login --device shows the verification URL and user code, polls past authorization_pending and stores the grant" ||
    fail "cli: login --device: exit $rc; output: $out"
MS_PASSWORD=$("$BIN" password add "$MS_USER" -c "$CFG" --label interop 2>/dev/null | tail -n 1)

"$BIN" serve -c "$CFG" </dev/null >"$T/proxy.out" 2>"$T/proxy.log" &
PID_PROXY=$!
ok=
for _ in $(seq 150); do
    n=0
    for p in $P_PX_IMAP $P_PX_IMAP_ST $P_PX_SMTP $P_PX_SMTP_ST $P_PX_POP3 $P_PX_POP3_ST \
        $P_PX_IMAPS_LOCAL $P_PX_SMTP_LOCAL_ST $P_PX_IMAP_NOCA; do
        grep -q "listening.*bind=127.0.0.1:$p\b" "$T/proxy.log" 2>/dev/null && n=$((n + 1))
    done
    [ $n = 9 ] && { ok=1; break; }
    kill -0 "$PID_PROXY" 2>/dev/null || break
    sleep 0.1
done
[ -n "$ok" ] && pass "serve: all 9 listeners logged 'listening' with their bind address" ||
    die "serve did not come up: $(tail -5 "$T/proxy.log")"

# ---------------------------------------------------------------------------------------------
# Microsoft account through the same listener, validated by Dovecot's introspection
# ---------------------------------------------------------------------------------------------
say "microsoft account"
out=$(curl -s --max-time 20 --user "$MS_USER:$MS_PASSWORD" "imap://127.0.0.1:$P_PX_IMAP/INBOX;UID=1" 2>&1)
tenants=$(stat_field ms_tenants)
if [[ $out == *"for Bob via Microsoft"* ]] &&
    grep -q "Login: user=<$MS_USER>, method=XOAUTH2" "$D/dovecot.log" &&
    [[ $tenants == *"'$MS_TENANT'"* ]]; then
    pass "microsoft: curl IMAP fetch through the proxy as $MS_USER (token from the fake identity platform, tenant in the path; Dovecot: method=XOAUTH2)"
else
    fail "microsoft: IMAP fetch as $MS_USER: curl said: ${out:0:200}; tenants seen: $tenants"
fi

# ---------------------------------------------------------------------------------------------
# The client checks
# ---------------------------------------------------------------------------------------------
cat >"$T/env.json" <<EOF
{
  "bin": "$BIN", "config": "$CFG", "tmp": "$T", "user": "$USER_EMAIL",
  "password": "$APP_PASSWORD", "refresh_token": "$REFRESH_TOKEN",
  "ca": "$T/pki/ca.pem", "maildir": "$HOME_DIR/Maildir",
  "dovecot_log": "$D/dovecot.log", "proxy_log": "$T/proxy.log",
  "fake_google": "http://127.0.0.1:$P_FG",
  "dovecot": {"imap": $P_DV_IMAP, "imaps": $P_DV_IMAPS, "pop3": $P_DV_POP3,
              "pop3s": $P_DV_POP3S, "submission": $P_DV_SUB, "submissions": $P_DV_SUBS},
  "proxy": {"imap": $P_PX_IMAP, "imap_starttls": $P_PX_IMAP_ST, "smtp": $P_PX_SMTP,
            "smtp_starttls": $P_PX_SMTP_ST, "pop3": $P_PX_POP3, "pop3_starttls": $P_PX_POP3_ST,
            "imaps_local": $P_PX_IMAPS_LOCAL, "smtp_local_starttls": $P_PX_SMTP_LOCAL_ST,
            "imap_noca": $P_PX_IMAP_NOCA}
}
EOF
run_checks() { # script: its PASS/FAIL lines count; a crash or timeout counts as a failure
    local script=$1
    shift
    while IFS= read -r line; do
        case $line in
        "PASS: "*) PASSED=$((PASSED + 1)); echo "$line" ;;
        "FAIL: "*) FAILED=$((FAILED + 1)); echo "$line" ;;
        "$script exit 0") ;;
        "$script exit "*) FAILED=$((FAILED + 1)); echo "FAIL: ${line} (crashed or timed out; see above)" ;;
        *) echo "   $line" ;;
        esac
    done < <(timeout 240 python3 "$HERE/$script" "$@" 2>&1; echo "$script exit $?")
}
if [ "${INTEROP_ONLY:-}" != recipes ]; then
    say "client checks"
    run_checks checks.py "$T/env.json"
fi
say "client recipes (README.md, run as printed)"
run_checks recipes.py "$T/env.json" "$ROOT/README.md"

# ---------------------------------------------------------------------------------------------
# Cluster: replicas on one Redis behind HAProxy (tests/interop/cluster.sh)
# ---------------------------------------------------------------------------------------------
# shellcheck source=tests/interop/cluster.sh
source "$HERE/cluster.sh"

# ---------------------------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------------------------
say "shutdown"
if kill -0 "$PID_PROXY" 2>/dev/null; then
    kill -TERM "$PID_PROXY"
    rc=
    for _ in $(seq 100); do
        kill -0 "$PID_PROXY" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$PID_PROXY" 2>/dev/null; then
        fail "serve: still running 10 s after SIGTERM"
    else
        wait "$PID_PROXY"
        rc=$?
        [ "$rc" = 0 ] && pass "serve: exits 0 on SIGTERM" || fail "serve: exit $rc after SIGTERM, expected 0"
    fi
    PID_PROXY=
else
    fail "serve: the proxy died during the tests: $(tail -3 "$T/proxy.log")"
fi
# The EXIT trap stops Dovecot and the helpers and prints the closing line.
