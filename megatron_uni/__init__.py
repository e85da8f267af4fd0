"""megatron_uni: megatron-core pretraining stack for LLaDA2.0-Uni."""

__version__ = "0.1.0"
