"""Block-diffusion inference: the sampler loop, model runners (reference with a prefix KV cache,
uncached, megatron), prompts of each task and classifier-free guidance. See docs/inference.md."""

from megatron_uni.inference.generate import Generation, GenerationError, GenerationRequest, generate  # noqa: F401
from megatron_uni.inference.guidance import ClassifierFreeGuidance  # noqa: F401
from megatron_uni.inference.runner import ModelRunner, UncachedRunner, block_causal_allowed  # noqa: F401
from megatron_uni.inference.sampling import SamplerSettings  # noqa: F401
