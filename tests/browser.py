#!/usr/bin/env python3
"""The dashboard in a real browser: a local cluster (a controller and four
workers, each its own process on ephemeral ports), 20,000 keys loaded,
and headless Chromium driven by selenium through chromedriver.

Checks that the page shows every worker UP, a key's three owners (those of
/mapping, primary first, each with its version), a worker killed with -9
DOWN within 3 s, the cluster settled again, and two more killed: the
share of the ring whose owners are all DOWN; saves a screenshot of each
state (and one phone-sized) in target/screenshots/, or $SCREENSHOTS.
Runs the kvctl at $KVCTL, or builds one (debug) when unset.

Needs Chromium and chromedriver (Debian: apt-get install chromium
chromium-driver) and selenium (pip); installs the first two with apt-get
when it can. Cannot run: fails, never skips. Prints timings; ends with
"N passed, M failed".
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOTS = os.environ.get("SCREENSHOTS", os.path.join(ROOT, "target", "screenshots"))
PATIENCE = 30.0
KEYS = 20_000
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ensure_browser():
    """Chromium and chromedriver, installed with apt-get if missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("     installing chromium and chromium-driver with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
                       check=True, env=env, capture_output=True)
    for tool in ("chromium", "chromedriver"):
        if not shutil.which(tool):
            raise SystemExit(f"FAIL {tool} is not installed and apt-get could not install it")


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class Node:
    """One `kvctl node` process; its ports come from its "listening" log line."""

    def __init__(self, kvctl, logs, name, args):
        self.name = name
        self.log_path = os.path.join(logs, f"{name}.log")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([kvctl, "node", *args], stdin=subprocess.PIPE, stdout=log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "KV_THREADS": "1"})
        deadline = time.monotonic() + PATIENCE
        while True:
            text = ANSI.sub("", open(self.log_path).read())
            line = next((l for l in text.splitlines() if " listening" in l), None)
            if line:
                fields = dict(re.findall(r"(\w+)=(\S+)", line))
                self.port = int(fields.get("http_port") or fields["port"])
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start; its log: {text[-2000:]}")
            time.sleep(0.05)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


results = []


def check(name, fn):
    try:
        fn()
        results.append((name, None))
        print(f"ok   {name}")
    except Exception as e:  # a failed check is reported; later ones may still run
        results.append((name, e))
        print(f"FAIL {name}: {type(e).__name__}: {e}")


