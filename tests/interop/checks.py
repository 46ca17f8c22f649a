#!/usr/bin/env python3
"""The client side of the interop test: real clients (curl, imaplib, smtplib, poplib, and a raw
line client where the exact reply line matters) against the running proxy, which logs in to a
real Dovecot with XOAUTH2. Started by run.sh with the path of its env.json.

Prints `PASS: name (detail)` or `FAIL: name: why` per check; run.sh counts them.
Python 3 standard library only.
"""

import base64
import email.utils
import imaplib
import json
import os
import poplib
import re
import secrets
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import traceback
import urllib.parse
import urllib.request

ENV = json.load(open(sys.argv[1]))
USER = ENV["user"]
PW = ENV["password"]
PX = ENV["proxy"]
DV = ENV["dovecot"]
HOST = "127.0.0.1"
TIMEOUT = 20

imaplib.IMAP4.timeout = TIMEOUT  # not used by every version; sockets get timeouts below
socket.setdefaulttimeout(TIMEOUT)

RESULTS = {"pass": 0, "fail": 0}


def check(name, fn, *args):
    """Run one check: fn returns a short detail (pass) or raises (fail)."""
    try:
        detail = fn(*args)
        RESULTS["pass"] += 1
        print("PASS: %s%s" % (name, " (%s)" % detail if detail else ""), flush=True)
        return True
    except Exception as e:  # every failure is reported, none hidden
        RESULTS["fail"] += 1
        msg = str(e) or repr(e)
        if not isinstance(e, AssertionError):
            msg = "%s: %s" % (type(e).__name__, msg)
        print("FAIL: %s: %s" % (name, msg.replace("\n", " | ")[:600]), flush=True)
        if os.environ.get("INTEROP_TRACE"):
            traceback.print_exc()
        return False


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


# ----------------------------------------------------------------------------------------------
# Fake Google control, logs
# ----------------------------------------------------------------------------------------------

def fg(path, data=None):
    url = ENV["fake_google"] + path
    body = None if data is None else urllib.parse.urlencode(data).encode()
    if body is None and path.startswith("/control/") and path != "/control/stats":
        body = b""
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as r:
        return json.loads(r.read())



def stats():
    return fg("/control/stats")


