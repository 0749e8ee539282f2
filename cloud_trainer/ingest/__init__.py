"""Cloud ingest: MQTT patch messages -> validation -> patch store (SQLite / PostgreSQL)."""

from cloud_trainer.ingest.store import LatestPatches, PatchStore, open_store
from cloud_trainer.ingest.validate import Validator, load_keys, load_spec

__all__ = ["LatestPatches", "PatchStore", "Validator", "load_keys", "load_spec", "open_store"]
