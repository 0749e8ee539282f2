"""DCCL: Device-Cloud Collaborative Learning for recommendation.

This package is the small, torch-free shared part of the project: the command-line
dispatcher and the cloud/edge contract (``dccl.protocol``). The learning code lives
in ``cloud_trainer`` (PyTorch), the export in ``onnx_export`` and the device side in
``edge_agent`` (numpy + onnxruntime + paho-mqtt only).
"""

__version__ = "0.1.0"
