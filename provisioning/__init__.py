"""Provisioning boards (``dccl deploy``): the device registry, broker and ingest files generated
from it, board bundles, Raspberry Pi images and installs over SSH. Never imports torch."""
