"""The model-runner interface of the sampler, the block-causal rule, and the uncached runner.

A runner owns a cache object for one generation (all rows of it: CFG branches are rows):

    cache = runner.new_cache(rows, block_size)
    runner.commit(cache, tokens, positions, valid)  # append finished blocks (prefill = many blocks)
    logits = runner.forward(cache, tokens, positions)  # one block in progress: [rows, n, vocab]

``commit`` appends whole blocks; the committed tokens attend each other with the block-causal
rule (a key is visible when its block is not after the query's block) and never change again,
so a cached runner computes their keys/values exactly once. ``forward`` computes the current
block only: it sees every committed key plus its own block (bidirectional) and leaves the cache
unchanged. ``valid`` (bool) marks real tokens; invalid ones (the left pad of a CFG branch) are
never attended.

Blocks are counted on the canvas index (the column of the row), not on ``positions``: the pad of
a CFG branch shifts its positions, never its block grid.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch


class ModelRunner(Protocol):
    vocab_size: int       # logits columns
    max_length: int       # longest canvas the model accepts (its position range)
    forwards: int         # model calls so far (refinement + commit), for statistics

    def new_cache(self, rows: int, block_size: int): ...

    def commit(self, cache, tokens: torch.Tensor, positions: torch.Tensor,
               valid: Optional[torch.Tensor] = None) -> None: ...

    def forward(self, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


def block_causal_allowed(query_index: torch.Tensor, key_index: torch.Tensor, block_size: int,
                         key_valid: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows, 1, q, k]``: True where the query (canvas index) may attend the key.

    Block-causal on canvas indices, invalid keys hidden; an invalid query still sees itself so
    that no softmax row is empty (its output is never read).
    """
    q_block = (query_index // block_size)[:, None]
    k_block = (key_index // block_size)[None, :]
    allowed = (k_block <= q_block)[None] & key_valid[:, None, :]
    itself = query_index[:, None] == key_index[None, :]
    return (allowed | itself[None])[:, None]


@dataclasses.dataclass
class KVCache:
    """Rotated keys and values of every committed token, per attention layer (the layout is the
    runner's own), and which of those tokens are real (``valid``)."""

    block_size: int
    rows: int
    layers: Dict[Any, Tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    valid: Optional[torch.Tensor] = None  # bool [rows, T]

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]


LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class TokenCache:
    """What the uncached runner remembers: the committed tokens themselves."""

    block_size: int
    tokens: List[torch.Tensor] = dataclasses.field(default_factory=list)
    positions: List[torch.Tensor] = dataclasses.field(default_factory=list)
    valid: List[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(t.shape[1] for t in self.tokens)


class UncachedRunner:
    """Recomputes committed prefix + current block every step through ``logits_fn(ids,
    positions, allowed)`` with the full block-causal mask: the definition the cache must match.

    ``logits_fn`` takes ``allowed`` as bool ``[rows, 1, S, S]`` (True = may attend) and returns
    ``[rows, S, vocab]``.
    """

    def __init__(self, logits_fn: LogitsFn, vocab_size: int, max_length: int) -> None:
        self.logits_fn = logits_fn
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.forwards = 0

    def new_cache(self, rows: int, block_size: int) -> TokenCache:
        return TokenCache(block_size)

    def commit(self, cache: TokenCache, tokens, positions, valid=None) -> None:
        cache.tokens.append(tokens.clone())
        cache.positions.append(positions.clone())
        cache.valid.append(torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.clone())

    def forward(self, cache: TokenCache, tokens, positions) -> torch.Tensor:
        ids = torch.cat(cache.tokens + [tokens], dim=1)
        pos = torch.cat(cache.positions + [positions], dim=1)
        valid = torch.cat(cache.valid + [torch.ones_like(tokens, dtype=torch.bool)], dim=1)
        index = torch.arange(ids.shape[1])
        allowed = block_causal_allowed(index, index, cache.block_size, valid)
        self.forwards += 1
        return self.logits_fn(ids, pos, allowed)[:, -tokens.shape[1]:]


class CachedRunner(abc.ABC):
    """Base of the runners with a :class:`KVCache`: ``_call_model(tokens, positions, allowed,
    cache, write)`` runs the model on the new tokens only, reading the cached keys/values of
    every attention layer and, when ``write``, appending the new ones."""

    vocab_size: int
    max_length: int

    def __init__(self) -> None:
        self.forwards = 0

    def new_cache(self, rows: int, block_size: int) -> KVCache:
        return KVCache(block_size=block_size, rows=rows)

    @abc.abstractmethod
    def _call_model(self, tokens, positions, allowed, cache: KVCache, write: bool) -> torch.Tensor:
        """Logits of the new tokens; reads the cache, and appends to it when ``write``."""

    def _run(self, cache: KVCache, tokens, positions, valid, write: bool) -> torch.Tensor:
        start = cache.length
        new_valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
        key_valid = new_valid if cache.valid is None else torch.cat([cache.valid, new_valid], dim=1)
        query_index = torch.arange(start, start + tokens.shape[1])
        allowed = block_causal_allowed(query_index, torch.arange(key_valid.shape[1]), cache.block_size, key_valid)
        logits = self._call_model(tokens, positions, allowed, cache, write)
        if write:
            cache.valid = key_valid
        self.forwards += 1
        return logits

    def commit(self, cache: KVCache, tokens, positions, valid=None) -> None:
        self._run(cache, tokens, positions, valid, write=True)

    def forward(self, cache: KVCache, tokens, positions) -> torch.Tensor:
        return self._run(cache, tokens, positions, None, write=False)
