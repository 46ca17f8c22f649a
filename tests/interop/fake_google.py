#!/usr/bin/env python3
"""A stand-in for Google's OAuth token endpoint, plus the RFC 7662 introspection endpoint the
test Dovecot validates bearer tokens against. Python 3 standard library only. With
--ms-client-id it also plays Microsoft's identity platform under /{tenant}/oauth2/v2.0/.

Endpoints
  POST /token        grant_type=refresh_token, client_id, client_secret, refresh_token
                     -> 200 {"access_token", "expires_in", "scope", "token_type"}
                     -> 400 {"error": "invalid_grant"} for a revoked or unknown refresh token
                     -> 401 {"error": "invalid_client"} for a wrong client id/secret
                     -> 503 while the endpoint is "down"
  POST /introspect   token=...  -> {"active": true, "email", "scope", ...} or {"active": false}
  GET  /auth         the consent screen, simulated: redirects at once to redirect_uri with a code
                     for login_hint's account (PKCE S256 challenge remembered)
  POST /token        grant_type=authorization_code, code, code_verifier, redirect_uri
                     -> 200 with a new refresh token as well

Microsoft mode (--ms-client-id ID --device-user EMAIL), a public client (no secret):
  POST /{tenant}/oauth2/v2.0/devicecode   client_id, scope (must hold offline_access)
                     -> 200 {"device_code", "user_code", "verification_uri", "interval": 1, ...}
  POST /{tenant}/oauth2/v2.0/token   device_code grant: authorization_pending once, then a
                     token for EMAIL; refresh_token grant: a new refresh token every time (the
                     old one stays valid, as at Microsoft)
  The tenant of every such request is counted in stats["ms_tenants"].

Control (for the test runner; answers JSON)
  POST /control/add-refresh-token   refresh_token=...&email=...
  POST /control/revoke              [refresh_token=...]   (all refresh tokens if none given)
  POST /control/expire-access-tokens                      (every issued access token inactive)
  POST /control/down | /control/up                        (/token answers 503 while down)
  GET  /control/stats   {"token_requests", "token_ok", "token_failed", "introspections", ...}

Usage: fake_google.py --port N --client-id ID --client-secret S
                      [--refresh-token TOKEN=EMAIL ...] [--expires-in SECS]
"""

import argparse
import base64
import hashlib
import json
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

SCOPE = "https://mail.google.com/"
# What Microsoft grants for the proxy's one consent (offline_access is not echoed).
MS_SCOPE = ("https://outlook.office.com/IMAP.AccessAsUser.All "
            "https://outlook.office.com/POP.AccessAsUser.All https://outlook.office.com/SMTP.Send")


class State:
    def __init__(self, client_id, client_secret, expires_in):
        self.lock = threading.Lock()
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.refresh = {}  # refresh token -> {"email", "revoked"}
        self.access = {}  # access token -> {"email", "exp", "active"}
        self.codes = {}  # authorization code -> {"email", "challenge", "redirect_uri"}
        self.down = False
        self.ms_client_id = None
        self.device_user = None
        self.device_polls = 0
        self.stats = {
            "ms_tenants": {},
            "token_requests": 0,  # every POST /token, whatever the answer
            "token_ok": 0,
            "token_failed": 0,
            "introspections": 0,
            "introspections_active": 0,
        }


