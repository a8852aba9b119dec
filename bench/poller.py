#!/usr/bin/env python3
"""The approach watchdog replaces, written faithfully: a psutil poller.

Every INTERVAL seconds it adopts the descendants of each registered process (psutil's
children(recursive=True)) and walks its table of watched processes, and for each one checks
the wall clock against its timeout, its RSS against its limit, and its parent against
the one it had (a changed parent means an orphan). A violation gets SIGTERM, then
SIGKILL after a 10 s grace if it is still there. psutil checks a process' creation
time before signalling it, so a recycled PID is not hit.

Commands on stdin, one per line (answers on stdout):
  watch PID TIMEOUT_S MEMORY_BYTES   (0: no such limit) -> "registered PID NS"
                                     (and "adopted PID" for each child it finds)
  poll-time                          -> "poll-time MS" (the last poll's duration)
  quit
"""
import os
import select
import signal
import sys
import time

import psutil

GRACE_S = 10.0


class Watched:
    def __init__(self, proc, timeout_s, memory_bytes, registered, root=False):
        self.proc = proc
        self.root = root
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.registered = registered
        self.ppid = proc.ppid()
        self.term_sent = None


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def violation(w, now):
    if w.timeout_s and now - w.registered >= w.timeout_s:
        return "timeout"
    if w.memory_bytes and w.proc.memory_info().rss > w.memory_bytes:
        return "memory"
    if w.proc.ppid() != w.ppid:
        return "orphan"
    return None


def poll(table):
    now = time.time()
    for pid, w in list(table.items()):
        if not w.root:
            continue
        try:
            for child in w.proc.children(recursive=True):
                if child.pid not in table:
                    table[child.pid] = Watched(child, w.timeout_s, w.memory_bytes, w.registered)
                    say(f"adopted {child.pid}")
        except psutil.NoSuchProcess:
            pass
    for pid, w in list(table.items()):
        try:
            if not w.proc.is_running():
                del table[pid]
                continue
            if w.term_sent is None:
                if violation(w, now):
                    w.proc.send_signal(signal.SIGTERM)
                    w.term_sent = now
            elif now - w.term_sent >= GRACE_S:
                w.proc.send_signal(signal.SIGKILL)
                del table[pid]
        except psutil.NoSuchProcess:
            table.pop(pid, None)


def main():
    interval = float(sys.argv[1])
    table = {}
    last_poll_ms = 0.0
    next_poll = time.monotonic() + interval
    while True:
        wait = max(0.0, next_poll - time.monotonic())
        ready, _, _ = select.select([sys.stdin], [], [], wait)
        if ready:
            line = sys.stdin.readline()
            if not line or line.strip() == "quit":
                return
            words = line.split()
            if words[0] == "watch":
                pid, timeout_s, memory = int(words[1]), float(words[2]), int(words[3])
                try:
                    table[pid] = Watched(psutil.Process(pid), timeout_s, memory, time.time(), root=True)
                    say(f"registered {pid} {time.clock_gettime_ns(time.CLOCK_REALTIME)}")
                except psutil.NoSuchProcess:
                    say(f"gone {pid}")
            elif words[0] == "poll-time":
                say(f"poll-time {last_poll_ms:.3f}")
            continue
        started = time.perf_counter()
        poll(table)
        last_poll_ms = (time.perf_counter() - started) * 1000
        next_poll += interval


if __name__ == "__main__":
    main()
