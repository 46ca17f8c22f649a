"""The README's client recipes, run by real clients against the proxy in front of Dovecot,
with exactly the settings the README prints (its `<!-- recipe: NAME -->` blocks); only the
account, the ports and the password are replaced by the interop runner's own.

    python3 recipes.py ENV_JSON README.md

Prints PASS:/FAIL: lines like checks.py.
"""

import json
import os
import pty
import re
import select
import smtplib
import subprocess
import sys
import time
import uuid
from pathlib import Path

ENV = json.load(open(sys.argv[1]))
README = Path(sys.argv[2]).read_text()
ROOT = Path(ENV["tmp"]) / "recipes"
MAILDIR = Path(ENV["maildir"])
USER = ENV["user"]
SEEDED = "seeded message for the interop test"

RECIPE = re.compile(r"<!-- recipe: ([\w-]+) -->\n```[\w]*\n(.*?)```", re.S)
RECIPES = dict(RECIPE.findall(README))

failed = 0


def check(ok, what):
    global failed
    print(("PASS: " if ok else "FAIL: ") + what, flush=True)
    if not ok:
        failed += 1


def recipe(name):
    """The README's block, made to point at this runner's proxy."""
    text = RECIPES[name]
    ports = {"1143": ENV["proxy"]["imap"], "1587": ENV["proxy"]["smtp"], "1110": ENV["proxy"]["pop3"]}
    text = re.sub(r"\b(1143|1587|1110)\b", lambda m: str(ports[m.group(1)]), text)
    return (text.replace("alice%40gmail.com", USER.replace("@", "%40"))
            .replace("alice@gmail.com", USER)
            .replace("APP_PASSWORD", ENV["password"]))


# The clients run as an ordinary user, as people run them (getmail refuses to deliver as root).
NOBODY = 65534 if os.geteuid() == 0 else None


def home(name, files, dirs=()):
    """A fresh HOME for one client, with its config files (0600, as the clients demand)."""
    h = ROOT / name
    h.mkdir(parents=True)
    for d in dirs:
        (h / d).mkdir(parents=True)
    for rel, text in files.items():
        path = h / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
    if NOBODY is not None:
        for path in [h, *h.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
    return h


def client_env(h):
    return {"HOME": str(h), "PATH": os.environ["PATH"], "LANG": "C.UTF-8", "TERM": "xterm"}


def become_client():
    if NOBODY is not None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def run(h, argv, stdin=None, timeout=60):
    try:
        p = subprocess.run(argv, cwd=h, env=client_env(h), input=stdin, capture_output=True,
                           text=True, timeout=timeout, preexec_fn=become_client)
        return p.returncode, (p.stdout + p.stderr).strip()
    except subprocess.TimeoutExpired:
        return None, "timed out"


def tail(out, n=3):
    return " | ".join(out.splitlines()[-n:])


def delivered(subject, secs=15):
    """Whether Dovecot stored a message with this subject (the proxy -> submission -> LMTP)."""
    end = time.time() + secs
    while time.time() < end:
        for sub in ("new", "cur"):
            for f in (MAILDIR / sub).iterdir():
                try:
                    if subject in f.read_text(errors="replace"):
                        return True
                except OSError:
                    pass
        time.sleep(0.2)
    return False


def send_unseen():
    """A new (unseen) message, sent through the proxy: fetchmail's IMAP fetches only those."""
    subject = f"unseen {uuid.uuid4().hex[:8]}"
    with smtplib.SMTP("127.0.0.1", ENV["proxy"]["smtp"], timeout=30) as smtp:
        smtp.login(USER, ENV["password"])
        smtp.sendmail(USER, [USER], f"Subject: {subject}\r\n\r\nfor fetchmail\r\n")
    delivered(subject)
    return subject


def fetchmail(name):
    h = home(name, {".fetchmailrc": recipe(name)})
    wanted = send_unseen() if name.endswith("imap") else SEEDED
    rc, out = run(h, ["fetchmail", "--nodetach", "--nosyslog"])
    mbox = h / "fetched.mbox"
    got = mbox.exists() and wanted in mbox.read_text(errors="replace")
    check(rc == 0 and got, f"recipe {name}: fetchmail fetched {wanted!r} (exit {rc}: {tail(out)})")
    # The trap the README names: without `sslproto ''` fetchmail insists on TLS.
    h = home(name + "-without-sslproto", {".fetchmailrc": recipe(name).replace("    sslproto ''\n", "")})
    rc, out = run(h, ["fetchmail", "--nodetach", "--nosyslog"])
    check(rc not in (0, 1) and not (h / "fetched.mbox").exists(),
          f"recipe {name}: the trap is real: without sslproto '' fetchmail gives up (exit {rc}: {tail(out, 2)})")


def getmail():
    h = home("getmail-imap", {".config/getmail/getmailrc": recipe("getmail-imap")},
             dirs=["Maildir/cur", "Maildir/new", "Maildir/tmp"])
    rc, out = run(h, ["getmail"])
    got = any(SEEDED in f.read_text(errors="replace") for f in (h / "Maildir" / "new").iterdir())
    check(rc == 0 and got, f"recipe getmail-imap: getmail stored the seeded message (exit {rc}: {tail(out)})")


def mutt_read(program):
    """mutt in a terminal: open INBOX over IMAP, pipe the first message to a file, quit."""
    h = home(program, {".muttrc": recipe("mutt")})
    out_file = h / "piped.txt"
    keys = f'push "<limit>~s seeded<enter><pipe-message>cat > {out_file}<enter><quit>"'
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(h)
        become_client()
        os.execvpe(program, [program, "-F", str(h / ".muttrc"), "-e", "set quit=yes wait_key=no",
                             "-e", keys], client_env(h))
    screen = b""
    end = time.time() + 45
    status = None
    while time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            screen = (screen + chunk)[-4096:]
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    os.close(fd)
    got = out_file.exists() and SEEDED in out_file.read_text(errors="replace")
    seen = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b" ", screen).decode(errors="replace")
    check(got, f"recipe mutt ({program}): reads INBOX over IMAP and pipes the seeded message "
               f"(exit status {status}; screen: {' '.join(seen.split())[-160:]})")