def log_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_since(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def wait_log(path, offset, pattern, secs=3.0):
    """New log text since offset once it matches pattern (Dovecot's log process lags a bit)."""
    end = time.time() + secs
    while True:
        text = log_since(path, offset)
        if re.search(pattern, text):
            return text
        if time.time() > end:
            return text
        time.sleep(0.05)


DLOG = ENV["dovecot_log"]
LOGIN_RE = r"Login: user=<%s>, method=(\S+), rip=127\.0\.0\.1, lip=127\.0\.0\.2, lport=%d, mpid=\d+, (TLS|secured)"

# ----------------------------------------------------------------------------------------------
# Raw line clients (for exact reply lines)
# ----------------------------------------------------------------------------------------------


class Line:
    def __init__(self, port, tls=False, host=HOST):
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
        if tls:
            sock = client_ctx().wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.f = sock.makefile("rb")

    def starttls(self, host=HOST):
        self.sock = client_ctx().wrap_socket(self.sock, server_hostname=host)
        self.f = self.sock.makefile("rb")

    def send(self, text):
        self.sock.sendall(text.encode() + b"\r\n")

    def line(self):
        l = self.f.readline(65536)
        if not l:
            raise AssertionError("connection closed by the server")
        return l.decode("utf-8", "replace").rstrip("\r\n")

    def until(self, pred):
        lines = []
        while True:
            l = self.line()
            lines.append(l)
            if pred(l):
                return l, lines

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def client_ctx():
    return ssl.create_default_context(cafile=ENV["ca"])


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def imap_login_line(port, user=USER, pw=PW):
    """Tagged reply to `a1 LOGIN user pw`."""
    c = Line(port)
    try:
        c.line()  # greeting
        c.send('a1 LOGIN "%s" "%s"' % (user, pw))
        last, _ = c.until(lambda l: l.startswith("a1 "))
        if last.startswith("a1 OK"):
            c.send("a2 LOGOUT")
        return last
    finally:
        c.close()


def smtp_auth_line(port, user=USER, pw=PW):
    """Reply to `AUTH PLAIN <initial response>` after EHLO."""
    c = Line(port)
    try:
        c.until(lambda l: l[3:4] == " ")  # greeting
        c.send("EHLO interop.test")
        c.until(lambda l: l[3:4] == " ")
        c.send("AUTH PLAIN " + b64("\0%s\0%s" % (user, pw)))
        last, _ = c.until(lambda l: l[3:4] != "-")
        c.send("QUIT")
        return last
    finally:
        c.close()


def pop3_pass_line(port, user=USER, pw=PW):
    """Reply to PASS after USER."""
    c = Line(port)
    try:
        c.line()
        c.send("USER " + user)
        r = c.line()
        if not r.startswith("+OK"):
            return r
        c.send("PASS " + pw)
        r = c.line()
        if r.startswith("+OK"):
            c.send("QUIT")
        return r
    finally:
        c.close()


# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------

SEED_PATH = os.path.join(ENV["maildir"], "cur", "1700000000.M1P1.interop:2,S")
SEED = open(SEED_PATH, "rb").read().replace(b"\n", b"\r\n")  # what IMAP/POP3 must return


def make_message(label, big=False):
    mid = "<%s.%s@interop.test>" % (label, secrets.token_hex(6))
    head = (
        "X-Interop-First: %s\r\n"
        "From: Alice <%s>\r\n"
        "To: Alice <%s>\r\n"
        "Subject: interop %s =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
        "Date: %s\r\n"
        "Message-ID: %s\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n" % (label, USER, USER, label, email.utils.formatdate(), mid)
    ).encode()
    body = [
        "Sent through xoauth2-proxy by the interop test (%s)." % label,
        "",
        ".",
        "..two leading dots",
        ". a dot and a space",
        "trailing spaces   ",
        "\ttab at the start",
        "From the start of a line",
        "8-bit UTF-8: grüße, ñ, 日本語",
        "x" * 990,
    ]
    if big:  # ~200 KB, well past any single read or TLS record
        body += ["%06d %s" % (i, "abcdefghijklmnopqrstuvwxyz0123456789" * 2) for i in range(2600)]
    body += ["-- ", "end of %s" % label]
    return mid, head + "\r\n".join(body).encode() + b"\r\n"


def own_part(fetched, sent):
    """The part of a delivered message from the sender's first header on (Dovecot/LMTP prepend
    Return-Path, Delivered-To, Received)."""
    first = sent.split(b"\r\n", 1)[0] + b"\r\n"
    i = fetched.find(first)
    expect(i >= 0, "own first header %r not found in %d bytes" % (first[:40], len(fetched)))
    prefix = fetched[:i]
    for h in re.findall(rb"(?m)^([A-Za-z-]+):", prefix):
        expect(h.lower() in (b"return-path", b"delivered-to", b"received"),
               "unexpected prepended header %r" % h)
    return fetched[i:]


def same(got, want, what):
    if got == want:
        return
    n = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
             min(len(got), len(want)))
    raise AssertionError("%s differs: %d bytes vs %d sent; first difference at %d: got %r want %r"
                         % (what, len(got), len(want), n, got[max(0, n - 20):n + 20],
                            want[max(0, n - 20):n + 20]))


# ----------------------------------------------------------------------------------------------
# Client helpers
# ----------------------------------------------------------------------------------------------

def curl(*args, stdin=None):
    cmd = ["curl", "-sS", "--max-time", "30"] + list(args)
    p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=40)
    if p.returncode != 0:
        raise AssertionError("curl %s: exit %d: %s" % (
            " ".join(a if a != "%s:%s" % (USER, PW) else "USER:PASS" for a in args),
            p.returncode, p.stderr.decode("utf-8", "replace").strip()))
    return p.stdout


def imap(port, tls=False):
    if tls:
        m = imaplib.IMAP4_SSL(HOST, port, ssl_context=client_ctx(), timeout=TIMEOUT)
    else:
        m = imaplib.IMAP4(HOST, port, timeout=TIMEOUT)
    return m


def imap_fetch_uid(m, uid):
    typ, data = m.uid("FETCH", str(uid), "(BODY.PEEK[])")
    expect(typ == "OK", "UID FETCH %s: %s %r" % (uid, typ, data))
    for item in data:
        if isinstance(item, tuple):
            return item[1]
    raise AssertionError("UID FETCH %s returned no literal: %r" % (uid, data))


def imap_find(m, mid):
    typ, data = m.uid("SEARCH", "HEADER", "Message-ID", '"%s"' % mid)
    expect(typ == "OK", "UID SEARCH: %s %r" % (typ, data))
    uids = data[0].split()
    expect(len(uids) == 1, "UID SEARCH for %s found %r" % (mid, uids))
    return int(uids[0])


