"""Validation renders: the prompts rendered with the base, the adapter and its EMA twin, CLIP-scored.

`Validator` loads the SD3 pipeline once (quantized like training) and, per validation, swaps only the
LoKr weights: the LyCORIS network is built once from the adapter's own LyCORIS config (the one written
into its safetensors metadata) and later adapters are loaded into it. The base variant unhooks the
network, so the base model renders exactly as loaded. Pure PyTorch: the Ray actors in
orchestrator/validation.py and `relay validate` both drive this class.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from relay_train import checkpoint as ckpt
from relay_train.config import LycorisConfig, TrainConfig, skip_layer_guidance
from relay_train.data.caches import T5_TOKENS
from relay_train.model import attach_lokr, compute_dtype, quantize_base
from relay_train.validate.clip import ClipScorer, resolve_clip_path
from relay_train.validate.prompts import validation_prompts
from relay_train.validate.results import ADAPTER, BASE, EMA, RenderedImage, ValidationResult, save

log = logging.getLogger(__name__)

AdapterSource = Path | str | Mapping[str, torch.Tensor] | None  # a safetensors file, tensors, or None (the base)


def adapter_variants(config: TrainConfig, adapter: Path, ema: Path | None) -> dict[str, Path]:
    """Policy: which adapter files a validation renders, from use_ema and ema_validation."""
    if not config.use_ema or config.ema_validation == "none":
        return {ADAPTER: adapter}
    if ema is None:
        log.warning(
            "ema_validation %s: no EMA adapter next to %s; rendering the live adapter only", config.ema_validation, adapter
        )
        return {ADAPTER: adapter}
    return {EMA: ema} if config.ema_validation == "ema_only" else {ADAPTER: adapter, EMA: ema}


def checkpoint_variants(config: TrainConfig, folder: Path) -> dict[str, Path]:
    """adapter_variants for a checkpoint folder (only its adapter files are needed)."""
    ema = Path(folder) / ckpt.ADAPTER_EMA
    return adapter_variants(config, Path(folder) / ckpt.ADAPTER, ema if ema.is_file() else None)


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, arXiv 2305.08891, eq. 15-16): match the guided prediction's std to
    the conditional one's, then blend: phi * guided * std(cond)/std(guided) + (1 - phi) * guided."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


@contextlib.contextmanager
def guidance_rescaled(pipeline: Any, phi: float) -> Iterator[None]:
    """SD3's pipeline has no guidance_rescale: keep the transformer's conditional half of each CFG batch and
    rescale the combined prediction the scheduler receives. A no-op at phi 0."""
    if phi <= 0:
        yield
        return
    seen: dict[str, torch.Tensor] = {}
    forward, step = pipeline.transformer.forward, pipeline.scheduler.step

    def keep_conditional(*args, **kwargs):
        out = forward(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        seen["cond"] = sample.chunk(2)[1]  # the pipeline batches [uncond, cond]
        return out

    def rescaled_step(model_output, *args, **kwargs):
        if "cond" in seen and seen["cond"].shape == model_output.shape:
            model_output = rescale_guidance(model_output, seen["cond"], phi)
        return step(model_output, *args, **kwargs)

    pipeline.transformer.forward, pipeline.scheduler.step = keep_conditional, rescaled_step
    try:
        yield
    finally:
        del pipeline.transformer.forward, pipeline.scheduler.step  # back to the class methods


def read_adapter(
    source: Path | str | Mapping[str, torch.Tensor], fallback: LycorisConfig | None
) -> tuple[dict[str, torch.Tensor], LycorisConfig | None]:
    """The adapter's tensors and the LyCORIS config it was trained with (its metadata's, else `fallback`)."""
    if isinstance(source, Mapping):
        return dict(source), fallback
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(source), framework="pt") as fh:
        metadata = fh.metadata() or {}
    lycoris = fallback
    if "lycoris_config" in metadata:
        lycoris = LycorisConfig.model_validate(json.loads(metadata["lycoris_config"]))
    return load_file(str(source)), lycoris


class Validator:
    """Renders config's validation prompts for each adapter variant; the pipeline loads once (`loads`)."""

    def __init__(self, config: TrainConfig, model_path: Path, device: torch.device, clip_path: Path | None = None):
        self.config, self.device, self.dtype = config, torch.device(device), compute_dtype(config, torch.device(device))
        self.prompts = validation_prompts(config)
        if not self.prompts:
            raise ValueError(
                "validation has no prompts: set --validation_prompt, --validation_prompt_library true or --validation_prompt_file"
            )
        self.seed = config.seed if config.validation_seed is None else config.validation_seed
        self.loads = 0
        self.rendered = 0  # images finished in the current render; read by progress reports
        self.pipeline = self._load(Path(model_path))
        self.clip = None
        if config.evaluation_type == "clip":
            self.clip = ClipScorer(clip_path or resolve_clip_path(config.validation_clip_model), self.device)
        self._network: torch.nn.Module | None = None
        self._network_key: str | None = None
        self._applied = False

    def _load(self, model_path: Path):
        """The same base as training: int8-quanto weights when asked, quantized on the CPU first when asked."""
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(model_path, torch_dtype=self.dtype, local_files_only=True)
        if self.config.quantize_via == "cpu":
            quantize_base(pipe.transformer, self.config.base_model_precision)
            pipe.to(self.device)
        else:
            pipe.to(self.device)
            quantize_base(pipe.transformer, self.config.base_model_precision)
        pipe.transformer.requires_grad_(False)
        pipe.transformer.eval()
        pipe.set_progress_bar_config(disable=True)
        if self.config.validation_torch_compile:
            if self.device.type == "cuda":
                pipe.transformer.compile()  # in place; swapping the adapter in or out recompiles once per variant
            else:
                log.info("validation_torch_compile: skipped on %s (only compiled on CUDA)", self.device)
        self.loads += 1
        log.info("validation pipeline loaded from %s on %s (%s)", model_path, self.device, self.dtype)
        return pipe

    # -- the adapter ---------------------------------------------------------------------------------
    def use_adapter(self, source: AdapterSource) -> None:
        """Hook `source` into the transformer at validation_lycoris_strength; None unhooks it (the exact base)."""
        if source is None:
            if self._network is not None and self._applied:
                self._network.restore()
                self._applied = False
            return
        weights, lycoris = read_adapter(source, self.config.lycoris)
        key = json.dumps(lycoris.model_dump() if lycoris else None, sort_keys=True) + repr(sorted(weights))
        if self._network is None or key != self._network_key:
            self.use_adapter(None)
            self._network, self._network_key = self._build_network(lycoris, weights), key
        elif not self._applied:
            self._network.apply_to()
        self._applied = True
        self._network.load_state_dict(weights)  # copies into the network's device and dtype
        self._network.set_multiplier(self.config.validation_lycoris_strength)

    def _build_network(self, lycoris: LycorisConfig | None, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The trainer's own network (same preset, bypass mode) when the weights fit it; otherwise LyCORIS
        infers the modules from the weights (create_lycoris_from_weights), e.g. for a foreign adapter file."""
        transformer = self.pipeline.transformer
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten at once
            network = attach_lokr(transformer, lycoris) if lycoris is not None else None
        own = network.state_dict() if network is not None else {}
        if network is not None and {k: v.shape for k, v in own.items()} != {k: v.shape for k, v in weights.items()}:
            log.warning(
                "adapter tensors do not fit the LyCORIS config (%d tensors vs %d expected, or shapes differ): "
                "building the network from the weights instead",
                len(weights),
                len(own),
            )
            network.restore()
            network = None
        if network is None:
            from lycoris import create_lycoris_from_weights

            network, _ = create_lycoris_from_weights(1.0, None, transformer, weights_sd=weights)
            network.apply_to()
        return network.to(self.device, self.dtype).requires_grad_(False).eval()

    # -- rendering -----------------------------------------------------------------------------------
    def render_one(self, prompt: str, width: int, height: int) -> Image.Image:
        """One image; a fresh CPU generator seeded with validation_seed, so any device draws the same noise."""
        generator = torch.Generator("cpu").manual_seed(self.seed)
        config = self.config
        with torch.inference_mode(), guidance_rescaled(self.pipeline, config.validation_guidance_rescale):
            out = self.pipeline(
                prompt=prompt,
                negative_prompt=config.validation_negative_prompt,
                width=width,
                height=height,
                num_inference_steps=config.validation_num_inference_steps,
                guidance_scale=config.validation_guidance,
                generator=generator,
                max_sequence_length=T5_TOKENS,
                **skip_layer_guidance(config),
            )
        return out.images[0]

    def render(self, adapters: Mapping[str, AdapterSource], step: int) -> ValidationResult:
        """Every prompt at every validation_resolution for each variant (name -> adapter, None = base);
        the base is restored afterwards, even on error."""
        started = time.perf_counter()
        images = []
        self.rendered = 0
        try:
            for variant, source in adapters.items():
                self.use_adapter(source)
                for name, prompt in self.prompts:
                    for width, height in self.config.validation_resolutions:
                        images.append(
                            RenderedImage(variant, name, prompt, self.seed, width, height, self.render_one(prompt, width, height))
                        )
                        self.rendered += 1
        finally:
            self.use_adapter(None)
        if self.clip is not None:
            for image, score in zip(images, self.clip.score([i.image for i in images], [i.prompt for i in images])):
                image.clip_score = score
        result = ValidationResult(step, images, time.perf_counter() - started, variants=list(adapters))
        log.info(
            "validation at step %d: %d image(s) in %.1fs%s",
            step,
            len(images),
            result.seconds,
            "".join(f"; {v} CLIP {s['mean']:.2f}" for v, s in result.scores().items()),
        )
        return result


def validate_offline(
    config: TrainConfig, checkpoint: Path, out: Path | None = None, device: torch.device | None = None
) -> tuple[ValidationResult, Path]:
    """`relay validate`: the same renders for a checkpoint folder (verified against its manifest) or an
    adapter .safetensors file, with the base beside them unless disable_benchmark; written to `out`
    (default <output_dir>/validation/<checkpoint name>)."""
    from relay_train.model import pick_device, resolve_model_path

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        step = ckpt.verify_checkpoint(checkpoint)["step"]
        adapters: dict[str, AdapterSource] = dict(checkpoint_variants(config, checkpoint))
    elif checkpoint.is_file() and checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(checkpoint), framework="pt") as fh:
                step = int((fh.metadata() or {}).get("step", 0))
        except Exception as exc:  # a truncated or corrupt file: one line, not the loader's traceback
            raise ckpt.CheckpointError(
                f"--checkpoint {checkpoint}: not a readable adapter file (truncated or corrupt: {str(exc)[:120]})"
            ) from exc
        adapters = {ADAPTER: checkpoint}
    else:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a checkpoint folder nor an adapter .safetensors file")
    if not config.disable_benchmark:
        adapters = {BASE: None, **adapters}
    out = Path(out) if out else Path(config.output_dir) / "validation" / checkpoint.stem
    validator = Validator(config, resolve_model_path(config.pretrained_model_name_or_path), device or pick_device())
    result = validator.render(adapters, step)
    save(result, out)
    return result, out
