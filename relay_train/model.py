"""Build the trainable model: SD3 transformer → int8 (quanto) → frozen → LoKr adapter (LyCORIS).

Also the pieces only the data stage needs (VAE, text encoders), loaded separately so they can be
freed before training starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint

from relay_train.config import LycorisConfig, TrainConfig
from relay_train.lokr import describe_paths, resolve_lokr_forward, set_lokr_forward
from relay_train.speed import (
    FirstBlocksCheckpointing,
    block_activation_bytes,
    blocks_to_checkpoint,
    compile_blocks,
    compile_enabled,
)

log = logging.getLogger(__name__)

# Modules kept in full precision when the base is quantized: norms (incl. the adaLN modulation
# linears, named norm1.linear etc.), the patch embedding, the final projection and the
# conditioning embedders. Quantizing these costs quality and saves almost no memory.
QUANTO_EXCLUDE = ["*norm*", "proj_out", "pos_embed*", "context_embedder", "time_text_embed*"]

# LycorisNetwork keeps its targeting rules as class attributes; every build resets them to these
# before applying the user's preset, so one build never leaks into the next.
_PRESET_DEFAULTS = {
    "target_name": [],
    "module_algo_map": {},
    "name_algo_map": {},
    "exclude_name": [],
    "use_fnmatch": False,
    "lora_prefix": "lycoris",
}


class ModelNotFoundError(RuntimeError):
    """The base model is neither a local folder nor reachable on (or cached from) the Hub."""


def looks_local(name_or_path: str) -> bool:
    """Whether the name can only be a local folder (absolute, ./ or ~/, or not Hub's owner/name shape)."""
    return Path(name_or_path).is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1


def resolve_model_path(name_or_path: str) -> Path:
    """A local diffusers folder as is; a Hub id through the Hugging Face cache (downloading when online)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if looks_local(name_or_path):
        raise ModelNotFoundError(f"--pretrained_model_name_or_path: no model folder at {local}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*/*"]
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached: fall through to a download, unless we are offline
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
    reason = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            return Path(snapshot_download(name_or_path, allow_patterns=patterns))
        except Exception as exc:
            reason = f"the download failed: {type(exc).__name__}"
    raise ModelNotFoundError(
        f"--pretrained_model_name_or_path: {name_or_path!r} is not a local folder nor in the Hugging Face "
        f"cache, and {reason}. Download it where the Hub is reachable (`hf download {name_or_path}`, "
        "a gated model needs HF_TOKEN) or point the key at a local diffusers folder."
    )


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 on the GPU with mixed_precision bf16, or for a quantized base with base_model_default_dtype bf16
    (SimpleTuner's weight dtype rule); the CPU always runs fp32 (bf16 matmuls there are slow and imprecise)."""
    quantized_bf16 = config.base_model_precision != "no_change" and config.base_model_default_dtype == "bf16"
    wants_bf16 = config.mixed_precision == "bf16" or quantized_bf16
    return torch.bfloat16 if wants_bf16 and device.type == "cuda" else torch.float32


@dataclass
class AdapterModel:
    transformer: torch.nn.Module
    network: torch.nn.Module  # the LycorisNetwork; its parameters are the only trainable ones

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]