def pop3(port):
    return poplib.POP3(HOST, port, timeout=TIMEOUT)


def pop3_retr(p, n):
    resp, lines, octets = p.retr(n)
    expect(resp.startswith(b"+OK"), "RETR %d: %r" % (n, resp))
    return b"".join(l + b"\r\n" for l in lines)


def pop3_find(p, mid):
    count, _ = p.stat()
    for n in range(1, count + 1):
        resp, lines, _ = p.top(n, 0)
        for l in lines:
            if l.lower().startswith(b"message-id:") and mid.encode() in l:
                return n
    raise AssertionError("no POP3 message with Message-ID %s among %d" % (mid, count))


def imap_ok(port):
    m = imap(port)
    try:
        typ, data = m.login(USER, PW)
        expect(typ == "OK", "LOGIN: %s %r" % (typ, data))
        typ, data = m.select("INBOX", readonly=True)
        expect(typ == "OK", "SELECT: %s %r" % (typ, data))
        return int(data[0])
    finally:
        try:
            m.logout()
        except Exception:
            pass


def smtp_ok(port):
    s = smtplib.SMTP(HOST, port, timeout=TIMEOUT)
    try:
        code, msg = s.login(USER, PW)
        expect(code == 235, "AUTH: %d %r" % (code, msg))
        code, msg = s.noop()
        expect(code == 250, "NOOP after login: %d %r" % (code, msg))
        return msg.decode()
    finally:
        try:
            s.quit()
        except Exception:
            pass


def pop3_ok(port):
    p = pop3(port)
    try:
        p.user(USER)
        p.pass_(PW)
        return p.stat()[0]
    finally:
        try:
            p.quit()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def rig_requires_starttls():
    # IMAP: before STARTTLS Dovecot on 127.0.0.2 offers no AUTH= and says LOGINDISABLED.
    c = Line(DV["imap"], host="127.0.0.2")
    g = c.line()
    c.close()
    expect("STARTTLS" in g and "LOGINDISABLED" in g and "AUTH=" not in g,
           "IMAP greeting before STARTTLS: %s" % g)
    # Submission: EHLO before STARTTLS has no AUTH.
    c = Line(DV["submission"], host="127.0.0.2")
    c.until(lambda l: l[3:4] == " ")
    c.send("EHLO x")
    _, lines = c.until(lambda l: l[3:4] == " ")
    c.close()
    expect(any("STARTTLS" in l for l in lines) and not any("AUTH" in l for l in lines),
           "submission EHLO before STARTTLS: %s" % lines)
    # POP3: AUTH before STLS is refused.
    c = Line(DV["pop3"], host="127.0.0.2")
    c.line()
    c.send("AUTH XOAUTH2")
    r = c.line()
    c.close()
    expect(r.startswith("-ERR"), "POP3 AUTH before STLS: %s" % r)
    return "IMAP LOGINDISABLED, no AUTH in EHLO, POP3 %s" % r[:60]


def settled_log_size(path, quiet=0.3, secs=3.0):
    """The log's size once nothing was written to it for `quiet` seconds."""
    end = time.time() + secs
    size = log_size(path)
    while time.time() < end:
        time.sleep(quiet)
        now = log_size(path)
        if now == size:
            break
        size = now
    return size


def wrong_password():
    s0 = stats()
    off = settled_log_size(DLOG)
    r1 = imap_login_line(PX["imap"], pw="wrong-password")
    expect(r1.startswith("a1 NO [AUTHENTICATIONFAILED]"), "IMAP: %s" % r1)
    r2 = smtp_auth_line(PX["smtp"], pw="wrong-password")
    expect(r2.startswith("535 5.7.8"), "SMTP: %s" % r2)
    r3 = pop3_pass_line(PX["pop3"], pw="wrong-password")
    expect(r3.startswith("-ERR [AUTH]"), "POP3: %s" % r3)
    r4 = imap_login_line(PX["imap"], user="mallory@example.com")
    expect(r4.startswith("a1 NO [AUTHENTICATIONFAILED]"), "IMAP unknown user: %s" % r4)
    s1 = stats()
    time.sleep(0.3)
    new = log_since(DLOG, off)
    expect(s1["token_requests"] == s0["token_requests"]
           and s1["introspections"] == s0["introspections"],
           "token endpoint or Dovecot was asked: %r -> %r" % (s0, s1))
    seen = re.findall(r".*(?:Login: user=|auth: .*oauth2\().*", new)
    expect(not seen, "Dovecot saw a login attempt: %s" % " | ".join(seen)[:400])
    return "IMAP %r, SMTP %r, POP3 %r; nothing sent upstream" % (r1[:40], r2[:20], r3[:20])