def mutt_send(program):
    h = home(program + "-send", {".muttrc": recipe("mutt")})
    subject = f"sent with {program} {uuid.uuid4().hex[:8]}"
    rc, out = run(h, [program, "-F", str(h / ".muttrc"), "-s", subject, "--", USER],
                  stdin=f"Hello from {program}.\n")
    check(rc == 0 and delivered(subject),
          f"recipe mutt ({program}): sends over SMTP and Dovecot stores it (exit {rc}: {tail(out)})")


def msmtp():
    h = home("msmtp", {".msmtprc": recipe("msmtp")})
    subject = f"sent with msmtp {uuid.uuid4().hex[:8]}"
    message = f"From: {USER}\nTo: {USER}\nSubject: {subject}\n\nHello from msmtp.\n"
    rc, out = run(h, ["msmtp", "-t"], stdin=message)
    check(rc == 0 and delivered(subject), f"recipe msmtp: sends and Dovecot stores it (exit {rc}: {tail(out)})")
    # The trap the README names: `auth on` never sends a password without TLS.
    h = home("msmtp-auth-on", {".msmtprc": recipe("msmtp").replace("auth plain", "auth on")})
    rc, out = run(h, ["msmtp", "-t"], stdin=message)
    check(rc not in (0, None), f"recipe msmtp: the trap is real: with `auth on` msmtp refuses (exit {rc}: {tail(out, 3)})")


def phpmailer():
    subject = f"sent with PHPMailer {uuid.uuid4().hex[:8]}"
    script = recipe("phpmailer").replace("'sent with PHPMailer'", f"'{subject}'")
    h = home("phpmailer", {"send.php": script})
    rc, out = run(h, ["php", "send.php"])
    check(rc == 0 and delivered(subject), f"recipe phpmailer: sends and Dovecot stores it (exit {rc}: {tail(out)})")


def python():
    subject = f"sent with smtplib {uuid.uuid4().hex[:8]}"
    script = recipe("python").replace("Subject: sent with smtplib", f"Subject: {subject}")
    h = home("python", {"recipe.py": script})
    python3 = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    rc, out = run(h, [python3, "recipe.py"])
    check(rc == 0 and SEEDED in out and delivered(subject),
          f"recipe python: imaplib reads, poplib counts, smtplib sends (exit {rc}: {tail(out)})")


def curl():
    h = home("curl", {})
    argv = ["bash", "-c", recipe("curl")]
    rc, out = run(h, argv)
    check(rc == 0 and SEEDED in out, f"recipe curl: fetches the seeded message (exit {rc}: {tail(out, 1)})")


# Only for the runner: no first-run screens, update checks or telemetry in a throwaway profile.
QUIET_PROFILE = """
user_pref("mail.provider.suppress_dialog_on_startup", true);
user_pref("mail.shell.checkDefaultClient", false);
user_pref("mailnews.start_page.enabled", false);
user_pref("app.update.enabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("toolkit.telemetry.enabled", false);
user_pref("mail.rights.version", 1);
"""