def main():
    ensure_browser()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        raise SystemExit("FAIL selenium is not installed: pip install selenium")

    # $KVCTL: a kvctl built already (CI passes the one `cargo test` built:
    # `cargo build -p kvctl` resolves other features and compiles again).
    kvctl = os.environ.get("KVCTL")
    if not kvctl:
        subprocess.run(["cargo", "build", "-q", "-p", "kvctl"], cwd=ROOT, check=True)
        kvctl = os.path.join(ROOT, "target", "debug", "kvctl")
    os.makedirs(SHOTS, exist_ok=True)
    logs = tempfile.mkdtemp(prefix="kv-browser-")
    nodes = {}
    driver = None
    try:
        nodes["controller"] = Node(kvctl, logs, "controller", ["controller", "--listen", "127.0.0.1:0"])
        controller = f"http://127.0.0.1:{nodes['controller'].port}"
        for i in range(1, 5):
            wid = f"worker{i}"
            nodes[wid] = Node(kvctl, logs, wid, [
                "worker", "--id", wid, "--listen", "127.0.0.1:0", "--wire-listen", "127.0.0.1:0",
                "--advertise-host", "127.0.0.1", "--controller", controller])
        subprocess.run([kvctl, "--controller", controller, "load", "--generate", str(KEYS)],
                       check=True, capture_output=True)

        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1000"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.get(f"{controller}/ui")
        wait = lambda what, cond, timeout=PATIENCE: WebDriverWait(driver, timeout, poll_frequency=0.05).until(
            lambda d: cond(d), message=f"timed out waiting for {what}")
        rows = lambda status: driver.find_elements(By.CSS_SELECTOR, f'tr[data-status="{status}"]')
        state = lambda: driver.find_element(By.ID, "state").text
        shot = lambda name: driver.save_screenshot(os.path.join(SHOTS, name))

        def all_up():
            wait("four workers UP and settled", lambda d: len(rows("UP")) == 4 and state().startswith("settled"))
            keys = sum(int(r.find_elements(By.TAG_NAME, "td")[3].text.replace(",", "") or 0) for r in rows("UP"))
            assert keys == 3 * KEYS, f"the table shows {keys} copies, not {3 * KEYS}"
            wait("the ring legend", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#legend .swatch")) == 4)
            shot("1-all-up.png")

        def lookup():
            key = "key:42"
            box = driver.find_element(By.ID, "key")
            box.clear()
            box.send_keys(key)
            driver.find_element(By.CSS_SELECTOR, "#lookup button").click()
            wait("three owners", lambda d: len(d.find_elements(By.CSS_SELECTOR, "li[data-owner]")) == 3)
            owners = driver.find_elements(By.CSS_SELECTOR, "li[data-owner]")
            shown = [o.get_attribute("data-owner") for o in owners]
            expected = get_json(f"{controller}/mapping?key={key}")["workers"]
            assert shown == expected, f"the page shows owners {shown}, /mapping says {expected}"
            assert "(primary)" in owners[0].text, owners[0].text
            versions = [o.find_element(By.TAG_NAME, "code").text for o in owners]
            assert len(set(versions)) == 1 and "@" in versions[0], f"versions {versions}"
            shot("2-key-lookup.png")

        def killed_worker_shows_down():
            victim = "worker3"
            nodes[victim].kill9()
            killed = time.monotonic()
            wait(f"{victim} DOWN", lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-worker="{victim}"][data-status="DOWN"]'), 10)
            took = time.monotonic() - killed
            shot("3-worker-down.png")
            print(f"     kill -9 of {victim}: DOWN on the page {took:.2f} s later")
            assert took <= 3.0, f"{victim} showed DOWN only {took:.2f} s after kill -9"
            assert driver.find_element(By.ID, "count-DOWN").text == "1"

        def settles_again():
            wait("three UP and settled again", lambda d: len(rows("UP")) == 3 and state().startswith("settled"))
            keys = sum(int(r.find_elements(By.TAG_NAME, "td")[3].text.replace(",", "") or 0) for r in rows("UP"))
            assert keys == 3 * KEYS, f"after the repair the table shows {keys} copies, not {3 * KEYS}"
            events = driver.find_element(By.ID, "events").text
            assert "worker3: SUSPECT → DOWN" in events, events
            shot("4-settled-again.png")

        def owners_all_down():
            banner = lambda: driver.find_element(By.ID, "unavailable")
            assert not banner().is_displayed(), "one worker DOWN: every arc has a live owner"
            for victim in ("worker2", "worker4"):
                nodes[victim].kill9()
            wait("the banner of arcs whose owners are all DOWN", lambda d: banner().is_displayed(), 15)
            text = banner().text
            assert "% of the ring has all its owners DOWN" in text, text
            assert all(w in text for w in ("worker2", "worker3", "worker4")), text
            shot("6-owners-down.png")

        def phone():
            driver.set_window_size(390, 844)
            wait("the phone layout", lambda d: d.execute_script("return document.documentElement.clientWidth") <= 390)
            width = driver.execute_script("return document.documentElement.scrollWidth")
            assert width <= 400, f"the page is {width} px wide on a 390 px screen"
            shot("5-phone.png")

        check("the page shows every worker UP, with every copy, settled", all_up)
        check("a key looked up shows its three owners, primary first, with one version", lookup)
        check("a worker killed with -9 shows DOWN within 3 s", killed_worker_shows_down)
        check("the cluster repairs and the page shows it settled with every copy", settles_again)
        check("three workers DOWN: the page says which share of the ring reads 503", owners_all_down)
        check("the page fits a phone's width", phone)
    finally:
        if driver:
            driver.quit()
        for node in nodes.values():
            node.stop()
        if any(e for _, e in results):
            print(f"     logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
    failed = len([1 for _, e in results if e])
    print(f"     screenshots in {SHOTS}")
    print(f"browser: {len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