def curl_imap_list(port):
    out = curl("imap://%s:%d/" % (HOST, port), "-u", "%s:%s" % (USER, PW))
    expect(b"INBOX" in out, "LIST output: %r" % out[:300])
    return out.decode().strip().replace("\r\n", "; ")


def curl_imap_fetch_seed(port, *opts):
    out = curl("imap://%s:%d/INBOX;UID=1" % (HOST, port), "-u", "%s:%s" % (USER, PW), *opts)
    same(out, SEED, "UID 1 via curl")
    return "%d bytes identical to the seeded message" % len(out)


def curl_imaps_local():
    out = curl("imaps://%s:%d/INBOX;UID=1" % (HOST, PX["imaps_local"]), "--cacert", ENV["ca"],
               "-u", "%s:%s" % (USER, PW))
    same(out, SEED, "UID 1 via curl imaps")
    return "%d bytes identical" % len(out)


def imaplib_login_fetch(port, tls=False):
    m = imap(port, tls)
    try:
        caps = m.capabilities
        typ, data = m.login(USER, PW)
        expect(typ == "OK", "LOGIN: %s %r" % (typ, data))
        typ, data = m.select("INBOX")
        expect(typ == "OK", "SELECT: %s %r" % (typ, data))
        same(imap_fetch_uid(m, 1), SEED, "UID 1")
        typ, data = m.noop()
        expect(typ == "OK", "NOOP: %s" % typ)
        return "pre-auth CAPABILITY %s; SELECT, UID FETCH identical" % " ".join(caps)
    finally:
        try:
            m.logout()
        except Exception:
            pass


def imaplib_authenticate_plain(port):
    m = imap(port)
    try:
        typ, data = m.authenticate("PLAIN", lambda ch: ("\0%s\0%s" % (USER, PW)).encode())
        expect(typ == "OK", "AUTHENTICATE PLAIN: %s %r" % (typ, data))
        typ, data = m.select("INBOX", readonly=True)
        expect(typ == "OK", "SELECT: %s %r" % (typ, data))
        same(imap_fetch_uid(m, 1), SEED, "UID 1")
        return data[0].decode() + " messages"
    finally:
        try:
            m.logout()
        except Exception:
            pass


def imap_case_insensitive_user():
    m = imap(PX["imap"])
    try:
        typ, data = m.login(USER.upper(), PW)
        expect(typ == "OK", "LOGIN %s: %s %r" % (USER.upper(), typ, data))
        return "LOGIN %s accepted" % USER.upper()
    finally:
        try:
            m.logout()
        except Exception:
            pass


def poplib_user_pass(port):
    p = pop3(port)
    try:
        p.user(USER)
        p.pass_(PW)
        count, size = p.stat()
        expect(count >= 1, "STAT: %d messages" % count)
        same(pop3_retr(p, 1), SEED, "RETR 1")
        uidl = p.uidl()
        expect(uidl[0].startswith(b"+OK"), "UIDL: %r" % (uidl,))
        return "STAT %d %d; RETR 1 identical" % (count, size)
    finally:
        try:
            p.quit()
        except Exception:
            pass


def pop3_auth_plain(port):
    c = Line(port)
    try:
        c.line()
        c.send("AUTH PLAIN")
        r = c.line()
        expect(r.startswith("+"), "AUTH PLAIN: %s" % r)
        c.send(b64("\0%s\0%s" % (USER, PW)))
        r = c.line()
        expect(r.startswith("+OK"), "AUTH PLAIN response: %s" % r)
        c.send("STAT")
        s = c.line()
        expect(s.startswith("+OK"), "STAT: %s" % s)
        c.send("QUIT")
        return "%s; %s" % (r, s)
    finally:
        c.close()


def curl_pop3(port):
    listing = curl("pop3://%s:%d/" % (HOST, port), "-u", "%s:%s" % (USER, PW))
    expect(re.match(rb"1 \d+\r\n", listing), "LIST: %r" % listing[:200])
    out = curl("pop3://%s:%d/1" % (HOST, port), "-u", "%s:%s" % (USER, PW))
    same(out, SEED, "message 1 via curl pop3")
    return "LIST %d lines; RETR 1 identical" % listing.count(b"\n")


