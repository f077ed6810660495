"""CPU readers for the bench scripts: from /proc, the robust figure on a
shared machine."""
import glob
import os
import resource

TICK = os.sysconf("SC_CLK_TCK")


class Cpu:
    """CPU seconds in user space and in the kernel."""

    def __init__(self, user=0.0, kernel=0.0):
        self.user, self.kernel = user, kernel

    def __sub__(self, other):
        return Cpu(self.user - other.user, self.kernel - other.kernel)

    def total(self):
        return self.user + self.kernel


def cpu_seconds(pids):
    """The CPU of `pids` so far (one that has gone counts nothing)."""
    cpu = Cpu()
    for pid in pids:
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except FileNotFoundError:
            continue
        # The fields after the command's closing parenthesis: a command may hold spaces.
        fields = stat[stat.rfind(")") + 2:].split()
        cpu.user += int(fields[11]) / TICK
        cpu.kernel += int(fields[12]) / TICK
    return cpu


def client_cpu():
    """The CPU of this script's finished children so far: the client's."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Cpu(r.ru_utime, r.ru_stime)


def switches(pids):
    """Context switches of every thread of `pids` so far, voluntary or not,
    from /proc: each is a thread put to sleep or pushed off its core, and
    a wake-up or a wait to come. (A thread that ended takes its count.)"""
    n = 0
    for pid in pids:
        for status in glob.glob(f"/proc/{pid}/task/*/status"):
            try:
                lines = open(status).read().splitlines()
            except (FileNotFoundError, ProcessLookupError):
                continue
            n += sum(int(l.split()[1]) for l in lines if l.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
    return n
