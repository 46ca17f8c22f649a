#!/usr/bin/env python3
"""A minimal SMTP relay that hands every message to an LMTP server (Dovecot LMTP).

Dovecot submission relays with SMTP (EHLO), which Dovecot LMTP refuses ("500 5.5.1 Unknown
command"), so this sits between them: it accepts EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT
and forwards each message unchanged (dot-unstuffed here, re-stuffed by smtplib) to LMTP.
Python 3 standard library only.

Usage: smtp_to_lmtp.py --port N --lmtp-host H --lmtp-port P
"""

import argparse
import smtplib
import socketserver
import sys
import time

ARGS = None


def log(msg):
    sys.stderr.write("%s %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def addr(arg):
    """The address inside <...> of 'FROM:<a@b> PARAM=...'."""
    start, end = arg.find("<"), arg.find(">")
    if start < 0 or end < start:
        return None
    return arg[start + 1:end]


class Handler(socketserver.StreamRequestHandler):
    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        self.reply("220 smtp-to-lmtp ESMTP ready")
        mail_from, rcpts = None, []
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self.reply("250-smtp-to-lmtp")
                self.reply("250-8BITMIME")
                self.reply("250 ENHANCEDSTATUSCODES")
            elif verb == "HELO":
                self.reply("250 smtp-to-lmtp")
            elif verb == "MAIL":
                mail_from, rcpts = addr(arg), []
                self.reply("250 2.1.0 OK" if mail_from is not None else "501 5.5.4 bad MAIL")
            elif verb == "RCPT":
                a = addr(arg)
                if mail_from is None or not a:
                    self.reply("503 5.5.1 MAIL first")
                else:
                    rcpts.append(a)
                    self.reply("250 2.1.5 OK")
            elif verb == "DATA":
                if not rcpts:
                    self.reply("503 5.5.1 RCPT first")
                    continue
                self.reply("354 go ahead")
                chunks = []
                while True:
                    l = self.rfile.readline(1 << 20)
                    if not l:
                        return
                    if l == b".\r\n" or l == b".\n":
                        break
                    if l.startswith(b"."):
                        l = l[1:]
                    chunks.append(l)
                data = b"".join(chunks)
                try:
                    with smtplib.LMTP(ARGS.lmtp_host, ARGS.lmtp_port) as lmtp:
                        lmtp.sendmail(mail_from, rcpts, data)
                    log("delivered %d bytes from <%s> to %s" % (len(data), mail_from, rcpts))
                    self.reply("250 2.0.0 delivered by LMTP")
                except Exception as e:  # report, never hide
                    log("LMTP delivery failed: %r" % (e,))
                    self.reply("451 4.3.0 LMTP delivery failed")
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                self.reply("250 2.0.0 OK")
            elif verb == "NOOP":
                self.reply("250 2.0.0 OK")
            elif verb == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("502 5.5.1 not implemented")


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--lmtp-host", default="127.0.0.1")
    ap.add_argument("--lmtp-port", type=int, required=True)
    ARGS = ap.parse_args()
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    server = socketserver.ThreadingTCPServer((ARGS.host, ARGS.port), Handler)
    log("smtp-to-lmtp listening on %s:%d -> LMTP %s:%d"
        % (ARGS.host, ARGS.port, ARGS.lmtp_host, ARGS.lmtp_port))
    server.serve_forever()


if __name__ == "__main__":
    main()
