"""Run ``fit`` or ``export_run`` in this process and SIGKILL it at the N-th file-system step of one
phase: a crash exactly there, with no ``finally`` and no cleanup.

    python tests/reliability/killer.py fit RUN_DIR DATA N        # during the checkpoint of step 2
    python tests/reliability/killer.py export RUN_DIR OUT N      # during the export's commit
    python tests/reliability/killer.py run N [DDIM-RUN ARGS...]  # while ddim-run stages and commits its outputs

The steps counted are every ``os.replace``, ``os.link``, ``os.unlink``, ``shutil.rmtree`` and
file ``write`` of the phase (for ``run``: every ``os.fsync``, one per staged file, and ``os.replace``, one
per file put in place). Exit 0 means the phase had fewer than N steps (the run completed).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

active = [False]
count = [0]
target = int(sys.argv[2] if sys.argv[1] == "run" else sys.argv[4])


def step(fn):
    def wrapped(*args, **kwargs):
        if active[0]:
            count[0] += 1
            if count[0] == target:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapped


os.replace = step(os.replace)
os.link = step(os.link)
os.unlink = step(os.unlink)
shutil.rmtree = step(shutil.rmtree)
Path.write_bytes = step(Path.write_bytes)
Path.write_text = step(Path.write_text)


def phase(fn, when=lambda *a, **k: True):
    def wrapped(*args, **kwargs):
        active[0] = when(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        finally:
            active[0] = False

    return wrapped


if sys.argv[1] == "run":
    from runtime.cli import main
    from runtime.common.outputs import StagedOutputs

    os.fsync = step(os.fsync)
    StagedOutputs.stage = phase(StagedOutputs.stage)
    StagedOutputs.commit = phase(StagedOutputs.commit)
    try:
        main(sys.argv[3:])
    except SystemExit as exc:
        if exc.code:
            raise
elif sys.argv[1] == "fit":
    import trainer.train as train
    from conftest import tiny_config

    train.save_checkpoint = phase(train.save_checkpoint, lambda run_dir, m, e, state, keep: state.step == 2)
    cfg = tiny_config(steps=3, checkpoint_every=1, keep_checkpoints=1, sample_every=100)
    train.fit(cfg, Path(sys.argv[2]), Path(sys.argv[3]), progress=False)
else:
    import export.pipeline as pipeline

    pipeline.replace_dir = phase(pipeline.replace_dir)
    pipeline.export_run(Path(sys.argv[2]), Path(sys.argv[3]), pipeline.ExportOptions(force=True))
print(f"steps counted: {count[0]}", file=sys.stderr)