STATE = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-google/1"

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (time.strftime("%H:%M:%S"), fmt % args))
        sys.stderr.flush()

    def _form(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        parsed = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in parsed.items()}

    def _json(self, status, obj, extra_headers=()):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in extra_headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/control/stats":
            with STATE.lock:
                out = dict(STATE.stats)
                out["down"] = STATE.down
                out["access_tokens_issued"] = len(STATE.access)
            return self._json(200, out)
        if self.path == "/health":
            return self._json(200, {"ok": True})
        if self.path.startswith("/auth?"):
            return self._consent()
        return self._json(404, {"error": "not_found"})

    def _consent(self):
        q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        code = "4/interop-" + secrets.token_urlsafe(16)
        with STATE.lock:
            STATE.codes[code] = {
                "email": q.get("login_hint", ""),
                "challenge": q.get("code_challenge", ""),
                "redirect_uri": q.get("redirect_uri", ""),
            }
        target = q.get("redirect_uri", "") + "?" + urlencode({"code": code, "state": q.get("state", "")})
        self.send_response(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _code_grant(self, form):
        """authorization_code: the code once, with the PKCE verifier of its challenge."""
        grant = STATE.codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "").encode()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
        if grant is None or grant["challenge"] != challenge or grant["redirect_uri"] != form.get("redirect_uri"):
            STATE.stats["token_failed"] += 1
            return self._json(400, {"error": "invalid_grant", "error_description": "Bad code or verifier."})
        refresh = "1//interop-" + secrets.token_urlsafe(24)
        STATE.refresh[refresh] = {"email": grant["email"], "revoked": False}
        return self._issue(grant["email"], refresh)

    def _issue(self, email, refresh=None, scope=SCOPE):
        token = "ya29.interop-" + secrets.token_urlsafe(24)
        STATE.access[token] = {
            "email": email,
            "exp": time.time() + STATE.expires_in,
            "active": True,
        }
        STATE.stats["token_ok"] += 1
        body = {
            "access_token": token,
            "expires_in": STATE.expires_in,
            "scope": scope,
            "token_type": "Bearer",
        }
        if refresh:
            body["refresh_token"] = refresh
        return self._json(200, body)

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        form = self._form()
        if path == "/token":
            return self._token(form)
        ms = path.split("/")
        if STATE.ms_client_id and len(ms) == 5 and ms[2:4] == ["oauth2", "v2.0"]:
            return self._microsoft(ms[1], ms[4], form)
        if path == "/introspect":
            return self._introspect(form)
        if path.startswith("/control/"):
            return self._control(path[len("/control/"):], form)
        return self._json(404, {"error": "not_found"})

    def _token(self, form):
        with STATE.lock:
            STATE.stats["token_requests"] += 1
            if STATE.down:
                STATE.stats["token_failed"] += 1
                return self._json(503, {"error": "temporarily_unavailable"})
            if (form.get("client_id") != STATE.client_id
                    or form.get("client_secret") != STATE.client_secret):
                STATE.stats["token_failed"] += 1
                return self._json(401, {"error": "invalid_client",
                                        "error_description": "The OAuth client was not found."})
            if form.get("grant_type") == "authorization_code":
                return self._code_grant(form)
            if form.get("grant_type") != "refresh_token":
                STATE.stats["token_failed"] += 1
                return self._json(400, {"error": "unsupported_grant_type"})
            entry = STATE.refresh.get(form.get("refresh_token", ""))
            if entry is None or entry["revoked"]:
                STATE.stats["token_failed"] += 1
                return self._json(400, {"error": "invalid_grant",
                                        "error_description": "Token has been expired or revoked."})
            return self._issue(entry["email"])

    def _microsoft(self, tenant, endpoint, form):
        with STATE.lock:
            STATE.stats["ms_tenants"][tenant] = STATE.stats["ms_tenants"].get(tenant, 0) + 1
            if form.get("client_id") != STATE.ms_client_id:
                return self._json(400, {"error": "unauthorized_client",
                                        "error_description": "AADSTS700016: Application not found."})
            if endpoint == "devicecode":
                if "offline_access" not in form.get("scope", "").split():
                    return self._json(400, {"error": "invalid_scope"})
                return self._json(200, {
                    "device_code": "interop-device-code", "user_code": "INTEROP42",
                    "verification_uri": "https://microsoft.com/devicelogin",
                    "expires_in": 900, "interval": 1,
                    "message": "Enter INTEROP42 at https://microsoft.com/devicelogin"})
            if endpoint != "token":
                return self._json(404, {"error": "not_found"})
            STATE.stats["token_requests"] += 1
            grant = form.get("grant_type")
            if grant == "urn:ietf:params:oauth:grant-type:device_code":
                STATE.device_polls += 1
                if form.get("device_code") != "interop-device-code":
                    return self._json(400, {"error": "bad_verification_code"})
                if STATE.device_polls == 1:
                    return self._json(400, {"error": "authorization_pending",
                                            "error_description": "AADSTS70016: pending"})
                email = STATE.device_user
            elif grant == "refresh_token":
                entry = STATE.refresh.get(form.get("refresh_token", ""))
                if entry is None or entry["revoked"]:
                    STATE.stats["token_failed"] += 1
                    return self._json(400, {"error": "invalid_grant",
                                            "error_description": "AADSTS70000: invalid refresh token"})
                email = entry["email"]
            else:
                return self._json(400, {"error": "unsupported_grant_type"})
            refresh = "M.C5_interop-" + secrets.token_urlsafe(24)
            STATE.refresh[refresh] = {"email": email, "revoked": False}
            return self._issue(email, refresh, MS_SCOPE)

    def _introspect(self, form):
        with STATE.lock:
            STATE.stats["introspections"] += 1
            entry = STATE.access.get(form.get("token", ""))
            if entry is None or not entry["active"] or entry["exp"] <= time.time():
                return self._json(200, {"active": False})
            STATE.stats["introspections_active"] += 1
            return self._json(200, {
                "active": True,
                "email": entry["email"],
                "scope": SCOPE,
                "exp": int(entry["exp"]),
                "token_type": "Bearer",
            })

    def _control(self, what, form):
        with STATE.lock:
            if what == "add-refresh-token":
                STATE.refresh[form["refresh_token"]] = {"email": form["email"], "revoked": False}
            elif what == "revoke":
                tok = form.get("refresh_token")
                for k, v in STATE.refresh.items():
                    if tok is None or k == tok:
                        v["revoked"] = True
            elif what == "expire-access-tokens":
                for v in STATE.access.values():
                    v["active"] = False
            elif what == "down":
                STATE.down = True
            elif what == "up":
                STATE.down = False
            else:
                return self._json(404, {"error": "unknown control " + what})
            return self._json(200, {"ok": True})


def main():
    global STATE
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--client-secret", required=True)
    ap.add_argument("--refresh-token", action="append", default=[], metavar="TOKEN=EMAIL")
    ap.add_argument("--expires-in", type=int, default=3599)
    ap.add_argument("--ms-client-id")
    ap.add_argument("--device-user", metavar="EMAIL")
    args = ap.parse_args()
    STATE = State(args.client_id, args.client_secret, args.expires_in)
    STATE.ms_client_id = args.ms_client_id
    STATE.device_user = args.device_user
    for item in args.refresh_token:
        tok, email = item.split("=", 1)
        STATE.refresh[tok] = {"email": email, "revoked": False}
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    sys.stderr.write("fake-google listening on %s:%d\n" % (args.host, args.port))
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
