"""Data layer (numpy only): datasets, the deployment split, training samples, eval sets."""

from cloud_trainer.data.dataset import RecDataset
from cloud_trainer.data.loaders import DATASET_NAMES, load_dataset
from cloud_trainer.data.samples import (
    DEFAULT_MAX_LEN,
    CTRSamples,
    EvalSet,
    build_ctr_samples,
    build_eval_set,
    iterate_batches,
    take,
    user_rows,
)
from cloud_trainer.data.split import WINDOWS, DeploymentSplit, RoundWindows, activity_group, make_split
from cloud_trainer.data.synthetic import make_synthetic

__all__ = [
    "DATASET_NAMES", "DEFAULT_MAX_LEN", "WINDOWS", "CTRSamples", "DeploymentSplit", "EvalSet",
    "RecDataset", "RoundWindows", "activity_group", "build_ctr_samples", "build_eval_set",
    "iterate_batches", "load_dataset", "make_split", "make_synthetic", "take", "user_rows",
]