def nss_encrypt(profile, texts):
    """Thunderbird's password manager entries are sealed with the profile's NSS key (SDR): make
    the key and seal the texts the way Thunderbird does, through libnss3."""
    import base64
    import ctypes
    from ctypes import POINTER, Structure, byref, c_char_p, c_int, c_uint, c_void_p

    class SECItem(Structure):
        _fields_ = [("type", c_uint), ("data", c_void_p), ("len", c_uint)]

    subprocess.run(["certutil", "-N", "-d", f"sql:{profile}", "--empty-password"], check=True)
    nss = ctypes.CDLL("libnss3.so")
    nss.NSS_InitReadWrite.argtypes = [c_char_p]
    nss.PK11_GetInternalKeySlot.restype = c_void_p
    nss.PK11_Authenticate.argtypes = [c_void_p, c_int, c_void_p]
    nss.PK11_FreeSlot.argtypes = [c_void_p]
    nss.PK11SDR_Encrypt.argtypes = [POINTER(SECItem)] * 3 + [c_void_p]
    if nss.NSS_InitReadWrite(f"sql:{profile}".encode()) != 0:
        raise RuntimeError("NSS_InitReadWrite failed")
    slot = nss.PK11_GetInternalKeySlot()
    nss.PK11_Authenticate(slot, 1, None)
    sealed = []
    for text in texts:
        raw = text.encode()
        buf = ctypes.create_string_buffer(raw, len(raw))
        data, keyid, out = SECItem(0, ctypes.cast(buf, c_void_p), len(raw)), SECItem(0, None, 0), SECItem(0, None, 0)
        if nss.PK11SDR_Encrypt(byref(keyid), byref(data), byref(out), None) != 0:
            raise RuntimeError("PK11SDR_Encrypt failed")
        sealed.append(base64.b64encode(ctypes.string_at(out.data, out.len)).decode())
    nss.PK11_FreeSlot(slot)
    nss.NSS_Shutdown()
    return sealed


def thunderbird():
    """Headless Thunderbird with the README's prefs and the app password in its password
    manager (as after the user typed it once) opens INBOX over IMAP through the proxy."""
    h = home("thunderbird", {"profile/user.js": recipe("thunderbird") + QUIET_PROFILE})
    profile = h / "profile"
    user, password = nss_encrypt(profile, [USER, ENV["password"]])
    now = int(time.time() * 1000)
    login = {"id": 1, "hostname": "imap://127.0.0.1", "httpRealm": "imap://127.0.0.1",
             "formSubmitURL": None, "usernameField": "", "passwordField": "",
             "encryptedUsername": user, "encryptedPassword": password,
             "guid": "{" + str(uuid.uuid4()) + "}", "encType": 1, "timeCreated": now,
             "timeLastUsed": now, "timePasswordChanged": now, "timesUsed": 1}
    (profile / "logins.json").write_text(json.dumps({"nextId": 2, "logins": [login], "version": 3}))
    if NOBODY is not None:
        for path in [profile, *profile.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
    proc = subprocess.Popen(["thunderbird", "--headless", "--no-remote", "--profile", str(profile)],
                            cwd=h, env=client_env(h), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=become_client)
    found = False
    end = time.time() + 90
    while time.time() < end and not found and proc.poll() is None:
        for msf in profile.glob("ImapMail/*/INBOX.msf"):
            found = found or SEEDED.encode() in msf.read_bytes()
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    check(found, "recipe thunderbird: headless Thunderbird lists the seeded message in INBOX over IMAP")


def main():
    expected = {"thunderbird", "fetchmail-pop3", "fetchmail-imap", "getmail-imap", "mutt", "msmtp", "phpmailer",
                "python", "curl"}
    check(set(RECIPES) == expected, f"the README has the recipes this runner runs ({sorted(RECIPES)})")
    only = os.environ.get("INTEROP_RECIPES", "").split()
    steps = {
        "thunderbird": thunderbird,
        "fetchmail": lambda: (fetchmail("fetchmail-pop3"), fetchmail("fetchmail-imap")),
        "getmail": getmail,
        "mutt": lambda: [(mutt_read(p), mutt_send(p)) for p in ("mutt", "neomutt")],
        "msmtp": msmtp,
        "phpmailer": phpmailer,
        "python": python,
        "curl": curl,
    }
    for name, step in steps.items():
        if not only or name in only:
            step()


main()
sys.exit(1 if failed else 0)
