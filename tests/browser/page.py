"""The admin status page in a real headless Chromium (selenium + chromedriver): accounts are
listed, the filter narrows them, "Re-authorize" on a revoked account goes through the (fake)
Google consent and back so that the account logs in again, "Add password" shows a password
once that the proxy then accepts, and "Remove" revokes it. Logins appear in the recent events
list without a reload, and a redirect address pasted into "Finish authorization" (what a
browser on another device does) completes an authorization. Screenshots go to SCREENSHOT_DIR.

    python3 page.py ADMIN_URL IMAP_HOST IMAP_PORT SCREENSHOT_DIR ALICE_PASSWORD
"""

import http.client
import imaplib
import os
import sys
import urllib.parse

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

ADMIN, IMAP_HOST, IMAP_PORT, SHOTS = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ALICE_PASSWORD = sys.argv[5]
ALICE, BOB = "alice@gmail.com", "bob@example.org"
passed = failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS: {what}")
    else:
        failed += 1
        print(f"FAIL: {what}")


def imap_login(password):
    """The proxy's answer to a LOGIN: accepted locally or refused as a wrong password."""
    with imaplib.IMAP4(IMAP_HOST, IMAP_PORT) as c:
        try:
            c.login(ALICE, password)
            return "OK"
        except imaplib.IMAP4.error as e:
            return str(e)


