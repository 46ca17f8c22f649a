#!/usr/bin/env python3
"""The client side of the cluster phase (cluster.sh): 200 messages through HAProxy to three
xoauth2-proxy replicas on one Redis, one replica killed with SIGKILL after the first 60. Each
message goes on a connection of its own from 127.0.0.3 (so the replicas can only learn that
address from the PROXY header); a connection that breaks is retried through HAProxy. Every
message must reach Dovecot's Maildir exactly once, byte-identical.

    cluster_smtp.py ENV_JSON HAPROXY_PORT PID_TO_KILL REPLICA_LOG...

Prints PASS:/FAIL: lines like checks.py. Python 3 standard library only.
"""

import os
import re
import signal
import smtplib
import sys
import time

ENV_PATH, HA_PORT, VICTIM = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
REPLICA_LOGS = sys.argv[4:]
sys.argv = [sys.argv[0], ENV_PATH]  # checks.py reads its env from argv[1]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checks  # noqa: E402  (make_message, own_part, same, check, stats)

COUNT = 200
KILL_AFTER = 60
SOURCE = "127.0.0.3"
TRIES = 10


def send_once(msg):
    s = smtplib.SMTP("127.0.0.1", HA_PORT, timeout=20, source_address=(SOURCE, 0))
    try:
        s.ehlo()
        s.user, s.password = checks.USER, checks.PW
        code, resp = s.auth("PLAIN", s.auth_plain)
        checks.expect(code == 235, "AUTH PLAIN: %d %r" % (code, resp))
        refused = s.sendmail(checks.USER, [checks.USER], msg)
        checks.expect(not refused, "refused recipients: %r" % refused)
    finally:
        try:
            s.quit()
        except Exception:
            pass


def send_all():
    """Send every message, retrying broken connections; returns (sent, retries)."""
    sent, retries = [], 0
    for i in range(COUNT):
        if i == KILL_AFTER:
            os.kill(VICTIM, signal.SIGKILL)
        mid, msg = checks.make_message("cluster-%03d" % i)
        for attempt in range(TRIES):
            try:
                send_once(msg)
                break
            except (OSError, smtplib.SMTPException) as e:
                # A client cannot know whether a broken DATA was delivered; a retry of one
                # that was would show as a duplicate below.
                retries += 1
                checks.expect(attempt + 1 < TRIES, "message %d: %r" % (i, e))
                time.sleep(0.2)
        sent.append((mid, msg))
    return sent, retries


def delivered(mids, secs=60):
    """Message-ID -> list of delivered file contents, once all arrived (or the time is up)."""
    md = checks.ENV["maildir"]
    end = time.time() + secs
    while True:
        found = {m: [] for m in mids}
        for sub in ("new", "cur"):
            d = os.path.join(md, sub)
            for name in os.listdir(d):
                try:
                    data = open(os.path.join(d, name), "rb").read()
                except OSError:
                    continue
                for m in re.findall(rb"(?mi)^Message-ID: (<cluster-[^>]+>)", data):
                    m = m.decode()
                    if m in found:
                        found[m].append(data.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))
        if all(found.values()) or time.time() > end:
            return found
        time.sleep(0.5)


STATE = {}


def run_storm():
    s0 = checks.stats()
    sent, retries = send_all()
    STATE["sent"], STATE["grants"] = sent, checks.stats()["token_ok"] - s0["token_ok"]
    try:
        os.kill(VICTIM, 0)
        raise AssertionError("the replica to kill (pid %d) is still alive" % VICTIM)
    except ProcessLookupError:
        pass
    return "%d messages accepted through HAProxy, replica pid %d killed after %d, %d retries" % (
        len(sent), VICTIM, KILL_AFTER, retries)


def exactly_once():
    sent = STATE["sent"]
    found = delivered([m for m, _ in sent])
    missing = [m for m, got in found.items() if not got]
    twice = [m for m, got in found.items() if len(got) > 1]
    checks.expect(not missing, "%d not delivered, e.g. %s" % (len(missing), missing[:3]))
    checks.expect(not twice, "%d delivered more than once, e.g. %s" % (len(twice), twice[:3]))
    for mid, msg in sent:
        checks.same(checks.own_part(found[mid][0], msg), msg, mid)
    return "%d of %d in the Maildir once each, byte-identical" % (len(sent), len(sent))


def real_client_address():
    logins, wrong = 0, []
    for path in REPLICA_LOGS:
        for line in open(path, encoding="utf-8", errors="replace"):
            if "logged in" in line:
                logins += 1
                if "peer=%s:" % SOURCE not in line:
                    wrong.append(line.strip()[:160])
    checks.expect(logins >= COUNT, "only %d logins logged" % logins)
    checks.expect(not wrong, "logins not from %s: %s" % (SOURCE, wrong[:2]))
    per = [sum(1 for l in open(p, errors="replace") if "logged in" in l) for p in REPLICA_LOGS]
    checks.expect(all(n > 0 for n in per), "a replica served no login: %s" % per)
    return "all %d logins logged with peer %s (per replica: %s)" % (logins, SOURCE, per)


def one_grant():
    checks.expect(STATE["grants"] == 1, "token grants during the run: %d" % STATE["grants"])
    return "3 replicas, 1 token grant (shared through Redis)"


def main():
    if not checks.check("cluster: 200 messages via HAProxy, one replica SIGKILLed midway",
                        run_storm):
        return
    checks.check("cluster: all 200 delivered exactly once, byte-identical", exactly_once)
    checks.check("cluster: replicas saw the client's address from the PROXY v2 header",
                 real_client_address)
    checks.check("cluster: one token refresh served all replicas", one_grant)


if __name__ == "__main__":
    main()