SENT = []  # (label, message-id, bytes, how)


def send_smtplib(label, port, mech="PLAIN", local_starttls=False, big=False):
    mid, msg = make_message(label, big)
    s = smtplib.SMTP(HOST, port, timeout=TIMEOUT)
    s.user, s.password = USER, PW  # what auth_plain / auth_login read
    try:
        if local_starttls:
            s.starttls(context=client_ctx())
        s.ehlo()
        expect("auth" in s.esmtp_features, "EHLO has no AUTH: %r" % s.esmtp_features)
        if mech == "PLAIN":
            code, resp = s.auth("PLAIN", s.auth_plain)
        else:
            code, resp = s.auth("LOGIN", s.auth_login)
        expect(code == 235, "AUTH %s: %d %r" % (mech, code, resp))
        refused = s.sendmail(USER, [USER], msg)
        expect(not refused, "refused recipients: %r" % refused)
    finally:
        try:
            s.quit()
        except Exception:
            pass
    SENT.append((label, mid, msg))
    return "%s, %d bytes accepted" % (mid, len(msg))


def send_curl(label, port, *opts):
    mid, msg = make_message(label)
    path = os.path.join(ENV["tmp"], "msg-%s.eml" % label)
    with open(path, "wb") as f:
        f.write(msg)
    curl("smtp://%s:%d" % (HOST, port), "--mail-from", USER, "--mail-rcpt", USER,
         "-T", path, "-u", "%s:%s" % (USER, PW), *opts)
    SENT.append((label, mid, msg))
    return "%s, %d bytes accepted" % (mid, len(msg))


def wait_delivered(mid, secs=20):
    end = time.time() + secs
    md = ENV["maildir"]
    needle = ("Message-ID: %s" % mid).encode()
    while time.time() < end:
        for sub in ("new", "cur"):
            d = os.path.join(md, sub)
            for name in os.listdir(d):
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        if needle in f.read():
                            return True
                except OSError:
                    pass
        time.sleep(0.1)
    raise AssertionError("%s not delivered into the Maildir within %d s" % (mid, secs))


def read_back(label, mid, msg):
    wait_delivered(mid)
    # IMAP, imaplib, through the implicit-TLS-upstream listener
    m = imap(PX["imap"])
    try:
        m.login(USER, PW)
        m.select("INBOX", readonly=True)
        uid = imap_find(m, mid)
        same(own_part(imap_fetch_uid(m, uid), msg), msg, "IMAP (imaplib) BODY[]")
    finally:
        m.logout()
    # IMAP, curl, through the STARTTLS-upstream listener
    out = curl("imap://%s:%d/INBOX;UID=%d" % (HOST, PX["imap_starttls"], uid),
               "-u", "%s:%s" % (USER, PW))
    same(own_part(out, msg), msg, "IMAP (curl) BODY[]")
    # POP3, poplib, implicit TLS upstream
    p = pop3(PX["pop3"])
    try:
        p.user(USER)
        p.pass_(PW)
        n = pop3_find(p, mid)
        same(own_part(pop3_retr(p, n), msg), msg, "POP3 (poplib) RETR")
    finally:
        p.quit()
    # POP3, curl, STLS upstream
    out = curl("pop3://%s:%d/%d" % (HOST, PX["pop3_starttls"], n), "-u", "%s:%s" % (USER, PW))
    same(own_part(out, msg), msg, "POP3 (curl) RETR")
    return "UID %d / POP3 #%d: %d bytes identical via imaplib, curl imap, poplib, curl pop3" % (
        uid, n, len(msg))


def dovecot_saw_xoauth2():
    text = open(DLOG, encoding="utf-8", errors="replace").read()
    seen = []
    for name in ("imaps", "imap", "submissions", "submission", "pop3s", "pop3"):
        port = DV[name]
        ms = re.findall(LOGIN_RE % (re.escape(USER), port), text)
        expect(ms, "no Dovecot login line for %s (port %d)" % (name, port))
        methods = {m[0] for m in ms}
        expect(methods == {"XOAUTH2"}, "%s logins used %s" % (name, methods))
        expect(all(m[1] == "TLS" for m in ms), "%s logins not all over TLS: %r" % (name, ms))
        seen.append("%s:%d" % (name, len(ms)))
    others = re.findall(r"Login: user=<[^>]*>, method=(\S+),", text)
    expect(set(others) == {"XOAUTH2"}, "methods seen: %s" % set(others))
    return "method=XOAUTH2 over TLS, logins per Dovecot listener: " + " ".join(seen)


