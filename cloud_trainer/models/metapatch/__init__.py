"""MetaPatch, built like a PEFT tuner: config / layer / model."""

from cloud_trainer.models.metapatch.config import PREFIX, MetaPatchConfig
from cloud_trainer.models.metapatch.layer import MetaPatchLayer
from cloud_trainer.models.metapatch.model import MetaPatchModel, get_metapatch_model

__all__ = ["PREFIX", "MetaPatchConfig", "MetaPatchLayer", "MetaPatchModel", "get_metapatch_model"]
