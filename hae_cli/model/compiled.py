"""A decode step that `torch.compile` captures whole: one token in, the next logits out.

The step walks the model's own decoder layers over the cache's fixed-shape storage (a
`StaticStep`: attention over every row of a layer's storage with a validity mask, the new row
written in place at a count kept on the device, the query stashed in a ring), so between two
eviction rounds every call has the same shapes and nothing in it returns to Python: on CUDA,
`mode="reduce-overhead"` replays it as a CUDA graph. The cache's bookkeeping (folds, rounds,
restores, the recycle bin) runs eagerly after the step, as in the eager loop.

The rotary cos/sin of the new position (each layer's, where layers differ) are computed just
before the graph: some families
choose their frequencies with a Python branch on the position (Phi-3.5's long-context
factors), which a graph cannot hold. They are a handful of small kernels.

Compiling costs seconds to a minute at the first call (the warm-up); a compile failure falls
back to the eager step with a note. The compiled function is shared by every step object in
the process, so a second run of the same shapes reuses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hae_cli.checks import finite_logits
from hae_cli.model.decoder import static_decode_step
from hae_cli.model.eager_step import decode_one_token

_COMPILED: dict[tuple, Callable] = {}  # (backend, mode) -> the compiled static_decode_step, one per process
# One graph per storage shape (budget + buffer per layer) and policy: a profile of many policies
# and budgets compiles more than dynamo's default of 8 before it would quietly run eagerly.
RECOMPILE_LIMIT = 64


def compiled_step_function(mode: str | None, backend: str = "inductor") -> Callable:
    key = (backend, mode or "default")
    if key not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[key] = torch.compile(static_decode_step, fullgraph=True, dynamic=False, mode=mode, backend=backend)
    return _COMPILED[key]


def compiled_graphs() -> int:
    """Graphs compiled in this process so far (TorchDynamo's count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def default_mode(device: torch.device) -> str | None:
    """CUDA graphs where there is CUDA; inductor's default (fused kernels) elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


class CompiledStep:
    """Feeds one generated token through the compiled step: `step(token_id, position)` -> logits
    `[vocab]`. `compile=False` runs the same fixed-shape step eagerly (for tests: it isolates
    the compiler from the fixed-shape rewrite). `on_compile` is called with None as the first
    (compiling) call starts and with its seconds when it ends; `note` says why the step fell back
    to eager, if it did."""

    def __init__(self, model, cache, *, compile: bool = True, mode: str | None = None, backend: str = "inductor",
                 on_compile: Callable[[float | None], None] | None = None) -> None:
        self.model, self.cache = model, cache
        self.backbone = model.backbone
        attention = self.backbone.layers[0].self_attn
        self.query_shape = (int(attention.config.num_attention_heads), int(attention.head_dim))
        if mode is None and backend == "inductor":
            mode = default_mode(model.device)
        self.function = compiled_step_function(mode, backend) if compile else static_decode_step
        self.compiling = compile
        self.on_compile = on_compile
        self.warmup_seconds: float | None = None
        self.first_call_end: float | None = None  # when the first (compiling) call was done: speed counts after it
        self.note: str | None = None
        self._eager = False  # fell back
        self._rotary_probe = torch.empty(0, dtype=model.dtype, device=model.device)

    def make_room(self, new_tokens: int) -> None:
        """Before decoding up to `new_tokens` tokens: storage that will not have to grow."""
        self.cache.make_room(new_tokens)

    def __call__(self, token_id: int, position: int) -> torch.Tensor:
        if self._eager:
            return decode_one_token(self.model, token_id, position, self.cache)
        position_ids = self.model.decode_position_ids(position)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        embeddings = self.backbone.position_embeddings(self._rotary_probe, position_ids)
        ids = torch.tensor([[token_id]], device=self.model.device)
        step = self.cache.begin_static_step(self.query_shape)
        first = self.compiling and self.warmup_seconds is None
        if first and self.on_compile is not None:
            self.on_compile(None)
        start = time.perf_counter()
        graphs = compiled_graphs()
        try:
            logits = self.function(self.backbone, ids, embeddings, position_ids, step)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: decode eagerly
            if not first:
                raise
            self._fall_back(error)
            return self(token_id, position)
        if first:  # a warm-up only if it compiled (the process may hold this graph already)
            self.warmup_seconds = time.perf_counter() - start if compiled_graphs() > graphs else 0.0
            if self.on_compile is not None:
                self.on_compile(self.warmup_seconds)
        self.cache.end_static_step()
        finite_logits(logits, self.model)
        if first:
            self.first_call_end = time.perf_counter()
        return logits

    def _fall_back(self, error: Exception) -> None:
        self.cache.abandon_static_step()
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        self.note = f"--compile: the decode step could not be compiled ({type(error).__name__}: {reason}); decoded eagerly"
        self._eager = True
        self.warmup_seconds = 0.0
        if self.on_compile is not None:
            self.on_compile(0.0)
