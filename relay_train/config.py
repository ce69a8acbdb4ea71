"""The SimpleTuner-style training config, parsed once at the edge into a typed model.

`load_config("configs/sd3/config.json")` reads the JSON (keys written `"--key"` or bare),
applies overrides, renames legacy keys, validates every value, finds the files it points at
(LyCORIS config, multidatabackend.json, webhook.json) and loads them. Every problem found on
the way is reported together in one ConfigError.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SecretStr, model_validator,
)

from relay_train.config_files import (
    DataBackendConfig,
    LycorisConfig,
    WebhookConfig,
    Where,
    field_problems,
    load_backends,
    load_lycoris,
    load_webhook,
    read_json,
    resolve_file,
    unknown_key_problem,
    validate_field,
    with_defaults,
)

__all__ = [
    "ConfigError", "DataBackendConfig", "LycorisConfig", "TrainConfig", "WebhookConfig",
    "KEY_ALIASES", "USER_KEYS", "canonical_key", "load_config", "parse_config",
]

logger = logging.getLogger(__name__)

KEY_ALIASES: dict[str, str] = {"flux_schedule_shift": "flow_schedule_shift"}
"""Old or upstream key names and the field each one now sets."""

SKIP_DISCOVERY_WORDS = ("vae", "aspect", "text", "metadata")
_DERIVED = ("lycoris", "data_backends", "webhook", "source_path")
_FILE_KEYS: dict[str, tuple[str, ...]] = {
    "lycoris_config": (".json", ".conf"),  # the model card names it both ways
    "data_backend_config": (),
    "webhook_config": (),
    "init_lora": (),
    "validation_prompt_file": (".json", ".txt"),
}


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str], source: str | Path | None = None) -> None:
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) in {source or 'the training config'}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


# ---------------------------------------------------------------- value normalisers


def _is_off(value: Any, words: tuple[str, ...]) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in words)


def _resume(value: Any) -> Any:
    if _is_off(value, ("", "none")):
        return "none"
    return "latest" if isinstance(value, str) and value.strip().lower() == "latest" else value


def _skip_words(value: Any) -> Any:
    if _is_off(value, ("", "false", "none")):
        return ""
    allowed = ", ".join(map(repr, SKIP_DISCOVERY_WORDS))
    if not isinstance(value, str):
        raise ValueError(f"expected space-separated words from {allowed} (or false)")
    words = value.replace(",", " ").split()
    wrong = [w for w in words if w not in SKIP_DISCOVERY_WORDS]
    if wrong:
        raise ValueError(f"unknown step(s) {', '.join(map(repr, wrong))}; use words from {allowed}")
    return " ".join(words)


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """'1024x1024' -> [(1024, 1024)]; '1024' is square; several are comma-separated."""
    sizes = []
    for part in (p.strip() for p in str(text).split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*x\s*(\d+))?", part)
        if not match:
            raise ValueError("expected 'WIDTHxHEIGHT' or 'N' (square), comma-separated for several")
        width = int(match[1])
        height = int(match[2] or match[1])
        # SD3 latents are 1/8 of the image and the transformer patches them 2x2.
        if width <= 0 or height <= 0 or width % 16 or height % 16:
            raise ValueError(f"{part!r}: width and height must be positive multiples of 16")
        sizes.append((width, height))
    return sizes


def _number_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _none_word(value: Any) -> Any:
    return "none" if value is None else value


def _check_alignment(value: int) -> int:
    if value not in (16, 32, 64):
        raise ValueError("must be 16, 32 or 64 (SD3 needs multiples of 16: 8x VAE, 2x2 patches)")
    return value


def _check_resolutions(text: str) -> str:
    parse_resolutions(text)
    return text


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]


def _webhook_source(value: Any) -> Any:
    """SimpleTuner's webhook_config is a path, inline JSON text, or (via overrides) the parsed JSON.
    Inline JSON holds webhook URLs, so it is kept as a secret and masked wherever the config is shown."""
    if isinstance(value, (dict, list)):
        return SecretStr(json.dumps(value))
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        return SecretStr(value)
    if isinstance(value, str) and value.strip():
        return Path(value)
    if value is None or value == "" or isinstance(value, (Path, SecretStr)):
        return None if value == "" else value
    raise ValueError("expected a path to a webhook JSON file, inline JSON, or a list of webhook backends")


WebhookSource = Annotated[Path | SecretStr | None, BeforeValidator(_webhook_source)]
Resolution = Literal["pixel_area", "pixel"]


class TrainConfig(BaseModel):
    """One training run, as the SimpleTuner config.json describes it, resolved and checked."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())

    # model
    pretrained_model_name_or_path: str
    """Base model: a Hub id or a local diffusers folder."""
    model_family: Literal["sd3"] = "sd3"
    """Model architecture family."""
    model_type: Literal["lora"] = "lora"
    """Train an adapter on a frozen base."""
    lora_type: Literal["lycoris"] = "lycoris"
    """Adapter library; the LyCORIS file sets the adapter's shape."""
    lycoris_config: OptionalPath = None
    """LyCORIS config file (required with lora_type lycoris)."""
    lora_rank: int | None = Field(None, gt=0)
    """PEFT LoRA rank; ignored with lycoris (linear_dim governs)."""
    lora_alpha: float | None = Field(None, gt=0)
    """PEFT LoRA alpha; ignored with lycoris (linear_alpha governs)."""
    init_lora: OptionalPath = None
    """Adapter safetensors to continue training from."""
    base_model_precision: Literal["int8-quanto", "no_change"] = "no_change"
    """Weight quantization of the frozen base transformer."""
    quantize_via: Literal["cpu", "accelerator"] = "accelerator"
    """Device that quantizes the base before training."""
    mixed_precision: Literal["bf16", "no"] = "bf16"
    """Autocast dtype on the accelerator."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    # run
    output_dir: Path = Path("output")
    """Run folder (relative to the working directory)."""
    seed: int = 42
    """Seed for sampling, noise and data order."""
    resume_from_checkpoint: Annotated[str, BeforeValidator(_resume)] = "latest"
    """'latest', 'none', or a checkpoint path."""
    max_train_steps: int = Field(0, ge=0)
    """Optimizer steps to train; 0 uses num_train_epochs."""
    num_train_epochs: int = Field(0, ge=0)
    """Epochs to train, when max_train_steps is 0."""
    checkpointing_steps: int = Field(500, ge=1)
    """Steps between checkpoints."""
    checkpoints_total_limit: int | None = Field(None, ge=1)
    """Newest checkpoints to keep; null keeps all."""

    # optimisation
    train_batch_size: int = Field(1, ge=1)
    """Samples per device per step."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    optimizer: Literal["bnb-adamw8bit", "adamw"] = "adamw"
    """Optimizer for the adapter weights."""
    lr_scheduler: Literal["constant_with_warmup", "constant", "cosine"] = "constant"
    """Learning-rate schedule."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps (may exceed max_train_steps)."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clipping threshold; 0 disables clipping."""
    grad_clip_method: Literal["value", "norm"] = "value"
    """Clamp each gradient element ('value') or rescale the global norm ('norm')."""
    caption_dropout_probability: float = Field(0.0, ge=0, le=1)
    """Chance a caption is replaced by the empty prompt."""
    flow_schedule_shift: float = Field(3.0, gt=0)
    """Shift s of the flow-matching sigma schedule: s*sigma / (1 + (s-1)*sigma)."""
    use_ema: bool = False
    """Keep an exponential moving average of the adapter weights."""
    ema_update_interval: int = Field(1, ge=1)
    """Steps between EMA updates."""
    ema_decay: float = Field(0.995, gt=0, lt=1)
    """EMA decay per update."""

    # data
    data_backend_config: Path
    """multidatabackend.json: the datasets and caches."""
    resolution: int = Field(1024, gt=0)
    """Training resolution (edge in pixels, or sqrt of the area for pixel_area)."""
    resolution_type: Resolution = "pixel_area"
    """How resolution is read: 'pixel_area' keeps the area, 'pixel' the short edge."""
    aspect_bucket_rounding: int = Field(2, ge=0, le=4)
    """Decimal places aspect ratios are rounded to when bucketing."""
    aspect_bucket_alignment: Annotated[int, AfterValidator(_check_alignment)] = 64
    """Bucket edges snap to multiples of this many pixels."""
    minimum_image_size: float = Field(0, ge=0)
    """Skip images smaller than this (0 keeps all)."""
    vae_batch_size: int = Field(4, ge=1)
    """Images per VAE batch when caching latents."""
    delete_problematic_images: bool = False
    """Delete images that fail to load or encode."""
    disable_bucket_pruning: bool = False
    """Keep aspect buckets smaller than one batch."""
    skip_file_discovery: Annotated[str, BeforeValidator(_skip_words)] = ""
    """Discovery steps to skip: words from vae, aspect, text, metadata."""
    compress_disk_cache: bool = False
    """Compress cached latents and embeddings on disk."""

    # validation
    validation_steps: int = Field(0, ge=0)
    """Steps between validation renders; 0 disables them."""
    validation_seed: int | None = None
    """Seed for validation renders; null uses seed."""
    validation_resolution: Annotated[str, BeforeValidator(_number_as_text),
                                     AfterValidator(_check_resolutions)] = "1024x1024"
    """Render sizes: 'WxH' or 'N', comma-separated."""
    validation_negative_prompt: str = ""
    """Negative prompt for validation renders."""
    validation_guidance: float = Field(7.0, ge=0)
    """Classifier-free guidance scale for validation."""
    validation_guidance_rescale: float = Field(0.0, ge=0)
    """Guidance rescale for validation."""
    validation_num_inference_steps: int = Field(30, ge=1)
    """Sampler steps per validation render."""
    validation_prompt: str | None = None
    """Validation prompt."""
    validation_prompt_library: bool = False
    """Also render the built-in prompt library (relay_train/prompts.py: text, signs, handwriting, photos)."""
    validation_prompt_file: OptionalPath = None
    """Extra validation prompts: a JSON list (or name -> prompt object), or a text file of one prompt a line."""
    validation_torch_compile: bool = False
    """torch.compile the validation pipeline."""
    validation_lycoris_strength: float = 1.0
    """Adapter multiplier during validation."""
    evaluation_type: Literal["clip", "none"] | None = None
    """Score validation renders (CLIP score)."""
    ema_validation: Literal["none", "ema_only", "comparison"] = "comparison"
    """With use_ema: render with the EMA weights, or both for comparison."""
    disable_benchmark: bool = False
    """Skip the step-0 validation of the base model."""
    validation_clip_model: str = "openai/clip-vit-large-patch14"
    """CLIP for evaluation_type clip: a local folder, or a Hub id already in the Hugging Face cache."""
    validation_num_gpus: float = Field(1.0, ge=0)
    """GPUs per validation actor (kept apart from training's); the pool uses 0 when the cluster has none."""
    validation_actors: int = Field(1, ge=1)
    """Validation actors, each holding the pipeline loaded once."""
    validation_queue_size: int = Field(2, ge=1)
    """Validations waiting beyond those running; when full the newest wins and the oldest is skipped (logged)."""

    # hub
    hub_model_id: str | None = None
    """Hub repository for checkpoints and the final adapter."""
    push_to_hub: bool = False
    """Upload the final adapter to the Hub."""
    push_checkpoints_to_hub: bool = False
    """Mirror checkpoints to the Hub."""
    hub_private: bool = True
    """Create the Hub repository private when it does not exist yet (an existing repo keeps its visibility)."""
    super_squash_history: bool = False
    """After the Hub mirror prunes old checkpoints, squash the repo's history (at most hourly) so the
    deleted files stop holding space; the commit history is lost."""

    # tracking
    report_to: Annotated[Literal["wandb", "none"], BeforeValidator(_none_word)] = "none"
    """Experiment tracker."""
    tracker_project_name: str | None = None
    """Tracker project."""
    tracker_run_name: str | None = None
    """Tracker run name; also names the Ray run and the exported adapter files."""
    webhook_config: WebhookSource = None
    """Webhook backends (Discord or raw JSON): a webhook.json path, inline JSON, or a list of backends."""

    # derived: loaded from the files above, never user keys
    lycoris: LycorisConfig | None = None
    """The loaded LyCORIS config."""
    data_backends: list[DataBackendConfig] = []
    """The loaded multidatabackend.json entries."""
    webhook: list[WebhookConfig] = []
    """The loaded webhook backends (from webhook_config)."""
    source_path: Path | None = None
    """The config file this was read from."""

    _renamed: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        problems = cross_field_problems(self.__dict__, bad=set())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def validation_resolutions(self) -> list[tuple[int, int]]:
        """validation_resolution as (width, height) pairs."""
        return parse_resolutions(self.validation_resolution)

    def mapping_notes(self) -> list[str]:
        """The SimpleTuner semantics this run maps explicitly, to log at start-up."""
        notes = [f"'{old}' is read as '--{new}' (renamed upstream)" for old, new in self._renamed]
        return notes + [n for n in (rule(self) for rule in _NOTE_RULES) if n]

    def pending_features(self) -> list[str]:
        """Settings parsed now whose feature arrives in a later issue, grouped by feature."""
        groups = [
            ("per-dataset sampling weights and random crop aspects are", 3, self._pending_data()),
        ]
        return [f"{what} not built yet (issue {issue}): {', '.join(items)} "
                f"{'is' if len(items) == 1 else 'are'} parsed but {'has' if len(items) == 1 else 'have'} "
                "no effect in this run" for what, issue, items in groups if items]

    def _pending_data(self) -> list[str]:
        """The few multidatabackend settings the data pipeline still ignores."""
        name = self.data_backend_config.name
        items = []
        for backend in self.data_backends:
            where = f"{name}[{backend.id}]"
            items += [f"{where}.crop_aspect=random"] if backend.crop and backend.crop_aspect == "random" else []
            items += [f"{where}.probability={backend.probability:g}"] if backend.probability != 1.0 else []
        return items

    def resolved_dict(self) -> dict[str, Any]:
        """JSON-safe resolved config (paths as strings, secrets masked), saved with checkpoints."""
        return self.model_dump(mode="json")

    def resolved_json(self) -> str:
        return json.dumps(self.resolved_dict(), sort_keys=True, indent=2)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return str(value)


