"""Step speed on a GPU: regional torch.compile of the transformer blocks, and how many blocks to checkpoint.

Policies are pure functions (`compile_enabled`, `block_activation_bytes`, `blocks_to_checkpoint`); the
mechanisms below them (`compile_blocks`, `FirstBlocksCheckpointing`) carry their decisions out.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.utils.checkpoint

log = logging.getLogger(__name__)

# Activations one SD3 block keeps for backward, in elements per token per unit of model width. Measured on
# an H200 (../shared/gpu/h200-2026-12-04): 12 blocks run without checkpointing at batch 4, 1024², bf16 took
# 26.5 GiB more than all 24 checkpointed, i.e. 2.2 GiB a block = 44.6 elements × 17,308 tokens × 1536 wide.
# Rounded up (the dual-attention blocks keep more than the rest) so the estimate errs towards checkpointing.
ACTIVATIONS_PER_TOKEN_WIDTH = 52
# What the fully checkpointed step itself needs beyond the weights: the H200's recipe step peaked at 9.76 GiB
# with ~3.3 GiB of int8 base and adapter, so ~6.5 GiB of gradients, optimizer state, checkpoint boundaries
# and one block's recomputation; 8 GiB is kept for it. Of what is left, a further share stays free for the
# estimate's misses: transient buffers (attention, the materialised LoKr ΔW), fragmentation, larger buckets.
FREE_MEMORY_RESERVE = 8 * 2**30
FREE_MEMORY_HEADROOM = 0.2
TEXT_TOKENS = 231  # 77 CLIP + 154 T5 (DESIGN.md)


def compile_enabled(choice: str, device_type: str) -> bool:
    """transformer_compile: auto compiles on CUDA only (on the CPU, compiling costs more than it saves)."""
    return choice == "on" or (choice == "auto" and device_type == "cuda")


def block_activation_bytes(batch: int, resolution: int, width: int, element_size: int) -> int:
    """Bytes one transformer block keeps for backward when not checkpointed: batch × tokens × width × the
    measured activations per token-width, tokens = (resolution/16)² latent patches + 231 text tokens."""
    tokens = (resolution // 16) ** 2 + TEXT_TOKENS
    return batch * tokens * width * element_size * ACTIVATIONS_PER_TOKEN_WIDTH


def blocks_to_checkpoint(
    free_bytes: int,
    per_block_bytes: int,
    blocks: int,
    headroom: float = FREE_MEMORY_HEADROOM,
    reserve: int = FREE_MEMORY_RESERVE,
) -> int:
    """How many of `blocks` to checkpoint so that the others' activations fit in the free memory less the
    step's own reserve and the headroom: as few as fit, and every block when memory is short (a card with
    under ~11 GiB free at the recipe's shape runs as it always did)."""
    if blocks <= 0 or per_block_bytes <= 0:
        return 0
    budget = max(0.0, free_bytes * (1.0 - headroom) - reserve)
    kept = min(blocks, math.floor(budget / per_block_bytes))
    return blocks - kept


class FirstBlocksCheckpointing:
    """diffusers' `_gradient_checkpointing_func` that checkpoints the first `count` blocks (recomputed in
    backward) and runs the rest plainly, keeping their activations. The maths is the same either way."""

    def __init__(self, blocks: torch.nn.ModuleList, count: int):
        self.checkpointed = {id(block) for block in list(blocks)[:count]}
        self.count = count

    def __call__(self, block: torch.nn.Module, *args: object) -> object:
        if id(block) in self.checkpointed:
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def compile_blocks(transformer: torch.nn.Module) -> int:
    """Regional compile: each transformer block compiled in place (nn.Module.compile keeps the state-dict
    keys and the block loop's checkpointing around it). The first forward pays for compilation; it is
    timed and logged once."""
    import torch._dynamo

    blocks = list(transformer.transformer_blocks)
    # The blocks share one code object, so dynamo's per-code recompile limit (8) counts every variant: the block
    # kinds (dual attention, plain, context-pre-only) × whether the input needs grad (block 0's does not) ×
    # a static graph and, once a new bucket or a partial batch changes a size, its dynamic-shape twin. That is
    # up to ~16 legitimate entries; the adapter's input dtype no longer varies (relay_train/lokr.py).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile()
    started: list[float] = []

    def before(*_: object) -> None:
        started.append(time.perf_counter())

    def after(*_: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # once: the time must include the kernels compilation produced
        log.info(
            "regional compile: the first forward (compiling %d transformer blocks) took %.1f s",
            len(blocks),
            time.perf_counter() - started[0],
        )
        pre.remove()
        post.remove()

    pre = transformer.register_forward_pre_hook(before)
    post = transformer.register_forward_hook(after)
    return len(blocks)