def starttls_really_used():
    text = open(DLOG, encoding="utf-8", errors="replace").read()
    out = []
    for name in ("imap", "submission", "pop3"):
        pat = (r"Login: user=<%s>, method=XOAUTH2, rip=127\.0\.0\.1, lip=127\.0\.0\.2, "
               r"lport=%d, mpid=\d+, TLS, (TLSv1\.[23])") % (re.escape(USER), DV[name])
        m = re.search(pat, text)
        expect(m, "no TLS login on the %s STARTTLS port %d" % (name, DV[name]))
        out.append("%s %s" % (name, m.group(1)))
    return "rip 127.0.0.1 != lip 127.0.0.2, so Dovecot demanded TLS: " + ", ".join(out)


def no_ca_refused():
    r = imap_login_line(PX["imap_noca"])
    expect(r.startswith("a1 NO [UNAVAILABLE]"), "IMAP via listener without upstream_ca: %s" % r)
    return r[:110]


def password_remove_live():
    out = subprocess.run([ENV["bin"], "password", "add", USER, "-c", ENV["config"],
                          "--label", "temporary"], capture_output=True, timeout=60)
    expect(out.returncode == 0, "password add: %r" % out.stderr)
    tmp_pw = out.stdout.decode().strip().splitlines()[-1]
    r = imap_login_line(PX["imap"], pw=tmp_pw)
    expect(r.startswith("a1 OK"), "login with the new password: %s" % r)
    out = subprocess.run([ENV["bin"], "password", "remove", USER, "temporary", "-c",
                          ENV["config"]], capture_output=True, timeout=60)
    expect(out.returncode == 0, "password remove: %r" % out.stderr)
    r = imap_login_line(PX["imap"], pw=tmp_pw)
    expect(r.startswith("a1 NO [AUTHENTICATIONFAILED]"), "login after remove: %s" % r)
    r = imap_login_line(PX["imap"])
    expect(r.startswith("a1 OK"), "the other password after remove: %s" % r)
    return "new password worked, refused right after `password remove` in the running serve"


def expired_token(proto):
    fg("/control/expire-access-tokens")
    s0 = stats()
    off = log_size(DLOG)
    detail = {"imap": lambda: imap_ok(PX["imap"]),
              "smtp": lambda: smtp_ok(PX["smtp"]),
              "pop3": lambda: pop3_ok(PX["pop3"])}[proto]()
    s1 = stats()
    expect(s1["token_requests"] - s0["token_requests"] == 1,
           "token requests went %d -> %d, expected +1"
           % (s0["token_requests"], s1["token_requests"]))
    expect(s1["introspections"] - s0["introspections"] == 2
           and s1["introspections_active"] - s0["introspections_active"] == 1,
           "introspections %r -> %r: expected one rejected and one accepted token" % (s0, s1))
    text = wait_log(DLOG, off, r"Login: ")
    expect("Introspection failed" in text or "not valid" in text,
           "Dovecot log shows no rejected token: %s" % text.strip()[-300:])
    expect(re.search(r"Login: user=<%s>, method=XOAUTH2" % re.escape(USER), text),
           "Dovecot log shows no XOAUTH2 login: %s" % text.strip()[-300:])
    return "Dovecot rejected the cached token, proxy refreshed once and logged in (%s)" % detail


def endpoint_down():
    fg("/control/expire-access-tokens")
    fg("/control/down")
    try:
        r1 = imap_login_line(PX["imap"])
        r2 = smtp_auth_line(PX["smtp"])
        r3 = pop3_pass_line(PX["pop3"])
        time.sleep(1.2)  # past the proxy's memory of a temporary failure
        r4 = imap_login_line(PX["imap_starttls"])
    finally:
        fg("/control/up")
    errs = []
    if not r1.startswith("a1 NO [UNAVAILABLE]"):
        errs.append("IMAP: %s" % r1)
    if not r2.startswith("454 4.7.0"):
        errs.append("SMTP: %s" % r2)
    if not r3.startswith("-ERR [SYS/TEMP]"):
        errs.append("POP3: %s" % r3)
    if not r4.startswith("a1 NO [UNAVAILABLE]"):
        errs.append("IMAP after 1.2 s: %s" % r4)
    expect(not errs, "; ".join(errs))
    return "IMAP %r | SMTP %r | POP3 %r" % (r1[:60], r2[:40], r3[:40])