def _note_lycoris_dims(c: TrainConfig) -> str | None:
    if c.lora_rank is None and c.lora_alpha is None:
        return None
    dims = (f"linear_dim={c.lycoris.linear_dim}, linear_alpha={c.lycoris.linear_alpha:g}"
            if c.lycoris else "linear_dim and linear_alpha")
    alpha = "unset" if c.lora_alpha is None else f"{c.lora_alpha:g}"
    return (f"--lora_rank={c.lora_rank}, --lora_alpha={alpha} are ignored with "
            f"--lora_type=lycoris: the LyCORIS file's {dims} set the adapter")


def _note_quantize(c: TrainConfig) -> str | None:
    if c.base_model_precision == "no_change":
        return None
    where = ("on the CPU, then moved to the accelerator (lower peak accelerator memory, slower start)"
             if c.quantize_via == "cpu" else "after it is moved to the accelerator")
    return f"--quantize_via={c.quantize_via}: the base transformer is quantized to int8 {where}"


def _note_benchmark(c: TrainConfig) -> str | None:
    if "disable_benchmark" not in c.model_fields_set:
        return None
    effect = "is skipped" if c.disable_benchmark else "is rendered once by the validation pool as the reference"
    return (f"--disable_benchmark={_show(c.disable_benchmark)}: SimpleTuner's step-0 validation "
            f"of the base model (the 'benchmark') {effect}")


