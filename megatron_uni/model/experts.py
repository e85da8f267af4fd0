"""Grouped-GEMM experts without TransformerEngine: megatron-core's ``SequentialMLP``, run as one
GEMM per projection for all local experts.

:class:`GroupedExperts` *is* a ``SequentialMLP`` (a subclass): the same ``local_experts.{i}``
MLP modules, parameters, parameter attributes (expert-parallel, no DP all-reduce) and
``sharded_state_dict``, so checkpoints are interchangeable between the two and the conversion
keys are unchanged. Only ``forward`` differs: instead of one small MLP call per expert it runs
``fc1`` and ``fc2`` of every local expert as a single grouped GEMM over the tokens the
dispatcher sorted by expert (``tokens_per_expert`` gives the group sizes).

The GEMM is ``torch._grouped_mm`` where it applies (CUDA, bf16, 16-byte aligned strides) and a
per-group ``matmul`` loop elsewhere (CPU: torch's CPU ``_grouped_mm`` is ~10x slower than the
loop). Neither path builds an autograd graph per expert: :class:`_GroupedLinear` stacks the
expert weights inside forward and again in backward, so no stacked copy of the weights is held
between the two (memory: only the parameters themselves are saved).

Configurations whose MLP forward differs from the plain path (fp8/fp4 padding, fused
bias-activation kernels, TE activations, linear biases, probabilities applied on the input)
fall back to ``SequentialMLP.forward``; that keeps them correct, just not grouped.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

# "auto": torch._grouped_mm where supported, else the loop; tests set "grouped_mm"/"loop" to run
# one path on CPU (the CPU _grouped_mm kernel works, it is just slow)
GEMM_BACKEND = "auto"


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm's layout rule: row- or column-major, every other stride 16-byte aligned."""
    return 1 in t.stride()[-2:] and all((s * t.element_size()) % 16 == 0 for s in t.stride() if s != 1)


def _grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    return hasattr(torch, "_grouped_mm") and a.is_cuda and a.dtype == torch.bfloat16 and _aligned(a) and _aligned(b)


def _use_grouped_mm(x: torch.Tensor, weights: torch.Tensor) -> bool:
    if GEMM_BACKEND == "auto":
        return _grouped_mm_supported(x, weights)
    return GEMM_BACKEND == "grouped_mm"


def _group_bounds(offsets: torch.Tensor) -> List[tuple]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[T, k] x [E, k, n] -> [T, n]``: rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``weights[e]``."""
    if _use_grouped_mm(x, weights):
        return torch._grouped_mm(x, weights, offs=offsets)
    out = x.new_empty(x.shape[0], weights.shape[-1])
    for e, (start, stop) in enumerate(_group_bounds(offsets)):
        torch.matmul(x[start:stop], weights[e], out=out[start:stop])
    return out


def grouped_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[E, n, k]``: per group ``grad_out[g].T @ x[g]`` (the weight gradient of ``y = x W^T``);
    zero for experts that received no token."""
    grad_t = grad_out.t()
    if _use_grouped_mm(grad_t, x):
        return torch._grouped_mm(grad_t, x, offs=offsets)
    bounds = _group_bounds(offsets)
    out = x.new_empty(len(bounds), grad_out.shape[1], x.shape[1])
    for e, (start, stop) in enumerate(bounds):
        torch.matmul(grad_t[:, start:stop], x[start:stop], out=out[e])
    return out


class _GroupedLinear(torch.autograd.Function):
    """``y[g] = x[g] @ W_e^T`` for every expert ``e`` at once; gradients for x and each ``W_e``."""

    @staticmethod
    def forward(ctx, x, offsets, *weights):
        ctx.save_for_backward(x, offsets, *weights)
        stacked = torch.stack(weights)                       # [E, out, in], freed after the GEMM
        return grouped_matmul(x, stacked.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, offsets, *weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_matmul(grad_out, torch.stack(weights), offsets)
        grad_weights = [None] * len(weights)
        if any(ctx.needs_input_grad[2:]):
            grad_weights = list(grouped_weight_grad(grad_out, x, offsets).unbind(0))
        return (grad_x, None, *grad_weights)


def grouped_linear(x: torch.Tensor, offsets: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    return _GroupedLinear.apply(x, offsets, *weights)


class GroupedExperts(SequentialMLP):
    """``SequentialMLP`` with the same parameters and keys, computed as grouped GEMMs."""

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        if not self._plain_mlp_path():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x = permuted_local_hidden_states
        offsets = torch.cumsum(torch.as_tensor(tokens_per_expert).to(x.device), 0).to(torch.int32)
        fc1 = grouped_linear(x, offsets, [e.linear_fc1.weight for e in self.local_experts])
        hidden = _activation(self.config)(fc1)
        # same order and casts as megatron's MLP: scale by the routing probability, back to dtype
        hidden = (hidden * permuted_probs.unsqueeze(-1)).to(fc1.dtype)
        out = grouped_linear(hidden, offsets, [e.linear_fc2.weight for e in self.local_experts])
        return out, None

    def _plain_mlp_path(self) -> bool:
        c = self.config
        return not (c.fp8 or getattr(c, "fp4", None) or c.bias_activation_fusion or c.add_bias_linear
                    or getattr(c, "use_te_activation_func", False) or c.moe_apply_probs_on_input)


def _activation(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """The unfused activation of megatron's ``MLP.forward`` (GLU halves, optional clamp and offset)."""
    if not config.gated_linear_unit:
        return config.activation_func
    clamp: Optional[float] = getattr(config, "activation_func_clamp_value", None)
    offset = getattr(config, "glu_linear_offset", 0.0)

    def glu(x):
        gate, linear = torch.chunk(x, 2, dim=-1)
        if clamp is not None:
            gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(gate) * (linear + offset)

    return glu


EXPERT_IMPLS = {"sequential": SequentialMLP, "grouped": GroupedExperts}


def expert_module(impl: str) -> type:
    """The experts class for ``model.expert_impl``."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"model.expert_impl={impl!r} must be one of {', '.join(EXPERT_IMPLS)}")
    return EXPERT_IMPLS[impl]
