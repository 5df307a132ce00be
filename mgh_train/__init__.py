"""mgh_train: everything above the kernels (trainer, synthesizer, evaluation, command line).

It reaches kernels only through ``mgh_kernels``' public functions.

The sentence-transformers integration is importable from here (loaded on first use, since it needs
sentence-transformers, ``pip install mgh[eval]``)::

    from mgh_train import FusedMultipleNegativesRankingLoss, FusedCachedMultipleNegativesRankingLoss
    from mgh_train import ATAPooling

``mgh_train.fit(model_or_name, train_dataset, evaluator=..., ...)`` trains on a ``datasets.Dataset``
(:mod:`mgh_train.api`).
"""

__version__ = "0.1.0"

_LAZY = {
    "FusedMultipleNegativesRankingLoss": "st_losses",
    "FusedCachedMultipleNegativesRankingLoss": "st_losses",
    "ATAPooling": "st_modules",
    "fit": "api",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ATAPooling", "fit", "FusedCachedMultipleNegativesRankingLoss", "FusedMultipleNegativesRankingLoss"]