def _note_length(c: TrainConfig) -> str | None:
    if c.max_train_steps > 0 and c.num_train_epochs > 0:
        return (f"--num_train_epochs={c.num_train_epochs} is ignored: "
                f"--max_train_steps={c.max_train_steps} sets the run length")
    return None


def _note_clipping(c: TrainConfig) -> str | None:
    if c.max_grad_norm == 0:
        return "--max_grad_norm=0: gradient clipping is off"
    if c.grad_clip_method == "value":
        return (f"--grad_clip_method=value: each gradient element is clamped to "
                f"[-{c.max_grad_norm:g}, {c.max_grad_norm:g}] (--max_grad_norm), not the global norm")
    return None


_NOTE_RULES = (_note_lycoris_dims, _note_quantize, _note_benchmark, _note_length, _note_clipping)

USER_KEYS: tuple[str, ...] = tuple(k for k in TrainConfig.model_fields if k not in _DERIVED)
"""Keys a config file may set (without the leading '--')."""


def canonical_key(key: str) -> str | None:
    """The field a raw key sets ('--flux_schedule_shift' -> 'flow_schedule_shift'), or None."""
    name = key.removeprefix("--")
    name = KEY_ALIASES.get(name, name)
    return name if name in USER_KEYS else None


def cross_field_problems(values: Mapping[str, Any], bad: set[str]) -> list[str]:
    """Problems between fields; a check is skipped when one of its keys already failed."""
    problems = []
    if not bad & {"max_train_steps", "num_train_epochs"} and \
            values["max_train_steps"] == 0 and values["num_train_epochs"] == 0:
        problems.append("'--max_train_steps' and '--num_train_epochs' are both 0: "
                        "set --max_train_steps (e.g. 300000) or --num_train_epochs above 0")
    if not bad & {"lycoris_config", "lora_type"} and \
            values["lora_type"] == "lycoris" and values["lycoris_config"] is None:
        problems.append("'--lycoris_config' is required with --lora_type 'lycoris': "
                        "point it at the LyCORIS config file")
    for key in ("push_to_hub", "push_checkpoints_to_hub"):
        if key not in bad and "hub_model_id" not in bad and values[key] and not values["hub_model_id"]:
            problems.append(f"'--{key}' is true but '--hub_model_id' is not set: name the Hub repository")
    return problems


