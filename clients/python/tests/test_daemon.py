"""The client against a real daemon, driven by a real non-root user (see conftest.py).

Each test's client code runs as that user in its own Python process and reports what it
saw with ``out(...)``; the test then checks it, and checks from root what the user
cannot see for itself.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_popen_is_killed_at_its_timeout_and_events_show_it(as_user, daemon):
    seen = as_user(
        """
        proc = wd.Popen(["sleep", "300"], "py-timeout", timeout="2s", grace="1s")
        start = time.monotonic()
        code = proc.wait(timeout=120)
        took = time.monotonic() - start
        # Once wait() has returned, the record is stored and the kill known.
        records = wd.events(analysis_id="py-timeout")
        out({"pid": proc.pid, "registration": proc.registration, "code": code, "took": took,
             "killed_by": proc.killed_by, "kills": proc.kills,
             "records": records, "uid": os.getuid(), "recent": wd.events(since="1h", reason="timeout"),
             "future": wd.events(since=__import__("datetime").datetime.now() + __import__("datetime").timedelta(hours=1))})
        """
    )
    assert seen["registration"].pop("run") > 0, "a run of its own"
    assert seen["registration"] == {"kind": "registered", "pid": seen["pid"], "analysis_id": "py-timeout", "watched": 1}
    assert seen["code"] == -15, "killed by SIGTERM, its grace not needed"
    assert 1.5 < seen["took"] < 30, seen["took"]
    killed_by = seen["killed_by"]
    assert (killed_by["reason"], killed_by["limit"], killed_by["roots"]) == (
        "timeout", 2000, [{"pid": seen["pid"], "signal": "SIGTERM"}])
    assert seen["kills"] == [killed_by]
    [record] = seen["records"]
    assert (record["pid"], record["reason"], record["limit"]) == (seen["pid"], "timeout", 2000)
    assert record["uid"] == daemon.uid == seen["uid"] != 0
    assert record["comm"] == "sleep" and record["cmdline"].startswith("sleep 300")
    assert [r["pid"] for r in seen["recent"] if r["analysis_id"] == "py-timeout"] == [seen["pid"]]
    assert seen["future"] == []


def test_popen_is_killed_past_its_memory_limit(as_user, daemon):
    seen = as_user(
        """
        hog = "import time; x = b'\\\\x01' * (200 << 20); time.sleep(120)"
        proc = wd.Popen([sys.executable, "-c", hog], "py-memory", memory="64MiB", timeout="5m")
        code = proc.wait(timeout=120)
        records = wait_for("the memory record", lambda: wd.events(analysis_id="py-memory", reason="memory"))
        out({"pid": proc.pid, "code": code, "records": records})
        """
    )
    assert seen["code"] in (-15, -9), seen["code"]
    [record] = seen["records"]
    assert (record["pid"], record["reason"], record["limit"]) == (seen["pid"], "memory", 64 << 20)
    assert record["rss_bytes"] >= 64 << 20
    assert record["uid"] == daemon.uid


def test_watch_block_catches_an_orphan_and_unregisters_at_its_end(as_user):
    seen = as_user(
        """
        with wd.watch("py-orphan", timeout="5m", orphans="kill") as w:
            # sh starts sleep in the background and exits once it runs: sleep is orphaned.
            script = ('sleep 300 >/dev/null 2>&1 & pid=$!; '
                      'while [ "$(cat /proc/$pid/comm)" != sleep ]; do :; done; echo $pid')
            sh = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
            orphan = int(sh.communicate()[0])
            records = wait_for("the orphan's record",
                               lambda: [r for r in wd.events(analysis_id="py-orphan", reason="orphan")
                                        if r["pid"] == orphan])
            # A child os.fork()ed in the block is watched too, from its first instruction.
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
            in_tree = wait_for("the forked child in the tree", lambda: [
                n for n in wd.tree("py-orphan")["processes"] if n["pid"] == child])
            os.kill(child, 9)
            os.waitpid(child, 0)
        # After the block: nothing more is watched, and the analysis is gone.
        after = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout
        out({"orphan": orphan, "records": records, "sh": sh.pid, "in_tree": in_tree,
             "child": child, "after_pid": int(after), "me": os.getpid(),
             "tree_after": wd.tree("py-orphan"), "after_records": wd.events(analysis_id="py-orphan")})
        """
    )
    [record] = seen["records"]
    assert (record["pid"], record["reason"], record["comm"]) == (seen["orphan"], "orphan", "sleep")
    assert record["ppid"] == seen["sh"], "the record names the parent that died: sh"
    assert gone(seen["orphan"]), "the daemon killed the orphan"
    assert [n["pid"] for n in seen["in_tree"]] == [seen["child"]]
    assert seen["tree_after"]["processes"] == [] and seen["tree_after"]["analyses"] == []
    assert all(r["pid"] not in (seen["after_pid"], seen["me"]) for r in seen["after_records"])


# One driver per start method: each opens a block with a 4 s budget, starts workers
# that would sleep for 10 minutes, and reports their pids. Run under `watch()`, the
# workers are killed at the budget; with `kill_driver`, the driver SIGKILLs itself once
# they run, and they are killed as orphans.
# multiprocessing's start methods that start each worker anew (in C: no Python hook).
_CONTEXT_WORKERS = """
        import multiprocessing
        ctx = multiprocessing.get_context("{method}")
        workers = [ctx.Process(target=time.sleep, args=(600,)) for _ in range(2)]
        for p in workers:
            p.start()
        pids = [p.pid for p in workers]
