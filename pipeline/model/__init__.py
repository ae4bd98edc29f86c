"""The models: the U-Net, its pre- and post-processing, model cards and files, the registry,
inference.

With ``pipeline.synthesis``, ``pipeline.worker`` and ``train``, the only code that imports
torch; ``preprocess`` and ``registry`` do not, so the node can read model settings and
cards without it.
"""
