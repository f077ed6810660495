#!/usr/bin/env python3
"""The seed demo, for real, in containers: the images built the CI way
(scripts/build-images), the compose cluster on a Docker network, the story
driven over HTTP, `docker stop` of a mapped worker, and a scaled worker
service. Every container and network is removed, pass or fail.

Prints the image sizes, the time from `up` to 4 workers UP, and detection
and rebalance times; ends with "N passed, M failed".
"""
import base64
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = f"kvtest{os.getpid()}"
PATIENCE = 60.0
results = []


def ephemeral_range():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    return low, high


TAKEN = set()


def free_port():
    """A port Docker can publish on 0.0.0.0 for TCP and UDP. Chosen below
    the kernel's ephemeral range: a port the kernel hands out (bind to 0)
    is free now but can be taken by any outgoing connection before compose
    publishes it, which failed `up` once in CI."""
    low, _ = ephemeral_range()
    rng = random.Random()
    while True:
        port = rng.randrange(max(1024, low - 12000), low)
        if port in TAKEN:
            continue
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        TAKEN.add(port)
        return port


PORTS = {"KV_CONTROLLER_PORT": free_port()}
for i in range(1, 5):
    PORTS[f"KV_WORKER{i}_PORT"] = free_port()
    PORTS[f"KV_WORKER{i}_WIRE_PORT"] = free_port()
# The cluster secret the compose file mounts into every node, made the way
# DEMO.md makes it; readable by the images' uid 65534.
SECRET_DIR = tempfile.mkdtemp(prefix="kv-containers-")
SECRET_FILE = os.path.join(SECRET_DIR, "cluster-secret")
with open(SECRET_FILE, "w") as f:
    f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
os.chmod(SECRET_FILE, 0o644)
ENV = {**os.environ, **{k: str(v) for k, v in PORTS.items()}, "KV_CLUSTER_SECRET": SECRET_FILE}
CONTROLLER = f"http://127.0.0.1:{PORTS['KV_CONTROLLER_PORT']}"


def worker_url(worker_id):
    return f"http://127.0.0.1:{PORTS[f'KV_{worker_id.upper()}_PORT']}"