"""

START_METHODS = {
    "spawn": _CONTEXT_WORKERS.format(method="spawn"),
    "forkserver": _CONTEXT_WORKERS.format(method="forkserver"),
    "loky": """
        from joblib.externals.loky import get_reusable_executor
        executor = get_reusable_executor(max_workers=2)
        futures = [executor.submit(os.getpid) for _ in range(8)]
        pids = sorted({f.result() for f in futures})
        executor.submit(time.sleep, 600)
        executor.submit(time.sleep, 600)
    """,
    "os.system": """
        # os.system blocks, so on a thread; the shell tells its pid, then becomes sleep.
        import threading
        path = f"/tmp/wd-system-{os.getpid()}"
        threading.Thread(target=os.system, args=(f"echo $$ > {path}; exec sleep 600",), daemon=True).start()
        pids = [int(wait_for("the shell's pid", lambda: open(path).read().strip() if os.path.exists(path) else ""))]
        os.unlink(path)
    """,
}


def _driver(method: str, kill_driver: bool) -> str:
    start = textwrap.indent(textwrap.dedent(START_METHODS[method]), "    ")
    ending = (
        "    out_now(pids)\n    os.kill(os.getpid(), 9)\n"
        if kill_driver
        else "    started = time.monotonic()\n"
        "    wait_for('the workers killed', lambda: all(gone(p) for p in pids), patience=60)\n"
        "    out({'pids': pids, 'after_s': time.monotonic() - started, 'me': os.getpid()})\n"
    )
    return (
        "import textwrap\n"
        "def gone(pid):\n"
        "    try:\n"
        "        with open(f'/proc/{pid}/stat') as stat:\n"
        "            return stat.read().rsplit(')', 1)[1].split()[0] in ('Z', 'X')\n"
        "    except FileNotFoundError:\n"
        "        return True\n"
        "def out_now(pids):\n"
        "    sys.stdout.write('\\n@@result ' + json.dumps({'pids': pids}) + '\\n')\n"
        "    sys.stdout.flush()\n"
        f"with wd.watch('py-{method.replace('.', '-')}-{int(kill_driver)}', timeout='4s', grace='1s'):\n"
        + start
        + ending
    )


@pytest.mark.parametrize("method", sorted(START_METHODS))
def test_watch_catches_every_start_method_at_the_blocks_timeout(as_user, method):
    seen = as_user(_driver(method, kill_driver=False))
    assert seen["pids"], "workers were started"
    assert seen["me"] not in seen["pids"]
    assert all(gone(p) for p in seen["pids"])
    # The budget counts from the block's start; the workers started within it.
    assert seen["after_s"] < 30, seen


@pytest.mark.parametrize("method", sorted(START_METHODS))
def test_watch_workers_are_killed_as_orphans_when_the_driver_is_sigkilled(as_user_raw, method):
    pids = as_user_raw(_driver(method, kill_driver=True))["pids"]
    assert pids
    deadline = time.monotonic() + 60
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in pids), f"{method}: workers {pids} outlived their driver"


def test_watch_timeout_is_a_budget_for_the_whole_block(as_user):
    seen = as_user(
        """
        started = time.monotonic()
        steps = []
        with wd.watch("py-budget", timeout="5s", grace="1s"):
            for _ in range(4):
                done = subprocess.run(["sleep", "3"])
                steps.append(done.returncode)
        out({"steps": steps, "took": time.monotonic() - started,
             "records": wd.events(analysis_id="py-budget")})
        """
    )
    assert seen["steps"][:1] == [0], "the first step fits in the budget"
    assert -15 in seen["steps"], f"a step was killed when the budget was spent: {seen['steps']}"
    assert seen["took"] < 12, f"four 3 s steps did not run 12 s under a 5 s budget: {seen}"
    assert all(r["reason"] == "timeout" and r["limit"] == 5000 for r in seen["records"])


def test_popen_refused_never_runs_the_command(as_user, daemon, workdir):
    marker = workdir / "ran"
    marker_dir = workdir
    seen = as_user(
        f"""
        err = error_of(lambda: wd.Popen(["sh", "-c", "echo ran > {marker}"], "", timeout="1m"))
        time.sleep(0.5)
        out({{"err": err}})
        """
    )
    assert seen["err"]["type"] == "Refused", seen
    assert "analysis id is empty" in seen["err"]["message"]
    assert not marker.exists() and marker_dir.exists()


def test_typed_errors_carry_the_daemons_message(as_user, daemon, workdir):
    # A socket only root may use: connecting to it is refused by the kernel.
    private_dir = workdir / "private"
    private_dir.mkdir()
    private_dir.chmod(0o755)
    private = private_dir / "root-only.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(private))
    listener.listen()
    private.chmod(0o600)
    missing = workdir / "nobody-here.sock"
    try:
        seen = as_user(
            f"""
            me = os.getpid()
            out({{
                "missing": error_of(lambda: wd.Client({str(missing)!r}).status()),
                "denied": error_of(lambda: wd.Client({str(private)!r}).status()),
                "unwatched_pid": error_of(lambda: wd.unregister(pid=me)),
                "unknown_analysis": error_of(lambda: wd.unregister(analysis_id="py-nothing")),
                "no_such_pid": error_of(lambda: wd.register(4194304 + 1, "py-x")),
                "empty_id": error_of(lambda: wd.register(me, "")),
                "long_id": error_of(lambda: wd.register(me, "x" * 1000)),
                "too_much_memory": error_of(lambda: wd.register(me, "py-x", memory="1EiB")),
                "init": error_of(lambda: wd.register(1, "py-x")),
                "zero_timeout": error_of(lambda: wd.register(me, "py-x", timeout="0s")),
                "bad_size": error_of(lambda: wd.register(me, "py-x", memory="lots")),
                "both": error_of(lambda: wd.unregister(pid=me, analysis_id="py-x")),
                "still_unwatched": wd.tree()["processes"],
            }})
            """
        )
    finally:
        listener.close()
    missing_err = seen["missing"]
    assert missing_err["type"] == "NoDaemon" and str(missing) in missing_err["message"]
    assert missing_err["kind"] == "no_daemon"
    assert "no such socket" in missing_err["message"]
    denied = seen["denied"]
    assert denied["type"] == "NoDaemon" and str(private) in denied["message"]
    assert "permission denied" in denied["message"]
    for key, words in [("unwatched_pid", "is not watched"), ("unknown_analysis", "no analysis"),
                       ("no_such_pid", "no process with pid")]:
        assert seen[key]["type"] == "NotFound", (key, seen[key])
        assert seen[key]["kind"] == "not_found", (key, seen[key])
        assert words in seen[key]["message"], (key, seen[key])
        assert "LookupError" in seen[key]["classes"]
    for key, words in [("empty_id", "analysis id is empty"), ("long_id", "bytes long"),
                       ("too_much_memory", "more than this machine's"), ("init", "pid 1")]:
        assert seen[key]["type"] == "Refused", (key, seen[key])
        assert seen[key]["kind"] in ("refused", "bad_request"), (key, seen[key])
        assert words in seen[key]["message"], (key, seen[key])
        assert "WatchdogError" in seen[key]["classes"]
    # Bad values are refused by the client, with the CLI's advice, before anything is sent.
    assert seen["zero_timeout"]["type"] == "ValueError"
    assert "must be more than 0" in seen["zero_timeout"]["message"]
    assert seen["bad_size"]["type"] == "ValueError" and "512MiB" in seen["bad_size"]["message"]
    assert seen["both"]["type"] == "ValueError"
    assert all(r["pid"] > 1 for r in seen["still_unwatched"])
    assert not any(r["analysis_id"] == "py-x" for r in seen["still_unwatched"])


def test_register_unregister_tree_and_status(as_user, daemon):
    seen = as_user(
        """
        sleeper = subprocess.Popen(["sleep", "120"])
        reply = wd.register(sleeper.pid, "py-register", timeout="10m", memory="1GiB",
                            tree_memory="2GiB", grace="5s", orphans="log", max_processes=50)
        tree = wd.tree("py-register")
        status = wd.status()
        gone = wd.unregister(analysis_id="py-register")
        after = wd.tree("py-register")
        sleeper.kill(); sleeper.wait()
        out({"pid": sleeper.pid, "reply": reply, "tree": tree, "status": status,
             "gone": gone, "after": after})
        """
    )
    assert seen["reply"].pop("run") > 0
    assert seen["reply"] == {"kind": "registered", "pid": seen["pid"], "analysis_id": "py-register", "watched": 1}
    [root] = seen["tree"]["processes"]
    assert (root["pid"], root["analysis_id"], root["comm"]) == (seen["pid"], "py-register", "sleep")
    [analysis] = seen["tree"]["analyses"]
    assert analysis["limits"] == {
        "timeout_ms": 600_000, "memory_bytes": 1 << 30, "tree_memory_bytes": 2 << 30,
        "grace_ms": 5000, "orphans": "log", "max_processes": 50,
        "max_zombies": 1000, "warn_at_percent": 0, "warn_signal": "SIGUSR1",
    }
    assert analysis["zombies"] == 0
    assert seen["status"]["kind"] == "status" and seen["status"]["version"]
    assert seen["gone"] == {"kind": "unregistered", "removed": 1}
    assert seen["after"]["processes"] == []


def test_watch_block_registers_multiprocessing_fork_workers(as_user):
    seen = as_user(
        """
        import multiprocessing

        def where(_):
            return os.getpid()

        with wd.watch("py-pool", timeout="5m") as w:
            with multiprocessing.get_context("fork").Pool(2) as pool:
                workers = sorted(set(pool.map(where, range(20))))
                # The kernel put them in the analysis as they forked; the daemon's tree
                # hears of it from the ring, drained at least every 10 ms.
                deadline = time.monotonic() + 10
                while True:
                    watched = sorted(n["pid"] for n in wd.tree("py-pool")["processes"])
                    if set(workers) <= set(watched) or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
        out({"workers": workers, "watched": watched, "me": os.getpid()})
        """
    )
    assert seen["workers"] and set(seen["workers"]) <= set(seen["watched"])
    assert seen["me"] not in seen["watched"], "the process that opened the block is never watched"


def test_popen_of_a_missing_command_raises_and_leaves_nothing_watched(as_user):
    seen = as_user(
        """
        err = error_of(lambda: wd.Popen(["/nonexistent/command"], "py-missing", timeout="1m"))
        time.sleep(0.5)
        out({"err": err, "tree": wd.tree("py-missing")})
        """
    )
    assert seen["err"]["type"] == "FileNotFoundError"
    assert seen["tree"]["processes"] == []


def test_popen_with_warn_at_gets_the_warning_signal_before_its_timeout(as_user, daemon):
    seen = as_user(
        """
        import signal as sig
        script = ("import signal, sys, time\\n"
                  "signal.signal(signal.SIGUSR2, lambda *_: print('checkpoint', flush=True))\\n"
                  "signal.signal(signal.SIGTERM, lambda *_: (print('sigterm', flush=True), sys.exit(0)))\\n"
                  "while True: time.sleep(1)\\n")
        proc = wd.Popen([sys.executable, "-c", script], "py-warned", timeout="2s", warn_at="50%",
                        warn_signal=sig.SIGUSR2, stdout=subprocess.PIPE, text=True)
        printed = proc.communicate(timeout=120)[0].split()
        records = wd.events(analysis_id="py-warned")
        out({"pid": proc.pid, "code": proc.returncode, "printed": printed, "records": records})
        """
    )
    assert seen["printed"] == ["checkpoint", "sigterm"], "warned first"
    assert seen["code"] == 0
    warnings = [r for r in seen["records"] if r["reason"] == "warning"]
    assert [(r["pid"], r["outcome"], r["warned_of"], r["limit"]) for r in warnings] == [
        (seen["pid"], "warned", "timeout", 2000)
    ]
    assert warnings[0]["signals"][0]["signal"] == "SIGUSR2"
    assert any(r["reason"] == "timeout" and r["pid"] == seen["pid"] for r in seen["records"])
