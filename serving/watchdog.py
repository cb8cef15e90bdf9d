"""Stop a tritonserver and its python-backend stubs when the process that started it dies, however it dies.

``serving.server`` starts one beside each server: ``python -I -S watchdog.py FD PGID GRACE_S``, in a session
of its own (a terminal's Ctrl-C does not reach it). FD is the read end of a pipe whose write end only the
starting process holds: the kernel closes it when that process ends, SIGKILL included. Then the watchdog
sends SIGTERM to the server (PGID, the leader of its own process group: a graceful stop), waits until the
server is gone or GRACE_S passed, and sends SIGKILL to whatever is left in the group: the stubs, which Triton
2.51 starts in the server's group and which can hang for ever when the server dies while they wait on it
(a stub blocked in a metric round trip never reaches its own parent-death exit). It also exits by itself
once the group is empty (the server was stopped normally). Standard library only, run without site.
"""
import os
import select
import signal
import sys
import time


def _alive(pid):
    """Whether ``pid`` runs (a zombie is dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal(pgid, sig, group):
    try:
        (os.killpg if group else os.kill)(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def watch(fd, pgid, grace_s, poll_s=0.5):
    """Block until the pipe ``fd`` closes (then stop group ``pgid``) or the group is empty."""
    while _group_alive(pgid):
        ready, _, _ = select.select([fd], [], [], poll_s)
        if ready and not os.read(fd, 1):
            break
    else:
        return
    _signal(pgid, signal.SIGTERM, group=False)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pgid):
        time.sleep(0.1)
    _signal(pgid, signal.SIGKILL, group=True)


def main(argv=None):
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals are for the process it watches
        signal.signal(sig, signal.SIG_IGN)
    fd, pgid, grace_s = (argv or sys.argv[1:])[:3]
    watch(int(fd), int(pgid), float(grace_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