def compose(*args, check=True):
    cmd = ["docker-compose", "-f", os.path.join(ROOT, "compose.yaml"), "-p", PROJECT, *args]
    done = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def eventually(what, check):
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            value = check()
        except (OSError, urllib.error.URLError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def check(name, fn):
    try:
        fn()
        results.append((name, None))
        print(f"ok   {name}")
    except Exception as e:  # a failed check is reported, the rest still run
        results.append((name, e))
        print(f"FAIL {name}: {e}")


def nodes():
    return http("GET", f"{CONTROLLER}/nodes")[1]["nodes"]


def status_of(worker_id):
    return next((n["status"] for n in nodes() if n["id"] == worker_id), None)


def mapping(key):
    status, body = http("GET", f"{CONTROLLER}/mapping?key={key}")
    assert status == 200, body
    return body["workers"]


def local_value(worker_id, key):
    status, body = http("GET", f"{worker_url(worker_id)}/kv?key={key}")
    return body.get("value") if status == 200 else None


state = {}


def images_build():
    out = subprocess.run([os.path.join(ROOT, "scripts", "build-images")], cwd=ROOT, check=True, capture_output=True, text=True)
    print(out.stdout.strip())
    for line in out.stdout.split("\n"):
        if line.startswith("distributed-kv-"):
            state.setdefault("sizes", []).append(line)
    assert len(state["sizes"]) == 2, out.stdout


def cluster_comes_up():
    start = time.monotonic()
    compose("up", "-d", "controller", "worker1", "worker2", "worker3", "worker4")
    eventually("4 workers UP", lambda: len([n for n in nodes() if n["status"] == "UP"]) == 4)
    state["up"] = time.monotonic() - start
    # and every worker serves with the topology
    for i in range(1, 5):
        eventually(f"worker{i} in the ring", lambda: http("GET", f"{worker_url(f'worker{i}')}/healthz")[1]["in_ring"])
    print(f"     compose up -> 4 workers UP in {state['up']:.2f} s")


def metric(worker_id, name):
    """The value of the metric `name` on a worker."""
    metrics = urllib.request.urlopen(f"{worker_url(worker_id)}/metrics", timeout=5).read().decode()
    return sum(float(l.split()[1]) for l in metrics.splitlines() if l.startswith(f"{name} "))


def workers_run_on_their_cpu_quota():
    """compose gives each worker one CPU (`cpus: 1`, a CFS quota, as the
    manifests' limits.cpu): the worker, given no --threads, sizes its
    runtime to it rather than to the host's cores."""
    host_cpus = os.cpu_count()
    for i in range(1, 5):
        threads = metric(f"worker{i}", "kv_worker_runtime_threads")
        assert threads == 1, f"worker{i} runs {threads:.0f} threads on a quota of 1 CPU ({host_cpus} on the host)"
    print(f"     every worker: 1 runtime thread on its 1-CPU quota ({host_cpus} CPUs on the host)")


def demo_story():
    owners = mapping("user123")
    assert len(owners) == 3, owners
    status, reply = http("PUT", f"{worker_url(owners[0])}/kv", {"key": "user123", "value": "hello-k8s"})
    assert status == 200 and reply["acks"] >= 2, reply
    assert local_value(owners[0], "user123") == "hello-k8s"
    for w in owners:
        eventually(f"the value on {w}", lambda: local_value(w, "user123") == "hello-k8s")
    fourth = next(f"worker{i}" for i in range(1, 5) if f"worker{i}" not in owners)
    assert local_value(fourth, "user123") is None
    status, body = http("GET", f"{worker_url(fourth)}/kv?key=user123&consistency=quorum")
    assert status == 200 and body["value"] == "hello-k8s", body
    state["owners"] = owners


def failure_and_rebalance():
    victim = state["owners"][0]
    start = time.monotonic()
    compose("stop", "-t", "0", victim)
    eventually(f"{victim} DOWN", lambda: status_of(victim) == "DOWN")
    detected = time.monotonic() - start
    new_owners = eventually("a mapping without the victim", lambda: (lambda m: m if victim not in m and len(m) == 3 else None)(mapping("user123")))
    for w in new_owners:
        eventually(f"the value on new owner {w}", lambda: local_value(w, "user123") == "hello-k8s")
    rebalanced = time.monotonic() - start
    print(f"     docker stop -> DOWN in {detected:.2f} s; value on every new owner {rebalanced:.2f} s after the stop")


def container(worker_id):
    return f"{PROJECT}_{worker_id}_1"


def write_keys(prefix, count, via):
    """Writes keys through `via`; returns {key: value} of the acknowledged
    ones. Prints the first few failures, so a failed count says why."""
    acked, failed = {}, []
    for i in range(count):
        key, value = f"{prefix}{i}", f"{prefix}value{i}"
        status, reply = http("PUT", f"{worker_url(via)}/kv", {"key": key, "value": value})
        if status == 200:
            acked[key] = value
        else:
            failed.append((key, status, reply))
    if failed:
        print(f"     {len(failed)} of {count} writes through {via} failed, such as {failed[:3]}")
    return acked


def every_owner_holds(acked):
    """The acknowledged-write check: each key's value on each of its current owners."""
    for key, value in acked.items():
        for owner in mapping(key):
            if local_value(owner, key) != value:
                return False
    return True


def live_workers():
    return sorted(n["id"] for n in nodes() if n["status"] == "UP" and n["id"].startswith("worker"))


def gray_failure(fault, heal, what):
    """`fault(container)` hurts a live worker, `heal(container)` undoes it;
    writes go through another worker before and during."""
    victim, via = live_workers()[:2]
    slug = what.replace(" ", "-")
    acked = write_keys(f"{slug}-before:", 100, via)
    start = time.monotonic()
    subprocess.run(["docker", *fault(container(victim))], check=True, capture_output=True)
    eventually(f"{victim} DOWN", lambda: status_of(victim) == "DOWN")
    detected = time.monotonic() - start
    acked.update(write_keys(f"{slug}-during:", 100, via))
    subprocess.run(["docker", *heal(container(victim))], check=True, capture_output=True)
    eventually(f"{victim} UP again", lambda: status_of(victim) == "UP")
    eventually("every acknowledged write on every owner", lambda: every_owner_holds(acked))
    print(f"     {what}: DOWN after {detected:.2f} s; {len(acked)} acknowledged writes on all their owners {time.monotonic() - start:.2f} s after the fault")


def paused_worker_converges():
    gray_failure(lambda c: ["pause", c], lambda c: ["unpause", c], "docker pause")


def disconnected_worker_converges():
    network = f"{PROJECT}_default"
    gray_failure(lambda c: ["network", "disconnect", network, c], lambda c: ["network", "connect", network, c], "network disconnect")


def ready(worker_id):
    return http("GET", f"{worker_url(worker_id)}/readyz")[0] == 200


def compose_stop_of_two_workers_under_writes_loses_nothing():
    """`docker-compose stop` (SIGTERM, then the stop grace period) of two
    workers one after the other while a writer keeps writing through a
    third: each leaves by itself (DOWN, reason "left"), no write fails, and
    every acknowledged write is on every owner afterwards."""
    numbered = [f"worker{i}" for i in range(1, 5)]
    compose("start", *numbered)
    eventually("4 workers UP and ready", lambda: len(live_workers()) == 4 and all(ready(w) for w in numbered))
    leavers, via = numbered[:2], numbered[2]
    acked, failures, stop = {}, [], threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            key, value = f"drain:{i}", f"drain-value{i}"
            try:
                status, reply = http("PUT", f"{worker_url(via)}/kv", {"key": key, "value": value})
            except OSError as e:
                status, reply = None, str(e)
            if status == 200:
                acked[key] = value
            else:
                failures.append((key, status, reply))
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(1)
        for w in leavers:
            start = time.monotonic()
            compose("stop", w)
            took = time.monotonic() - start
            entry = next(n for n in nodes() if n["id"] == w)
            assert entry["status"] == "DOWN" and entry.get("reason") == "left", entry
            print(f"     docker-compose stop {w}: left in {took:.2f} s")
    finally:
        stop.set()
        thread.join()
    assert not failures, f"{len(failures)} writes failed, such as {failures[:3]}"
    assert len(acked) > 100, f"only {len(acked)} writes"
    eventually("every acknowledged write on every owner", lambda: every_owner_holds(acked))
    print(f"     {len(acked)} writes during two drains, none failed, all on their owners")
    compose("start", *leavers)
    # UP is the controller's view; a restarted worker takes writes once it
    # holds a topology, which /readyz says (the next check writes at once).
    eventually("4 workers UP and ready again", lambda: len(live_workers()) == 4 and all(ready(w) for w in leavers))


def every_worker_killed_then_up_keeps_its_data():
    """`docker-compose kill` of all four workers at once (no peer is left
    to refill anyone), then `up`: every acknowledged write is back on every
    owner, from the workers' volumes."""
    numbered = [f"worker{i}" for i in range(1, 5)]
    acked = write_keys("durable:", 200, "worker1")
    assert len(acked) == 200, f"only {len(acked)} of 200 writes acknowledged"
    compose("kill", *numbered)
    eventually("all four DOWN", lambda: all(status_of(w) == "DOWN" for w in numbered))
    start = time.monotonic()
    compose("up", "-d", *numbered)
    eventually("4 workers UP and ready", lambda: len(live_workers()) == 4 and all(ready(w) for w in numbered))
    eventually("every acknowledged write on every owner", lambda: every_owner_holds(acked))
    pulled = sum(metric(w, "kv_worker_rebalance_keys_total") for w in numbered)
    print(f"     kill of every worker, then up: {len(acked)} writes on all their owners {time.monotonic() - start:.2f} s after up; {pulled:.0f} copies moved")


def a_worker_without_the_secret_is_kept_out():
    """A worker container on the cluster's network, with no secret: the
    controller refuses it, and both logs say why."""
    name = f"{PROJECT}_stranger"
    subprocess.run(["docker", "run", "-d", "--name", name, "--network", f"{PROJECT}_default",
                    "-e", "KV_NODE_ID=stranger", "-e", "KV_CONTROLLER=http://controller:8000",
                    "distributed-kv-worker:latest"], check=True, capture_output=True)
    try:
        logs = lambda c: subprocess.run(["docker", "logs", c], capture_output=True, text=True).stdout
        eventually("the stranger to log its refusal", lambda: "requires proof of its cluster secret" in logs(name))
        eventually("the controller to log the refusal", lambda: 'what="register"' in logs(f"{PROJECT}_controller_1"))
        assert "stranger" not in [n["id"] for n in nodes()], nodes()
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def scaled_workers_register():
    before = len([n for n in nodes() if n["status"] == "UP"])
    compose("--profile", "scale", "up", "-d", "--scale", "worker=2", "worker")
    eventually("two more workers UP", lambda: len([n for n in nodes() if n["status"] == "UP"]) == before + 2)
    extra = [n for n in nodes() if not n["id"].startswith("worker")]
    assert len(extra) == 2 and extra[0]["id"] != extra[1]["id"], extra


def main():
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        print("skipped: no Docker engine answers `docker info`")
        return 0
    try:
        check("images build from host binaries (no base image)", images_build)
        if results[-1][1] is None:
            check("the compose cluster comes up with 4 workers UP", cluster_comes_up)
            check("each worker sizes its runtime to its CPU quota", workers_run_on_their_cpu_quota)
            check("the demo story: mapping, PUT to the primary, values on the owners", demo_story)
            check("docker stop of the primary: DOWN, smaller mapping, value on every new owner", failure_and_rebalance)
            check("docker pause of a worker, writes meanwhile, unpause: every acknowledged write on every owner", paused_worker_converges)
            check("network disconnect of a worker, writes meanwhile, reconnect: every acknowledged write on every owner", disconnected_worker_converges)
            check("docker-compose stop of two workers in turn under writes: both leave, nothing lost", compose_stop_of_two_workers_under_writes_loses_nothing)
            check("docker-compose kill of every worker, then up: the data is back from their volumes", every_worker_killed_then_up_keeps_its_data)
            check("a worker without the cluster secret is kept out, and both logs say why", a_worker_without_the_secret_is_kept_out)
            check("a worker service scaled to two: both register", scaled_workers_register)
    finally:
        if any(e for _, e in results):
            print(compose("logs", "--tail", "20", check=False).stdout[-4000:])
        compose("--profile", "scale", "down", "-v", "--remove-orphans", "-t", "1", check=False)
        os.remove(SECRET_FILE)
        os.rmdir(SECRET_DIR)
    if "sizes" in state:
        print("     images: " + ", ".join(state["sizes"]))
    failed = len([1 for _, e in results if e])
    print(f"containers: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
