"""dsdistill: distil a frozen, ZeRO-3-sharded teacher LLM into a trainable DeepSpeed student."""

__version__ = "0.1.0"
