"""``ddim-serve``: an HTTP sampling service on Ray Serve.

:mod:`runtime.serving.core` (pydantic + the runtime; no Ray, no torch) validates requests, samples merged
batches and encodes answers; :mod:`runtime.serving.app` is the Ray Serve deployment with its FastAPI ingress;
:mod:`runtime.serving.cli` starts it. Needs the ``serve`` extra.
"""