# ---------------------------------------------------------------- parsing


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    first, errors_a = validate_field(TrainConfig, key, a, key)
    second, errors_b = validate_field(TrainConfig, key, b, key)
    return not errors_a and not errors_b and first == second


def _canonical(raw: Mapping[str, Any], problems: list[str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Strip '--', apply KEY_ALIASES, report unknown keys and conflicting spellings."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    renamed: list[tuple[str, str]] = []
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
            continue
        name = canonical_key(key)
        if name is None:
            problems.append(unknown_key_problem(key, USER_KEYS, Where(dashes="--"), KEY_ALIASES))
            continue
        if key.removeprefix("--") in KEY_ALIASES:
            renamed.append((key, name))
        if name in values and not _same(name, values[name], value):
            problems.append(f"'{spelled[name]}' and '{key}' both set '--{name}', to {values[name]!r} "
                            f"and {value!r}: keep only '--{name}'")
            continue
        values.setdefault(name, value)
        spelled.setdefault(name, key)
    return values, renamed


def _resolve_files(good: dict[str, Any], base_dir: Path, problems: list[str]) -> None:
    for key, suffixes in _FILE_KEYS.items():
        if not isinstance(good.get(key), Path):  # absent, or inline JSON (webhook_config)
            continue
        found, tried = resolve_file(good[key], base_dir, suffixes)
        if found is None:
            places = ", ".join(str(p) for p in tried)
            problems.append(f"'--{key}': file {str(good.pop(key))!r} not found; tried {places}")
        else:
            good[key] = found


_LOADERS = {
    "lycoris_config": ("lycoris", load_lycoris),
    "data_backend_config": ("data_backends", load_backends),
    "webhook_config": ("webhook", load_webhook),
}


def _load_files(good: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    derived: dict[str, Any] = {}
    for key, (field, loader) in _LOADERS.items():
        if good.get(key) is not None:
            derived[field], found = loader(good[key])
            problems.extend(found)
    return derived


def parse_config(raw: dict[str, Any], base_dir: Path, *, overrides: Mapping[str, Any] | None = None,
                 source_path: Path | None = None) -> TrainConfig:
    """Validate a SimpleTuner-style config dict; referenced files are looked up from base_dir."""
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a JSON object of '--key': value, got {type(raw).__name__}"],
                          source_path)
    problems: list[str] = []
    values, renamed = _canonical(raw, problems)
    if overrides:
        extra, renamed_too = _canonical(overrides, problems)
        values.update(extra)
        renamed += renamed_too
    good, errors = field_problems(TrainConfig, values, Where(dashes="--"), known=USER_KEYS)
    problems += errors + cross_field_problems(with_defaults(TrainConfig, good), set(values) - set(good))
    _resolve_files(good, Path(base_dir), problems)
    derived = _load_files(good, problems)
    if problems:
        raise ConfigError(problems, source_path)
    config = TrainConfig.model_validate({**good, **derived, "source_path": source_path})
    config._renamed = renamed
    return config


def load_config(path: str | Path, overrides: dict[str, object] | None = None) -> TrainConfig:
    """Read, validate and resolve a SimpleTuner-style config.json; raises ConfigError."""
    path = Path(path)
    raw, problems = read_json(path)
    if raw is None:
        raise ConfigError(problems, path)
    try:
        config = parse_config(raw, path.parent, overrides=overrides, source_path=path)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems, path) from None
    if problems:
        raise ConfigError(problems, path)
    logger.debug("loaded training config from %s", path)
    return config
