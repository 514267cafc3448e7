"""The soak in CI: ``scripts/soak.py`` for 30 s at concurrency 64 on a scratch repository (``--duration`` is
the only difference from the long runs). It runs as its own process: it starts its own server, and it uses
the server's KServe messages, which cannot share this process with tritonclient's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_soak_30s(scratch_repo: Path, tmp_path: Path) -> None:
    report_file = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--repo", str(scratch_repo),
                           "--duration", "30", "--warmup", "10", "--concurrency", "64", "--json", str(report_file)],
                          capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    print(done.stdout, done.stderr)
    report = json.loads(report_file.read_text())
    assert done.returncode == 0 and not report["failures"], report["failures"]
    assert report["calls"] > 0 and not report["unexpected"]
    assert report["rss_growth"] <= 0.10 and report["threads_end"] <= report["threads_start"]
    assert report["idle_after"]["fds"] <= report["idle_before"]["fds"]
