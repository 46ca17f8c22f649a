#!/usr/bin/env python3
"""Send message files through an SMTP server with Python's smtplib (a real client).

usage: smtp_send.py HOST PORT USER PASSWORD MODE CAFILE SESSIONS FILE...
MODE: plain | starttls | ssl. Each of SESSIONS parallel sessions sends every FILE once.
Prints one line per session: "ok N" or "error <type>: <text>"; exit 1 if any failed.
Passwords come from the command line of a test process on loopback only.
"""
import smtplib
import ssl
import sys
import threading


def session(host, port, user, password, mode, cafile, files, results, i):
    try:
        ctx = ssl.create_default_context(cafile=cafile)
        if mode == "ssl":
            s = smtplib.SMTP_SSL(host, port, context=ctx, timeout=60)
        else:
            s = smtplib.SMTP(host, port, timeout=60)
        with s:
            s.ehlo("client.example")
            if mode == "starttls":
                s.starttls(context=ctx)
                s.ehlo("client.example")
            s.login(user, password)
            for path in files:
                with open(path, "rb") as f:
                    data = f.read()
                opts = ["BODY=8BITMIME"]
                if b"\xc3" in data.split(b"\r\n\r\n", 1)[0]:
                    opts.append("SMTPUTF8")
                s.sendmail(user, ["bob@example.org"], data, mail_options=opts)
        results[i] = "ok %d" % len(files)
    except Exception as e:  # report, never hide
        results[i] = "error %s: %s" % (type(e).__name__, e)


def main():
    host, port, user, password, mode, cafile, sessions = sys.argv[1:8]
    files = sys.argv[8:]
    n = int(sessions)
    results = [None] * n
    threads = [
        threading.Thread(target=session, args=(host, int(port), user, password, mode, cafile, files, results, i))
        for i in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        print(r)
    sys.exit(0 if all(r and r.startswith("ok") for r in results) else 1)


if __name__ == "__main__":
    main()
