"""Lightning callbacks, installed as ``lightning_htrmrl.callbacks``."""

from lightning_htrmrl.callbacks.meta_test import MetaTestEvaluation

__all__ = ["MetaTestEvaluation"]
