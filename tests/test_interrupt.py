"""Ctrl-C (SIGINT) during iteration stops the loader promptly with KeyboardInterrupt."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap


def test_sigint_stops_iteration_promptly(tumour_slide):
    script = textwrap.dedent(
        f"""
        import sys, wsitile
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
