"""Lightning callbacks, installed as ``lightning_htrmrl.callbacks``."""

from lightning_htrmrl.callbacks.class_success import ClassSuccess
from lightning_htrmrl.callbacks.clock import FrameRate
from lightning_htrmrl.callbacks.ddp import DDPScaling
from lightning_htrmrl.callbacks.meta_evaluation import MetaTestEvaluation
from lightning_htrmrl.callbacks.progress import RunProgressBar
from lightning_htrmrl.callbacks.tsne import TaskEmbeddingTSNE

__all__ = ["ClassSuccess", "DDPScaling", "FrameRate", "MetaTestEvaluation", "RunProgressBar", "TaskEmbeddingTSNE"]
