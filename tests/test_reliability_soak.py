"""scripts/soak.py against a real server: a short run in the default suite, the ten-minute one marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.server_fixtures import ServerProcess

pytest_plugins = ["tests.server_fixtures"]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def soak(tmp_path: Path, args: list[str], timeout: float) -> dict[str, Any]:
    results = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(run.stdout[-6000:])  # the memory curve and the summary, shown with -s or on failure
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(results.read_text())


def assert_held_up(result: dict[str, Any], min_sent: int) -> None:
    tally = result["tally"]
    assert result["failures"] == {}
    assert tally["sent"] >= min_sent
    assert tally["completed"] + tally["disconnects"] == tally["sent"]  # every request ended one way or the other
    assert tally["disconnects"] >= 1 and tally["completed"] >= min_sent // 2
    assert tally["hung"] == tally["inband_errors"] == tally["transport_errors"] == 0
    assert set(tally["statuses"]) == {"200"}
    assert result["kv_blocks_total"] > 0 and result["kv_blocks_leaked"] == 0


def test_short_soak_with_disconnects(server: ServerProcess, tmp_path: Path) -> None:
    args = ["--base-url", server.url, "--pid", str(server.process.pid), "--duration", "20", "--clients", "16"]
    args += ["--max-tokens", "32", "--max-prompt-words", "120", "--deadline", "60", "--sample-every", "2"]
    args += ["--warmup", "8", "--max-rss-growth-mib", "256"]  # 20 s is too short to call memory flat: gross leaks
    result = soak(tmp_path, args, timeout=180)
    assert_held_up(result, min_sent=32)


@pytest.mark.slow
def test_ten_minute_soak_with_64_streaming_clients(tmp_path: Path) -> None:
    duration = float(os.environ.get("SPINDLE_SOAK_SECONDS", "600"))
    result = soak(tmp_path, ["--duration", str(duration), "--clients", "64"], timeout=duration + 900)
    assert_held_up(result, min_sent=64)
    assert result["rss_growth_after_warmup_mib"] is not None  # flat within the script's default bound (64 MiB)