def endpoint_back_up():
    time.sleep(1.2)
    s0 = stats()
    n = imap_ok(PX["imap"])
    smtp_ok(PX["smtp"])
    pop3_ok(PX["pop3"])
    s1 = stats()
    expect(s1["token_ok"] - s0["token_ok"] == 1,
           "token grants %d -> %d, expected one refresh for three logins"
           % (s0["token_ok"], s1["token_ok"]))
    return "IMAP (%d messages), SMTP, POP3 logins succeed with one new token" % n


def revoked():
    fg("/control/revoke", {"refresh_token": ENV["refresh_token"]})
    fg("/control/expire-access-tokens")
    s0 = stats()
    r1 = imap_login_line(PX["imap"])
    r2 = smtp_auth_line(PX["smtp"])
    r3 = pop3_pass_line(PX["pop3"])
    r4 = imap_login_line(PX["imap_starttls"])
    s1 = stats()
    errs = []
    for proto, r, prefix in (("IMAP", r1, "a1 NO [AUTHENTICATIONFAILED]"), ("SMTP", r2, "535"),
                             ("POP3", r3, "-ERR [AUTH]"),
                             ("IMAP again", r4, "a1 NO [AUTHENTICATIONFAILED]")):
        if not r.startswith(prefix) or "xoauth2-proxy login" not in r:
            errs.append("%s: %r (want %s ... `xoauth2-proxy login`)" % (proto, r, prefix))
    if s1["token_requests"] - s0["token_requests"] != 1:
        errs.append("token requests %d -> %d for 4 logins, expected +1 (a revoked refresh token "
                    "is remembered)" % (s0["token_requests"], s1["token_requests"]))
    expect(not errs, "; ".join(errs))
    return "IMAP %r | SMTP %r | POP3 %r" % (r1[:70], r2[:50], r3[:50])


def reimport_recovers():
    new = "1//interop-refresh-new-" + secrets.token_hex(6)
    fg("/control/add-refresh-token", {"refresh_token": new, "email": USER})
    p = subprocess.run([ENV["bin"], "import", USER, "-c", ENV["config"], "--refresh-token-stdin"],
                       input=(new + "\n").encode(), capture_output=True, timeout=60)
    expect(p.returncode == 0, "import: exit %d %r" % (p.returncode, p.stderr))
    r = imap_login_line(PX["imap"])
    expect(r.startswith("a1 OK"), "IMAP after re-import: %s" % r)
    r2 = smtp_auth_line(PX["smtp"])
    expect(r2.startswith("235"), "SMTP after re-import: %s" % r2)
    r3 = pop3_pass_line(PX["pop3"])
    expect(r3.startswith("+OK"), "POP3 after re-import: %s" % r3)
    return "running serve picked up the new refresh token: %s" % r[:50]


def no_secrets_in_log():
    text = open(ENV["proxy_log"], encoding="utf-8", errors="replace").read()
    found = [what for what, s in (("app password", PW), ("refresh token", ENV["refresh_token"]),
                                  ("access token", "ya29.interop-")) if s in text]
    expect(not found, "proxy log contains: %s" % ", ".join(found))
    return "%d log lines, no app password, refresh or access token" % text.count("\n")