def location(method, url, form=None):
    """Where a request is redirected to, without following it (as a browser on another
    device would: it cannot load the proxy's 127.0.0.1 address)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    body = urllib.parse.urlencode(form) if form else None
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if form else {}
    path = parts.path + ("?" + parts.query if parts.query else "")
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    conn.close()
    return response.getheader("Location")


def wait_for_event(driver, needle):
    """Wait (without reloading) until the recent events list has a row containing needle."""
    def found(d):
        return any(needle in r.text for r in d.find_elements(By.CSS_SELECTOR, "#events tbody tr"))
    try:
        WebDriverWait(driver, 20).until(found)
        return True
    except Exception:
        return False


options = Options()
for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1300,700"]:
    options.add_argument(flag)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(ADMIN + "/")
    rows = driver.find_elements(By.CSS_SELECTOR, "#accounts tbody tr")
    names = [r.find_element(By.TAG_NAME, "td").text for r in rows]
    check(names == [ALICE, BOB], f"both accounts listed ({names})")
    check("2 of 2 accounts" in driver.find_element(By.ID, "pages").text, "the script ran (pagination)")
    driver.save_screenshot(os.path.join(SHOTS, "1-accounts.png"))

    driver.find_element(By.ID, "filter").send_keys("bob")
    visible = [r for r in rows if r.is_displayed()]
    check(len(visible) == 1 and BOB in visible[0].text, "the filter narrows the table to bob")
    driver.find_element(By.ID, "filter").clear()
    driver.get(ADMIN + "/")

    answer = imap_login(ALICE_PASSWORD)
    check("expired or was revoked" in answer, f"alice's grant is revoked ({answer[:60]})")
    alice_row = driver.find_elements(By.CSS_SELECTOR, "#accounts tbody tr")[0]
    alice_row.find_element(By.XPATH, ".//button[text()='Re-authorize']").click()
    try:
        WebDriverWait(driver, 15).until(expected_conditions.presence_of_element_located((By.ID, "authorized")))
        came_back = True
    except Exception:
        came_back = False
    check(came_back, f"Re-authorize comes back from the consent as authorized ({driver.current_url})")
    driver.save_screenshot(os.path.join(SHOTS, "2-reauthorized.png"))
    answer = imap_login(ALICE_PASSWORD)
    # The token is good now; only the (absent) upstream stops the login.
    check("[UNAVAILABLE]" in answer, f"alice gets a token again ({answer[:60]})")
    driver.get(ADMIN + "/")

    alice_row = driver.find_elements(By.CSS_SELECTOR, "#accounts tbody tr")[0]
    alice_row.find_element(By.CSS_SELECTOR, "input[name='label']:not([type='hidden'])").send_keys("browser")
    alice_row.find_element(By.XPATH, ".//button[text()='Add password']").click()
    # The click navigates to the answer page; wait for it (hashing the password takes a moment).
    password = WebDriverWait(driver, 30).until(
        expected_conditions.presence_of_element_located((By.ID, "password"))).text
    driver.save_screenshot(os.path.join(SHOTS, "3-new-password.png"))
    check(len(password) >= 24, "Add password shows a new password once")
    answer = imap_login(password)
    check("[UNAVAILABLE]" in answer,
          f"the new password passes the proxy's check ({answer[:60]})")

    driver.get(ADMIN + "/")
    alice_row = driver.find_elements(By.CSS_SELECTOR, "#accounts tbody tr")[0]
    check("browser" in alice_row.text, "the page lists the new label")
    for item in alice_row.find_elements(By.TAG_NAME, "li"):
        if item.text.startswith("browser"):
            item.find_element(By.XPATH, ".//button[text()='Remove']").click()
            # The POST answers with a redirect back to the page: wait until the old row is gone.
            WebDriverWait(driver, 30).until(expected_conditions.staleness_of(alice_row))
            break
    driver.save_screenshot(os.path.join(SHOTS, "4-removed.png"))
    check("browser" not in driver.find_elements(By.CSS_SELECTOR, "#accounts tbody tr")[0].text,
          "Remove takes the label off the page")
    answer = imap_login(password)
    check("Invalid username or password" in answer, f"the removed password is refused ({answer[:60]})")

    # Live updates: logins made elsewhere show up without a reload.
    driver.get(ADMIN + "/")
    heading = driver.find_element(By.TAG_NAME, "h1")
    imap_login("not-the-password")
    with imaplib.IMAP4(IMAP_HOST, IMAP_PORT) as c:
        try:
            c.login("mallory@example.net", "guess")
        except imaplib.IMAP4.error:
            pass
    check(wait_for_event(driver, "unknown user"), "an unknown user's failure appears live, as a digest")
    rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")]
    check(any(ALICE in r and "wrong_password" in r for r in rows), f"alice's wrong password is listed ({rows[:3]})")
    check(not any("mallory" in r or "guess" in r for r in rows), "no username or password text of strangers")
    try:
        heading.is_displayed()
        same_page = True
    except Exception:
        same_page = False
    check(same_page, "the events arrived without a reload")
    driver.execute_script("document.getElementById('events').scrollIntoView()")
    driver.save_screenshot(os.path.join(SHOTS, "5-recent-events.png"))

    # Authorize from another device: the consent's redirect is pasted into the page.
    csrf = driver.find_element(By.CSS_SELECTOR, "#finish input[name='csrf']").get_attribute("value")
    consent = location("POST", ADMIN + "/authorize", {"csrf": csrf, "account": ALICE})
    redirected = location("GET", consent) if consent else None
    check(bool(redirected) and "code=" in redirected, f"consent redirects with a code ({redirected})")
    driver.find_element(By.ID, "redirect").send_keys(redirected or "")
    driver.save_screenshot(os.path.join(SHOTS, "6-paste-redirect.png"))
    driver.find_element(By.XPATH, "//button[text()='Finish authorization']").click()
    try:
        WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((By.ID, "authorized")))
        finished = True
    except Exception:
        finished = False
    check(finished, f"the pasted address finishes the authorization ({driver.current_url})")
    driver.save_screenshot(os.path.join(SHOTS, "7-pasted-authorized.png"))
    answer = imap_login(ALICE_PASSWORD)
    check("[UNAVAILABLE]" in answer, f"alice still gets a token ({answer[:60]})")

    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    check(not errors, f"no console errors (CSP violations included): {errors}")
finally:
    driver.quit()
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
