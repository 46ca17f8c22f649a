#!/usr/bin/env python3
"""Log in with Python's poplib (USER/PASS) and write every message to OUTDIR/N.eml.

usage: pop3_fetch.py HOST PORT USER PASSWORD MODE CAFILE OUTDIR   (MODE: plain | stls | ssl)
Prints "ok N" with the number of messages, or "error <type>: <text>" and exits 1.
"""
import os
import poplib
import ssl
import sys


def main():
    host, port, user, password, mode, cafile, outdir = sys.argv[1:8]
    try:
        ctx = ssl.create_default_context(cafile=cafile)
        if mode == "ssl":
            p = poplib.POP3_SSL(host, int(port), context=ctx, timeout=60)
        else:
            p = poplib.POP3(host, int(port), timeout=60)
            if mode == "stls":
                p.stls(context=ctx)
        p.user(user)
        p.pass_(password)
        count, _size = p.stat()
        for i in range(1, count + 1):
            _resp, lines, _octets = p.retr(i)
            with open(os.path.join(outdir, "%d.eml" % i), "wb") as f:
                f.write(b"\r\n".join(lines) + b"\r\n")
        p.quit()
        print("ok %d" % count)
    except Exception as e:
        print("error %s: %s" % (type(e).__name__, e))
        sys.exit(1)


if __name__ == "__main__":
    main()
