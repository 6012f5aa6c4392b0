"""Ctrl-C (SIGINT) during iteration stops the loader promptly with KeyboardInterrupt.

The child scripts install Python's SIGINT handler themselves: a process started in the background
by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and Python then leaves it ignored.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap


def test_sigint_stops_iteration_promptly(tumour_slide):
    script = textwrap.dedent(
        f"""
        import signal, sys, wsitile
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
        loader = wsitile.Loader([({str(tumour_slide['slide'])!r}, None)], tissue_threshold=None,
                                batch_size=256, threads=1, cache_mb=0)
        try:
            while True:
                for batch in loader:
                    print("batch", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "batch"
    proc.send_signal(signal.SIGINT)
    # The loop never ends by itself: only a delivered KeyboardInterrupt gets it out (the timeout is a
    # hang guard, not a speed check).
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "interrupted" in out



def test_sigint_taken_by_a_non_python_thread_still_stops_iteration(tumour_slide):
    """A process-directed SIGINT may be taken by any thread that does not block it, also one that
    never touches Python. Its handler then only records the signal; the main thread must still act on
    it while every next() finds its batch ready (next() releases and retakes the GIL, where CPython
    looks for signals recorded elsewhere, bpo-40010). Here a bare pthread (libc's sleep, started
    with ctypes) takes the SIGINT while batches are always ready."""
    script = textwrap.dedent(
        f"""
        import ctypes, signal, sys, time, wsitile
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
        libc = ctypes.CDLL(None, use_errno=True)
        loader = wsitile.Loader([({str(tumour_slide['slide'])!r}, None)], tissue_threshold=None,
                                batch_size=4, threads=1)
        tid = ctypes.c_ulong()
        start = ctypes.cast(libc.sleep, ctypes.c_void_p)
        assert libc.pthread_create(ctypes.byref(tid), None, start, ctypes.c_void_p(600)) == 0
        for _ in range(2):  # warm block cache: from here on a batch of 4 takes microseconds
            list(loader)
        sent = False
        try:
            while True:
                for batch in loader:
                    time.sleep(0.002)  # slower than the loader: every next() finds its batch ready
                    if not sent:
                        print("batch", flush=True)
                        assert libc.pthread_kill(tid, signal.SIGINT) == 0
                        sent = True
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "batch"
        proc.wait(timeout=60)  # hang guard; the child prints only twice, so its pipe cannot fill
    finally:
        proc.kill()
    out = proc.stdout.read()  # through the same buffer as readline, which may hold the next line already
    assert proc.returncode == 3 and "interrupted" in out


def test_loader_threads_leave_signals_to_the_main_thread(tumour_slide):
    """The loader's workers block asynchronous signals (SIGINT, SIGTERM, ...), so the kernel hands a
    Ctrl-C to the main thread, where Python handles it at once."""
    script = textwrap.dedent(
        f"""
        import os, threading, wsitile
        loader = wsitile.Loader([({str(tumour_slide['slide'])!r}, None)], tissue_threshold=None, threads=3)
        main = threading.get_native_id()
        blocked = []
        for tid in os.listdir("/proc/self/task"):
            if int(tid) == main:
                continue
            status = open(f"/proc/self/task/{{tid}}/status").read()
            mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
            blocked.append(all(mask >> (sig - 1) & 1 for sig in (2, 15)))  # SIGINT, SIGTERM
        print(sum(blocked), len(blocked))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n_blocked, n_threads = map(int, out.stdout.split())
    assert n_blocked >= 3  # the three workers (other libraries' threads may leave signals open)
