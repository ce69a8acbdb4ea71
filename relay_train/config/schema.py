"""TrainConfig: one training run, as SimpleTuner's config.json describes it, with its fields, how each
value is read, and the rules between fields. Reading a config file into it is load.py's job.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
)

from relay_train import json_text
from relay_train.config import compat
from relay_train.config.files import DataBackendConfig, LycorisConfig, WebhookConfig
from relay_train.config.names import check_no_control, check_path_part, path_part_problem
from relay_train.config.problems import ConfigModel

__all__ = ["KEY_ALIASES", "USER_KEYS", "TrainConfig", "canonical_key", "skip_layer_guidance"]

KEY_ALIASES = compat.KEY_ALIASES

SKIP_DISCOVERY_WORDS = ("vae", "aspect", "text", "metadata")
_DERIVED = ("lycoris", "data_backends", "webhook", "source_path")


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


def _output_dir(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty: name the run folder, e.g. 'output/my-run'")
    check_no_control(str(value) if isinstance(value, Path) else value)  # a newline would forge log lines
    if isinstance(value, (str, Path)) and Path(value).exists() and not Path(value).is_dir():
        raise ValueError("is a file, not a folder: checkpoints and exports need a folder; choose another path")
    return value


_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$", re.ASCII)


def _check_repo_id(value: str | None) -> str | None:
    """The Hub's repository id rule (huggingface_hub's validate_repo_id): 'name' or 'namespace/name', letters,
    digits, '-', '_', '.'; no '--' or '..'; not ending in '.git'; the name at most 96 characters."""
    if value is None:
        return None
    if not _REPO_ID.match(value) or "--" in value or ".." in value or value.endswith(".git") or value[:1] in "-.":
        raise ValueError(
            "is not a Hub repository id: use 'namespace/name' (letters, digits, '-', '_', '.'; no '--' or '..'; "
            "at most 96 characters), e.g. 'your-name/sd35-lokr'"
        )
    return value


def _json_list(value: Any) -> Any:
    """SimpleTuner takes a list written as JSON text too ("[7, 8, 9]")."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json_text.loads(value)
        except ValueError:
            return value
    return _empty_is_none(value)


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
    if isinstance(value, str) and "://" in value:  # a webhook URL itself: a secret, never looked up as a file
        raise ValueError(
            'is a URL, not a webhook file: put it in a webhook.json ({"webhook_type": "discord", "webhook_url": '
            '"..."}) or pass that JSON inline; the value is not shown, since it holds the webhook\'s token'
        )
    if isinstance(value, str) and value.strip():
        return Path(value)
    if value is None or value == "" or isinstance(value, (Path, SecretStr)):
        return None if value == "" else value
    raise ValueError("expected a path to a webhook JSON file, inline JSON, or a list of webhook backends")


WebhookSource = Annotated[Path | SecretStr | None, BeforeValidator(_webhook_source)]
Resolution = Literal["pixel_area", "pixel"]


