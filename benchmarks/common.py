"""What the benchmark scripts share: the machine's description and the report files."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from runtime.hostinfo import cpu_name  # noqa: F401 (the scripts take it from here)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def report_stem(kind: str) -> str:
    """``KIND-DATE-HOST``: one report per kind, day and machine."""
    return f"{kind}-{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"


def write_json(path: Path, environment: dict[str, Any], rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict]:
    """Write rows, keeping the same day's earlier rows for other ``key`` values; returns all rows."""
    if path.is_file():
        fresh = {tuple(r[k] for k in key) for r in rows}
        old = [r for r in json.loads(path.read_text()).get("results", []) if tuple(r[k] for k in key) not in fresh]
        rows = old + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment, "results": rows}, indent=2) + "\n")
    return rows


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