def main():
    t0 = time.time()
    check("rig: Dovecot on 127.0.0.2 refuses authentication before STARTTLS", rig_requires_starttls)
    s_start = stats()
    check("local auth: wrong password / unknown user refused locally in IMAP, SMTP, POP3",
          wrong_password)

    # --- IMAP
    check("imap: curl lists mailboxes (imap listener, upstream implicit TLS)",
          curl_imap_list, PX["imap"])
    check("imap: curl fetches UID 1 (default AUTHENTICATE PLAIN)", curl_imap_fetch_seed,
          PX["imap"])
    check("imap: curl lists mailboxes (upstream STARTTLS)", curl_imap_list, PX["imap_starttls"])
    check("imap: curl fetches UID 1 (upstream STARTTLS)", curl_imap_fetch_seed,
          PX["imap_starttls"])
    check("imap: curl --login-options AUTH=LOGIN (SASL LOGIN)", curl_imap_fetch_seed,
          PX["imap"], "--login-options", "AUTH=LOGIN")
    check("imap: imaplib LOGIN, SELECT, FETCH (upstream implicit TLS)", imaplib_login_fetch,
          PX["imap"])
    check("imap: imaplib LOGIN, SELECT, FETCH (upstream STARTTLS)", imaplib_login_fetch,
          PX["imap_starttls"])
    check("imap: imaplib AUTHENTICATE PLAIN (no initial response)", imaplib_authenticate_plain,
          PX["imap"])
    check("imap: curl imaps:// to a local implicit-TLS listener", curl_imaps_local)
    check("imap: imaplib IMAP4_SSL to a local implicit-TLS listener", imaplib_login_fetch,
          PX["imaps_local"], True)
    check("imap: username is case-insensitive", imap_case_insensitive_user)

    # --- POP3
    check("pop3: poplib USER/PASS, STAT, RETR, UIDL (upstream implicit TLS)", poplib_user_pass,
          PX["pop3"])
    check("pop3: poplib USER/PASS, STAT, RETR, UIDL (upstream STLS)", poplib_user_pass,
          PX["pop3_starttls"])
    check("pop3: AUTH PLAIN (two-step)", pop3_auth_plain, PX["pop3"])
    check("pop3: curl lists and retrieves (upstream implicit TLS)", curl_pop3, PX["pop3"])
    check("pop3: curl lists and retrieves (upstream STLS)", curl_pop3, PX["pop3_starttls"])

    # --- SMTP
    check("smtp: smtplib AUTH PLAIN + send 200 KB (upstream implicit TLS, 465-style)",
          send_smtplib, "smtplib-plain-big", PX["smtp"], "PLAIN", False, True)
    check("smtp: smtplib AUTH LOGIN + send (upstream STARTTLS, 587-style)", send_smtplib,
          "smtplib-login", PX["smtp_starttls"], "LOGIN")
    check("smtp: curl sends (default AUTH PLAIN, upstream STARTTLS)", send_curl, "curl-plain",
          PX["smtp_starttls"])
    check("smtp: curl sends with --login-options AUTH=LOGIN (upstream implicit TLS)", send_curl,
          "curl-login", PX["smtp"], "--login-options", "AUTH=LOGIN")
    check("smtp: smtplib STARTTLS to a local STARTTLS listener + send", send_smtplib,
          "smtplib-local-starttls", PX["smtp_local_starttls"], "PLAIN", True)
    check("smtp: curl --ssl-reqd to a local STARTTLS listener", send_curl, "curl-local-starttls",
          PX["smtp_local_starttls"], "--ssl-reqd", "--cacert", ENV["ca"])

    for label, mid, msg in list(SENT):
        check("delivery: %s delivered and read back byte-identical" % label, read_back, label,
              mid, msg)

    s_happy = stats()
    check("tokens: one refresh served every login so far (access token cached)",
          lambda: (expect(s_happy["token_ok"] - s_start["token_ok"] == 1,
                          "token grants %d -> %d" % (s_start["token_ok"], s_happy["token_ok"]))
                   or "%d introspections, 1 token grant" % (
                       s_happy["introspections"] - s_start["introspections"])))
    check("dovecot: every upstream login used XOAUTH2 over TLS", dovecot_saw_xoauth2)
    check("dovecot: STARTTLS upstream really negotiated TLS on 127.0.0.2", starttls_really_used)
    check("tls: a listener without upstream_ca refuses the test CA (NO [UNAVAILABLE])",
          no_ca_refused)
    check("cli: password remove takes effect in the running serve", password_remove_live)

    # --- failure paths against the real server
    for proto in ("imap", "smtp", "pop3"):
        check("expired access token (%s): proxy answers the challenge, refreshes, logs in" % proto,
              expired_token, proto)
    check("token endpoint down: temporary failure (IMAP NO [UNAVAILABLE], SMTP 454 4.7.0, "
          "POP3 -ERR [SYS/TEMP])", endpoint_down)
    check("token endpoint back up: logins succeed again", endpoint_back_up)
    check("revoked refresh token: auth failure naming `xoauth2-proxy login` in all three",
          revoked)
    check("revoked: `xoauth2-proxy import` of a new token recovers the running serve",
          reimport_recovers)
    check("logs: no secrets in the proxy log", no_secrets_in_log)
    print("client checks took %.1f s" % (time.time() - t0))


if __name__ == "__main__":
    main()