class TrainConfig(ConfigModel):
    """One training run, as the SimpleTuner config.json describes it, resolved and checked."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())

    # model
    pretrained_model_name_or_path: str | None = None
    """Base model: a Hub id or a local diffusers folder (required unless model_flavour names it)."""
    model_family: Literal["sd3"] = "sd3"
    """Model architecture family."""
    model_flavour: Literal["medium", "large"] | None = None
    """SD3.5 variant; checked against the model, and names its Hub id when pretrained_model_name_or_path is unset."""
    model_type: Literal["lora"] = "lora"
    """Train an adapter on a frozen base."""
    lora_type: Literal["lycoris"] = "lycoris"
    """Adapter library; the LyCORIS file sets the adapter's shape."""
    lycoris_config: OptionalPath = Path("config/lycoris_config.json")
    """LyCORIS config file (required with lora_type lycoris; also looked up beside config.json)."""
    lora_rank: int = Field(16, gt=0)
    """PEFT LoRA rank; ignored with lycoris (linear_dim governs)."""
    lora_alpha: float | None = Field(None, gt=0)
    """PEFT LoRA alpha; ignored with lycoris (linear_alpha governs)."""
    init_lora: OptionalPath = None
    """Adapter safetensors to continue training from."""
    init_lora_step: int | None = Field(None, ge=0)
    """Step a fresh run continues from with init_lora; null reads the file's global_step metadata, 0 starts anew."""
    base_model_precision: Literal["int8-quanto", "no_change"] = "no_change"
    """Weight quantization of the frozen base transformer."""
    base_model_default_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype of a quantized base's unquantized weights on the accelerator (with mixed_precision no)."""
    quantize_via: Literal["cpu", "accelerator"] = "accelerator"
    """Device that quantizes the base before training."""
    mixed_precision: Literal["bf16", "no"] = "bf16"
    """Autocast dtype on the accelerator."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory."""
    gradient_checkpointing_interval: int | None = Field(None, ge=1)
    """With gradient_checkpointing: checkpoint contiguous segments of this many transformer blocks as one
    (SimpleTuner 4.10.1's SD3 meaning: fewer saved activations, the same recomputation); null or 1: each block."""
    gradient_checkpointing_segment_stride: int | None = Field(None, ge=1)
    """With gradient_checkpointing_interval > 1: start a segment every this many blocks; the blocks between a
    segment and the next run without checkpointing (faster, more memory). Null: segments back to back."""
    gradient_checkpointing_blocks: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    """Relay's: with gradient_checkpointing (per block), how many transformer blocks are checkpointed, the first
    ones; the rest keep their activations (faster, more memory). auto: every block on the CPU; on CUDA as few as
    the free memory allows (every block on a small card)."""
    lokr_forward: Literal["auto", "materialized", "bypass"] = "auto"
    """Relay's: how the LoKr modules run. materialized builds dW = kron(w1, w2) once per call and applies it as
    one GEMM; bypass is LyCORIS's chain of small GEMMs; auto: materialized on CUDA, bypass on the CPU (faster
    there). Same maths, same saved adapter."""
    transformer_compile: Literal["auto", "on", "off"] = "auto"
    """Relay's: torch.compile each transformer block (regional compile) for training. auto: on with CUDA, off on
    the CPU."""
    adapter_export_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """dtype of the exported adapter files: auto is bf16 with mixed_precision bf16 (as SimpleTuner writes), else fp32.
    Checkpoints always keep fp32, so a resume is exact."""

    # run
    output_dir: Annotated[Path, BeforeValidator(_output_dir)] = Path("output")
    """Run folder (relative to the working directory)."""
    seed: int = 42
    """Seed for sampling, noise and data order."""
    resume_from_checkpoint: Annotated[str, BeforeValidator(_resume)] = "latest"
    """'latest', 'none', or a checkpoint path."""
    max_train_steps: int = Field(0, ge=0)
    """Optimizer steps to train; 0 uses num_train_epochs."""
    num_train_epochs: int = Field(1, ge=0)
    """Epochs to train, when max_train_steps is 0."""
    checkpoint_step_interval: int = Field(500, ge=1)
    """Steps between checkpoints (legacy name: checkpointing_steps)."""
    checkpoints_total_limit: int | None = Field(5, ge=1)
    """Newest checkpoints to keep, in every store (output_dir, storage_path, the Hub); null keeps all."""
    cpu_threads: int | None = Field(None, ge=1)
    """torch and OpenMP threads per process (Relay's); null sizes them to the CPUs the process was given: Ray's
    num_cpus for a worker or validation actor, else OMP_NUM_THREADS when set, else this machine's (relay_train/threads.py)."""

    # optimisation
    train_batch_size: int = Field(4, ge=1)
    """Samples per device per step."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(4e-7, gt=0, le=1)
    """Peak learning rate."""
    optimizer: Literal["adamw_bf16", "optimi-adamw", "bnb-adamw8bit", "adamw"] = "adamw_bf16"
    """Optimizer for the adapter weights (AdamW variants with SimpleTuner's defaults for each; README, Config)."""
    lr_scheduler: Literal["constant_with_warmup", "constant", "cosine", "polynomial", "linear"] = "constant_with_warmup"
    """Learning-rate schedule."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps (may exceed max_train_steps)."""
    lr_end: float = Field(4e-7, ge=0, le=1)
    """Final learning rate of the polynomial schedule."""
    lr_power: float = Field(0.8, gt=0, le=100)
    """Power of the polynomial schedule's decay."""
    max_grad_norm: float = Field(2.0, ge=0)
    """Clipping threshold; 0 disables clipping."""
    grad_clip_method: Literal["value", "norm"] = "value"
    """Clamp each gradient element ('value') or rescale the global norm ('norm')."""
    caption_dropout_probability: float = Field(0.1, ge=0, le=1)
    """Chance a caption is replaced by the empty prompt."""
    flow_schedule_shift: float = Field(3.0, gt=0, le=100)
    """Shift s of the flow-matching sigma schedule: s*sigma / (1 + (s-1)*sigma)."""
    use_ema: bool = False
    """Keep an exponential moving average of the adapter weights."""
    ema_update_interval: int = Field(1, ge=1)
    """Steps between EMA updates."""
    ema_decay: float = Field(0.995, gt=0, lt=1)
    """EMA decay per update."""
    nonfinite_policy: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradient norm is NaN/inf: 'skip' undoes its update and counts it; 'stop' ends the run."""
    max_nonfinite_steps: int = Field(50, ge=1)
    """With nonfinite_policy skip: this many non-finite steps in a row end the run (exit code 3)."""

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
    minimum_image_size: Annotated[float, BeforeValidator(lambda v: 0 if v is None else v)] = Field(0, ge=0)
    """Skip images smaller than this (0 keeps all)."""
    vae_batch_size: int = Field(4, ge=1)
    """Images per VAE batch when caching latents."""
    delete_problematic_images: bool = False
    """Delete images that fail to load or encode."""
    disable_bucket_pruning: bool = False
    """Keep aspect buckets smaller than one batch."""
    skip_file_discovery: Annotated[str, BeforeValidator(_skip_words)] = ""
    """Discovery steps to skip: words from vae, aspect, text, metadata."""
    compress_disk_cache: bool = True
    """Compress cached latents and embeddings on disk."""
    vae_cache_ondemand: bool = False
    """SimpleTuner encodes latents during training; Relay encodes each image once before training either way."""

    # validation
    validation_step_interval: int = Field(100, ge=0)
    """Steps between validation renders (legacy name: validation_steps); 0 disables them."""
    validation_disable: bool = False
    """Turn validation off whatever the interval."""
    validation_seed: int | None = None
    """Seed for validation renders; null uses seed."""
    validation_resolution: Annotated[str, BeforeValidator(_number_as_text), AfterValidator(_check_resolutions)] = "256"
    """Render sizes: 'WxH' or 'N', comma-separated."""
    validation_negative_prompt: str = "blurry, cropped, ugly"
    """Negative prompt for validation renders."""
    validation_guidance: float = Field(7.5, ge=0, le=100)
    """Classifier-free guidance scale for validation."""
    validation_guidance_rescale: float = Field(0.0, ge=0, le=1)
    """Guidance rescale for validation."""
    validation_guidance_skip_layers: Annotated[list[int] | None, BeforeValidator(_json_list)] = None
    """SD3 skip-layer guidance: transformer blocks skipped for the extra guidance pass (e.g. [7, 8, 9])."""
    validation_guidance_skip_layers_start: float = Field(0.01, ge=0, le=1)
    """Fraction of the sampling steps where skip-layer guidance starts."""
    validation_guidance_skip_layers_stop: float = Field(0.2, ge=0, le=1)
    """Fraction of the sampling steps where skip-layer guidance stops."""
    validation_guidance_skip_scale: float = Field(2.8, ge=0, le=100)
    """Scale of the skip-layer guidance."""
    validation_num_inference_steps: int = Field(30, ge=1)
    """Sampler steps per validation render."""
    validation_prompt: str | None = None
    """Validation prompt."""
    validation_prompt_library: bool = False
    """Also render the built-in prompt library (relay_train/validate/prompts.py: text, signs, handwriting, photos)."""
    validation_prompt_file: OptionalPath = None
    """Extra validation prompts: a JSON list (or name -> prompt object), or a text file of one prompt a line."""
    validation_torch_compile: bool = False
    """torch.compile the validation pipeline."""
    validation_lycoris_strength: float = Field(1.0, ge=-10, le=10)
    """Adapter multiplier during validation."""
    evaluation_type: Literal["clip", "none"] | None = "none"
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
    hub_model_id: Annotated[str | None, AfterValidator(_check_repo_id)] = None
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
    tracker_run_name: Annotated[str | None, AfterValidator(check_path_part)] = None
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
    _matched: list[tuple[str, Any]] = PrivateAttr(default_factory=list)

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any], bad: set[str]) -> list[str]:
        """Problems between fields; a check is skipped when one of its keys already failed."""
        problems = []
        if (
            not bad & {"max_train_steps", "num_train_epochs"}
            and values["max_train_steps"] == 0
            and values["num_train_epochs"] == 0
        ):
            problems.append(
                "'--max_train_steps' and '--num_train_epochs' are both 0: "
                "set --max_train_steps (e.g. 300000) or --num_train_epochs above 0"
            )
        if not bad & {"lycoris_config", "lora_type"} and values["lora_type"] == "lycoris" and values["lycoris_config"] is None:
            problems.append("'--lycoris_config' is required with --lora_type 'lycoris': point it at the LyCORIS config file")
        if not bad & {"tracker_run_name", "output_dir"} and values["tracker_run_name"] is None:
            folder = Path(values["output_dir"]).name  # the run's name when tracker_run_name is unset
            if folder and (problem := path_part_problem(folder)):
                problems.append(
                    f"'--output_dir' {str(values['output_dir'])!r}: its last folder names the run, and it {problem}; "
                    "or set --tracker_run_name"
                )
        for key in ("push_to_hub", "push_checkpoints_to_hub"):
            if key not in bad and "hub_model_id" not in bad and values[key] and not values["hub_model_id"]:
                problems.append(f"'--{key}' is true but '--hub_model_id' is not set: name the Hub repository")
        if (
            not bad & {"lr_scheduler", "lr_end", "learning_rate"}
            and values["lr_scheduler"] == "polynomial"
            and values["lr_end"] >= values["learning_rate"]
        ):
            problems.append(
                f"'--lr_end' ({values['lr_end']:g}) must be below '--learning_rate' "
                f"({values['learning_rate']:g}) for the polynomial schedule to decay: lower --lr_end"
            )
        interval, stride = values.get("gradient_checkpointing_interval"), values.get("gradient_checkpointing_segment_stride")
        if not bad & {"gradient_checkpointing_interval", "gradient_checkpointing_segment_stride"} and stride is not None:
            if (interval or 1) <= 1:
                problems.append(
                    f"'--gradient_checkpointing_segment_stride' ({stride}) needs "
                    "'--gradient_checkpointing_interval' above 1 (the segment width): set it, or remove the stride"
                )
            elif stride < interval:
                problems.append(
                    f"'--gradient_checkpointing_segment_stride' ({stride}) must be at least "
                    f"'--gradient_checkpointing_interval' ({interval}): segments cannot overlap"
                )
        blocks = values.get("gradient_checkpointing_blocks")
        if not bad & {"gradient_checkpointing_blocks", "gradient_checkpointing_interval"} and blocks != "auto":
            if (interval or 1) > 1:
                problems.append(
                    f"'--gradient_checkpointing_blocks' ({blocks}) applies to per-block checkpointing, but "
                    f"'--gradient_checkpointing_interval' is {interval}: remove one of the two"
                )
        if not bad & {"init_lora_step", "init_lora"} and values["init_lora_step"] and values["init_lora"] is None:
            problems.append("'--init_lora_step' needs '--init_lora': name the adapter file to continue from")
        if (
            not bad & {"init_lora_step", "max_train_steps"}
            and values["init_lora_step"]
            and 0 < values["max_train_steps"] <= values["init_lora_step"]
        ):
            problems.append(
                f"'--init_lora_step' ({values['init_lora_step']}) must be below '--max_train_steps' "
                f"({values['max_train_steps']}): raise --max_train_steps, or set --init_lora_step 0 to start anew"
            )
        return problems

    @property
    def checkpointing_steps(self) -> int:
        """Steps between checkpoints (checkpoint_step_interval), under the name the loop reads."""
        return self.checkpoint_step_interval

    @property
    def validation_every(self) -> int:
        """validation_step_interval when validation is on; 0 when it is off (validation_disable, an interval
        of 0, or no prompt at all: Relay renders only the prompts it is given). (`validation_steps` is only
        the config key's legacy name.) Validation renders committed checkpoints, so it happens at the
        checkpoint steps among these: see validation_cadence."""
        prompts = self.validation_prompt or self.validation_prompt_library or self.validation_prompt_file
        return 0 if self.validation_disable or not prompts else self.validation_step_interval

    @property
    def validation_cadence(self) -> int:
        """Steps between validations as they happen: a validation renders a committed checkpoint, so every
        lcm(checkpoint_step_interval, validation_every) steps (the defaults 500 and 100: every 500); 0 when off."""
        return math.lcm(self.checkpoint_step_interval, self.validation_every) if self.validation_every else 0

    @property
    def validation_resolutions(self) -> list[tuple[int, int]]:
        """validation_resolution as (width, height) pairs."""
        return parse_resolutions(self.validation_resolution)

    def mapping_notes(self) -> list[str]:
        """The SimpleTuner semantics this run maps explicitly, to log at start-up."""
        notes = [f"'{old}' is read as '--{new}' (SimpleTuner's current name)" for old, new in self._renamed]
        from relay_train.config.notes import NOTE_RULES, _show  # it reads TrainConfig: imported late

        notes += [
            f"SimpleTuner option '--{key}={_show(value)}' is what Relay does anyway; accepted" for key, value in self._matched
        ]
        notes += [n for n in (rule(self) for rule in NOTE_RULES) if n]
        return notes + compat.default_notes(self.model_fields_set | {k for k, _ in self._matched}, self.__dict__)

    def pending_features(self) -> list[str]:
        """Settings parsed now whose feature is not built yet, grouped by feature."""
        groups = [
            ("per-dataset sampling weights and random crop aspects are", self._pending_data()),
        ]
        return [
            f"{what} not built yet: {', '.join(items)} "
            f"{'is' if len(items) == 1 else 'are'} parsed but {'has' if len(items) == 1 else 'have'} "
            "no effect in this run"
            for what, items in groups
            if items
        ]

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


USER_KEYS: tuple[str, ...] = tuple(k for k in TrainConfig.model_fields if k not in _DERIVED)
"""Keys a config file may set (without the leading '--')."""


def canonical_key(key: str) -> str | None:
    """The field a raw key sets ('--flux_schedule_shift' -> 'flow_schedule_shift'), or None."""
    name = key.removeprefix("--")
    name = KEY_ALIASES.get(name, name)
    return name if name in USER_KEYS else None


def skip_layer_guidance(config: TrainConfig) -> dict[str, Any]:
    """StableDiffusion3Pipeline's skip-layer guidance arguments, when validation_guidance_skip_layers is set
    (as SimpleTuner passes them); empty otherwise."""
    if not config.validation_guidance_skip_layers:
        return {}
    return {
        "skip_guidance_layers": list(config.validation_guidance_skip_layers),
        "skip_layer_guidance_scale": config.validation_guidance_skip_scale,
        "skip_layer_guidance_start": config.validation_guidance_skip_layers_start,
        "skip_layer_guidance_stop": config.validation_guidance_skip_layers_stop,
    }
