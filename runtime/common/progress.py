"""Progress bars with one rule for every command: a live bar on a terminal, whole lines in a log.

When the stream (stderr by default) is a terminal, :func:`progress_bar` is plain tqdm. Otherwise
(``ddim-run ... > log 2>&1``, CI, a pipe) it writes one ``\\n``-terminated line, never a ``\\r``,
each time the count has advanced a tenth of the total (every :data:`LOG_INTERVAL_S` seconds when
the total is unknown), and one at the end, so a log holds about ten lines per bar instead of one
overwritten line per update.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable

from tqdm import tqdm

LOG_STEPS = 10  # lines per bar of known total in a log (plus the end if it falls between them)
LOG_INTERVAL_S = 30.0  # seconds between lines of a bar whose total is unknown


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class LogLines(tqdm):  # type: ignore[type-arg]
    """A tqdm that writes a plain line each tenth of its total (or each :data:`LOG_INTERVAL_S` seconds
    when the total is unknown) and one at close; it never rewrites or clears a line."""

    _ready = False  # the line rule starts once __init__ is done (tqdm displays from inside it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # miniters / mininterval only spare formatting between lines; display() applies the rule.
        # maxinterval=inf keeps tqdm's monitor thread from forcing a refresh on every update.
        kwargs.update(miniters=1, mininterval=0, maxinterval=math.inf)
        super().__init__(*args, **kwargs)
        if not self.disable:  # a disabled tqdm stops its __init__ early and never displays
            self._set_rule()

    def _set_rule(self) -> None:
        known = bool(self.total) and math.isfinite(self.total)
        self._every_n = max(1, math.ceil(self.total / LOG_STEPS)) if known else 1
        self._every_s = 0.0 if known else LOG_INTERVAL_S
        self.miniters, self.mininterval = self._every_n, self._every_s
        self._line_n = self.n
        self._line_t = self._time()
        self._ready = True

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Write the bar as one line if the rule allows it (``msg=''``, tqdm clearing, writes nothing)."""
        if not self._ready or msg == "":
            return False
        now = self._time()
        if self.n - self._line_n < self._every_n or now - self._line_t < self._every_s:
            return False
        return self._write_line(msg, now)

    def _write_line(self, msg: str | None, now: float) -> bool:
        self.fp.write((self.__str__() if msg is None else msg).rstrip() + "\n")
        self.fp.flush()
        self._line_n, self._line_t = self.n, now
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear in a log (``tqdm.write`` and ``logging_redirect_tqdm`` call this)."""

    def reset(self, total: float | None = None) -> None:
        super().reset(total)
        self._set_rule()

    def close(self) -> None:
        """Write the last line unless the count is already in one, then close without tqdm's ``\\n``."""
        if not self.disable and self._ready and hasattr(self, "sp"):
            if self.n != self._line_n:
                with self._lock:
                    self._ema_dt = lambda: None  # the overall rate, as tqdm shows at close
                    self._write_line(None, self._time())
            self.leave = False  # tqdm then only "clears" the line, which display() skips
        super().close()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str | None = None,
             unit: str = "it", disable: bool = False, **kwargs: Any) -> tqdm:  # type: ignore[type-arg]
    """A tqdm bar over ``iterable`` (or updated by hand up to ``total``) that follows the toolkit's rule.

    On a terminal (``kwargs['file']``, default stderr) it is plain ``tqdm(...)``; elsewhere a
    :class:`LogLines`, which takes the same arguments and is used the same way (iteration, ``update``,
    ``set_postfix``, ``close``, ``with``).
    """
    stream = kwargs.get("file") or sys.stderr
    cls = tqdm if disable or _is_terminal(stream) else LogLines
    return cls(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)
