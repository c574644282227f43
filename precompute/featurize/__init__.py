"""Featurize a training set into an index directory (pipeline.py), and everything it runs on.

cli.py: the `featurize` and `reindex` commands. pipeline.py: chunks -> per-bucket fits -> index files,
resumable and sharded. workers.py: the feature computer on worker threads. chunks.py: the resumable on-disk
raw features. sharded_fit.py and collective.py: the per-bucket sums over torchrun's ranks. method_build.py:
each index method's featurize side. calibration.py: exact coordinates and bf16 range from a few gradients.
allocator.py: glibc malloc settings.
"""

__all__ = ["FeaturizeOptions", "build_index", "featurize", "reindex"]


def __getattr__(name: str):
    """`from precompute.featurize import featurize, reindex, FeaturizeOptions`: the pipeline's entry points,
    loaded on first use, so that importing one of the light modules here (allocator, chunks) stays light."""
    if name in __all__:
        from precompute.featurize import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'precompute.featurize' has no attribute {name!r}")
