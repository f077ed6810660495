"""`kvctl local` for the Python bench scripts: started, awaited, listed."""
import os
import subprocess
import time


def start_local(kvctl, base_port, work, logs, flags=(), env=None):
    """Starts `kvctl local` on `base_port` (its output in `work`/local.out,
    the nodes' logs in `logs`; more `flags` and `env`, if given) and waits
    until it says Ready: the process, and the pids of its nodes (the servers
    whose CPU a bench reads)."""
    out = os.path.join(work, "local.out")
    local = subprocess.Popen([kvctl, "local", "--base-port", str(base_port), "--logs", logs, *flags],
                             stdout=open(out, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while "Ready" not in open(out).read():
        if local.poll() is not None or time.monotonic() > deadline:
            local.kill()
            raise SystemExit(f"kvctl local did not get ready:\n{open(out).read()}")
        time.sleep(0.1)
    return local, children(local.pid)


def children(pid):
    """The direct children of `pid`."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