def load_transformer(model_path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(model_path, subfolder="transformer", dtype=dtype)


def quantize_base(transformer: torch.nn.Module, precision: str) -> None:
    """Quantize linear weights in place and freeze them (quanto keeps int8 weights + fp scales)."""
    if precision == "no_change":
        return
    from optimum.quanto import freeze, qint8, quantize

    quantize(transformer, weights=qint8, exclude=QUANTO_EXCLUDE)
    freeze(transformer)


def attach_lokr(transformer: torch.nn.Module, lycoris: LycorisConfig) -> torch.nn.Module:
    """Wrap the preset's module classes with LoKr; returns the network (not a submodule of the transformer)."""
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({**_PRESET_DEFAULTS, **(lycoris.apply_preset or {})})
    network = create_lycoris(
        transformer,
        lycoris.multiplier,
        linear_dim=lycoris.linear_dim,
        linear_alpha=lycoris.linear_alpha,
        **lycoris.create_kwargs(),
    )
    network.apply_to()
    if not any(True for _ in network.parameters()):
        raise ValueError(
            "lycoris_config: the preset matched no module of the transformer; "
            f"target_module={lycoris.apply_preset and lycoris.apply_preset.get('target_module')}"
        )
    return network


class SegmentCheckpointing:
    """SimpleTuner 4.10.1's SD3 segmented checkpointing (gradient_checkpointing_interval, _segment_stride), as
    the function diffusers' block loop calls for each block while checkpointing is on:
    `_gradient_checkpointing_func(block, hidden, encoder_hidden, temb, attention_kwargs)`.

    Blocks [k·stride, k·stride + interval) form segment k. At a segment's first block the whole segment runs
    inside one torch.utils.checkpoint (only its input is kept; backward recomputes all of it); its later blocks
    then hand the segment's output straight back, since the loop passes each block the previous one's output.
    Blocks outside every segment run plainly: no recomputation, their activations kept. The maths is the
    same as per-block checkpointing: the same ops run in the same order, only what is kept differs.
    Assumes the loop calls every block in order, i.e. no skip_layers and no ControlNet residuals (Relay's
    step passes neither)."""

    def __init__(self, blocks: torch.nn.ModuleList, interval: int, stride: int | None = None):
        if interval < 2 or (stride is not None and stride < interval):
            raise ValueError(
                f"segment checkpointing: interval {interval} must be 2 or more and stride {stride} at least the interval"
            )
        self.blocks = list(blocks)
        self.position = {id(block): i for i, block in enumerate(self.blocks)}
        self.interval, self.stride = interval, stride or interval

    def checkpointed(self, index: int) -> bool:
        return index % self.stride < self.interval

    def __call__(
        self, block: torch.nn.Module, hidden: torch.Tensor, encoder_hidden: torch.Tensor | None, *rest: object
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        i = self.position[id(block)]
        offset = i % self.stride
        if offset >= self.interval:
            return block(hidden, encoder_hidden, *rest)
        if offset > 0:  # already run inside its segment's checkpoint
            return encoder_hidden, hidden
        segment = self.blocks[i : i + self.interval]

        def run(h: torch.Tensor, e: torch.Tensor | None, *args: object) -> tuple[torch.Tensor | None, torch.Tensor]:
            for member in segment:
                e, h = member(h, e, *args)
            return e, h

        return torch.utils.checkpoint.checkpoint(run, hidden, encoder_hidden, *rest, use_reentrant=False)


def enable_gradient_checkpointing(transformer: torch.nn.Module, interval: int | None = None, stride: int | None = None) -> None:
    """Per-block checkpointing, diffusers' own (interval null or 1), or SimpleTuner's segments (interval > 1)."""
    if (interval or 1) <= 1:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.enable_gradient_checkpointing(SegmentCheckpointing(transformer.transformer_blocks, interval, stride))


def build_adapter_model(config: TrainConfig, model_path: Path, device: torch.device, seed: int) -> AdapterModel:
    """Load → (quantize on CPU first when quantize_via=cpu) → freeze → device → LoKr (its forward path) →
    gradient checkpointing → regional compile."""
    dtype = compute_dtype(config, device)
    transformer = load_transformer(model_path, dtype)
    if config.quantize_via == "cpu":
        quantize_base(transformer, config.base_model_precision)
        transformer.to(device)
    else:
        transformer.to(device)
        quantize_base(transformer, config.base_model_precision)
    transformer.requires_grad_(False)  # after quantizing: quanto's new weight Parameters default to trainable
    torch.manual_seed(seed)  # the adapter's initial weights are part of the run's determinism
    network = attach_lokr(transformer, config.lycoris).to(device)
    network.requires_grad_(True)
    choose_lokr_forward(network, config.lokr_forward, device)
    if config.init_lora is not None:
        load_adapter_weights(network, config.init_lora)
    if config.gradient_checkpointing:  # after the model and adapter are on the device: free memory decides
        configure_checkpointing(transformer, config, device)
    if compile_enabled(config.transformer_compile, device.type):
        compile_blocks(transformer)
    transformer.train()
    return AdapterModel(transformer=transformer, network=network)


def choose_lokr_forward(network: torch.nn.Module, choice: str, device: torch.device) -> None:
    """Set the LoKr modules' forward path (relay_train/lokr.py) and say once which one they run."""
    paths = set_lokr_forward(network, resolve_lokr_forward(choice, device.type))
    log.info(describe_paths(paths, choice, device.type))


def checkpointed_blocks(config: TrainConfig, transformer: torch.nn.Module, device: torch.device) -> int:
    """gradient_checkpointing_blocks: a pinned count, or auto: every block on the CPU, and on CUDA as few as
    the free memory allows (relay_train/speed.py)."""
    blocks = len(transformer.transformer_blocks)
    if config.gradient_checkpointing_blocks != "auto":
        return min(int(config.gradient_checkpointing_blocks), blocks)
    if device.type != "cuda":
        return blocks
    free, _ = torch.cuda.mem_get_info(device)
    tcfg = transformer.config
    per_block = block_activation_bytes(
        config.train_batch_size,
        config.resolution,
        tcfg.num_attention_heads * tcfg.attention_head_dim,
        compute_dtype(config, device).itemsize,
    )
    count = blocks_to_checkpoint(free, per_block, blocks)
    log.info(
        "gradient checkpointing: %d of %d blocks (%.1f GiB free, about %.2f GiB per block kept; "
        "pin it with gradient_checkpointing_blocks)",
        count,
        blocks,
        free / 2**30,
        per_block / 2**30,
    )
    return count


def configure_checkpointing(transformer: torch.nn.Module, config: TrainConfig, device: torch.device) -> None:
    """SimpleTuner's segments when gradient_checkpointing_interval > 1; else per block, the first N of them."""
    if (config.gradient_checkpointing_interval or 1) > 1:
        enable_gradient_checkpointing(
            transformer, config.gradient_checkpointing_interval, config.gradient_checkpointing_segment_stride
        )
        return
    count = checkpointed_blocks(config, transformer, device)
    if count >= len(transformer.transformer_blocks):
        transformer.enable_gradient_checkpointing()
    elif count > 0:
        transformer.enable_gradient_checkpointing(FirstBlocksCheckpointing(transformer.transformer_blocks, count))


def adapter_file_step(path: Path) -> int | None:
    """The step an adapter file was saved at: SimpleTuner's `global_step` metadata (Relay writes it too),
    else Relay's older `step`; None when neither is there."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    for key in ("global_step", "step"):
        try:
            return int(metadata[key])
        except (KeyError, ValueError):
            continue
    return None


def load_adapter_weights(network: torch.nn.Module, path: Path) -> None:
    """Continue from an adapter file (--init_lora): Relay's export or SimpleTuner's, in bf16 or fp32 (the
    values are copied into the network's fp32 weights). The shapes must match the LyCORIS config."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"--init_lora {path}: does not fit this LyCORIS config "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape mismatches; "
            f"first: {(missing + unexpected + mismatched)[:3]}). Use the lycoris_config it was trained with."
        )
    network.load_state_dict(state)
    log.info("init_lora: continued from %s (%d tensors)", path, len(state))
