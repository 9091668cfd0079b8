"""The loss log of a run: averaged rows in ``loss.csv`` and a ``loss.png`` curve."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from runtime.common.files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)
FIELDS = ("step", "loss", "images_per_s", "lr")


class LossLog:
    """Rows averaged over ``every`` steps; written whole (atomically) at each checkpoint.

    Rows past the last checkpoint are dropped on resume, so the curve matches the weights.
    """

    def __init__(self, run_dir: Path, every: int) -> None:
        self.csv_path = run_dir / "loss.csv"
        self.png_path = run_dir / "loss.png"
        self.every = every
        self.rows: list[dict[str, float]] = []
        self._sum, self._count = 0.0, 0
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as fh:
                self.rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]

    def truncate_after(self, step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= step]

    def add(self, step: int, loss: float, images_per_s: float, lr: float) -> None:
        self._sum += loss
        self._count += 1
        if step % self.every == 0:
            self.rows.append({"step": step, "loss": self._sum / self._count, "images_per_s": images_per_s, "lr": lr})
            self._sum, self._count = 0.0, 0

    def flush(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(row[k]) if k == "step" else f"{row[k]:.6g}") for k in FIELDS})
        atomic_write_text(self.csv_path, buf.getvalue())

    def plot(self) -> Path | None:
        """Write the loss curve (log-scale loss against step); None when there is nothing to plot."""
        self.flush()
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot([r["step"] for r in self.rows], [r["loss"] for r in self.rows], lw=1)
        ax.set(xlabel="step", ylabel=f"training loss (mean of {self.every} steps)", yscale="log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self.png_path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return self.png_path
