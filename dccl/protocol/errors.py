"""The one error type of the device-cloud protocol.

Every malformed, forged or out-of-bounds message becomes a ``ProtocolError`` with a
machine-readable ``reason`` (used as a metrics label and stored in quarantine) and a
human-readable detail. Nothing in ``dccl.protocol`` raises anything else on input.
"""

from __future__ import annotations

# The reasons decoding and validation can give. Ingest adds none of its own outside this list.
REASONS = (
    "too_large",         # message longer than MAX_MESSAGE_BYTES
    "truncated",         # ended before a field it announced
    "bad_magic",         # not a DCCL patch envelope
    "bad_version",       # envelope format version this code does not read
    "bad_field",         # a header field out of bounds (length, count, ndim, utf-8, ...)
    "bad_dtype",         # tensor dtype code not float32
    "trailing_bytes",    # bytes after the last tensor and before the signature
    "unknown_device",    # no key for the device id
    "bad_signature",     # HMAC-SHA256 does not verify
    "topic_mismatch",    # device id in the topic differs from the one in the envelope
    "bundle_rejected",   # bundle version not accepted by the cloud
    "spec_mismatch",     # tensor names / shapes / dtypes differ from the trainable spec
    "non_finite",        # NaN or inf in a tensor or metric
    "norm_bound",        # a tensor's L2 norm above the bound
    "stale",             # timestamp outside the accepted window (replay of an old message)
    "bad_payload",       # a JSON payload that is not valid
)


class ProtocolError(ValueError):
    """A message that must be rejected; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown protocol error reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
