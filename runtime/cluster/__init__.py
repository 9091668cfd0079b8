"""``ddim-run --cluster``: offline sampling in shards across a Ray cluster.

:mod:`runtime.cluster.shards` splits the (seed, index) range into shards and keeps them on disk (one ``.npz`` per
shard and a ``manifest.json``: resumable, verified by sha256; Ray-free). :mod:`runtime.cluster.run` is what runs on
Ray: one task per shard (the lean runtime in each worker), started or joined as ``ddim-serve`` does. Every image
depends only on its (seed, index) pair and the settings (``runtime.noise.ImageNoise``), so a shard sampled anywhere
is bit for bit the same images as in a single ``ddim-run``.
"""
