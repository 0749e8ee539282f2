"""Fleet monitoring: ``dccl fleet status`` (one shot) and ``dccl fleet watch`` (live)."""
