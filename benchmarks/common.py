"""What the benchmark scripts share: the machine's description and the report files."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Callable

from runtime.common.hostinfo import cpu_name  # noqa: F401 (the scripts take it from here)

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


def write_report(kind: str, out: Path, environment: dict[str, Any], rows: list[dict[str, Any]],
                 key: tuple[str, ...], markdown: Callable[[dict[str, Any], list[dict]], str],
                 plot: Callable[[list[dict], Path], None]) -> tuple[list[dict], Path]:
    """``out/KIND-DATE-HOST.{json,md,png}`` (the same day's rows for other ``key`` values kept), the Markdown
    echoed; returns all rows and the stem path."""
    import click

    stem = out / report_stem(kind)
    out.mkdir(parents=True, exist_ok=True)
    rows = write_json(Path(f"{stem}.json"), environment, rows, key)  # not with_suffix: host names hold dots
    Path(f"{stem}.md").write_text(markdown(environment, rows))
    plot(rows, Path(f"{stem}.png"))
    click.echo(markdown(environment, rows))
    return rows, stem


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
