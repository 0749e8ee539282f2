"""MetaPatch, built like a PEFT tuner: config / layer / model."""

from cloud_trainer.models.metapatch.config import HEAD, PREFIX, MetaPatchConfig, features_cacheable
from cloud_trainer.models.metapatch.layer import MetaPatchLayer
from cloud_trainer.models.metapatch.model import MetaPatchModel, get_metapatch_model

__all__ = ["HEAD", "PREFIX", "MetaPatchConfig", "MetaPatchLayer", "MetaPatchModel", "features_cacheable",
           "get_metapatch_model"]
