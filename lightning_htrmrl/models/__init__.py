"""Context encoders (hierarchical, flat TrMRL, MLP), actor/critic heads and the collection policy."""

from lightning_htrmrl.models.encoders import ContextEncoder, FlatTransformerEncoder, HierarchicalEncoder, MLPEncoder
from lightning_htrmrl.models.heads import make_actor, make_critic
from lightning_htrmrl.models.policy import EpisodicContext, make_policy

__all__ = [
    "ContextEncoder",
    "EpisodicContext",
    "FlatTransformerEncoder",
    "HierarchicalEncoder",
    "MLPEncoder",
    "make_actor",
    "make_critic",
    "make_policy",
]
