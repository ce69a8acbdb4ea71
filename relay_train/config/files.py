"""Schemas for the files a SimpleTuner config points at: the LyCORIS config, multidatabackend.json and
webhook.json, validated with the same rules as the main config (problems.py): every problem is
collected, each names the key, the bad value and the fix, and secrets (webhook URLs, AWS keys) never
appear in a message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from relay_train import json_text
from relay_train.config.problems import HIDDEN, Where, built, field_problems, unknown_key_problem, with_defaults


# ---------------------------------------------------------------- reading referenced files


def read_json(path: Path) -> tuple[Any, list[str]]:
    """Parse a JSON file; problems for unreadable files, bad JSON and duplicated keys."""
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        data = json_text.loads(path.read_text(encoding="utf-8"), object_pairs_hook=pairs)
    except UnicodeDecodeError as exc:
        return None, [f"{path}: is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8 JSON"]
    except OSError as exc:
        return None, [f"{path}: cannot be read ({exc.strerror or exc}); check the path"]
    except json.JSONDecodeError as exc:
        return None, [f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"]
    except json_text.TooDeepError as exc:
        return None, [f"{path}: {exc}; a config is a few levels deep"]
    return data, [f"{path}: key '{k}' appears more than once; keep one" for k in duplicates]


def resolve_file(value: Path, base_dir: Path, other_suffixes: Iterable[str] = ()) -> tuple[Path | None, list[Path]]:
    """Find a referenced file: as given (cwd), beside the config, then its basename beside it.

    SimpleTuner configs say `config/sd3/x.json` while this repo keeps them in `configs/sd3/`.
    Returns the first path that exists, and every place tried.
    """
    places = [value] if value.is_absolute() else [value, base_dir / value, base_dir / value.name]
    tried: list[Path] = []
    for place in dict.fromkeys(places):
        for candidate in [place, *(place.with_suffix(s) for s in other_suffixes if s != place.suffix)]:
            tried.append(candidate)
            if candidate.is_file():
                return candidate, tried
    return None, tried


# ---------------------------------------------------------------- LyCORIS config


# What lycoris-lora 4.1 reads (lycoris/wrapper.py): create_lycoris's keyword arguments, the preset keys
# LycorisNetwork.apply_preset accepts, and the per-module settings of module_algo_map / name_algo_map
# (create_single_module's and LokrModule's arguments). Anything else would be ignored silently, or fail
# inside LyCORIS after the data work.
LYCORIS_EXTRA_KEYS = (
    "conv_dim",
    "conv_alpha",
    "dropout",
    "rank_dropout",
    "module_dropout",
    "use_tucker",
    "use_scalar",
    "block_size",
    "train_norm",
    "constraint",
    "rescaled",
    "dora_wd",
    "wd_on_output",
    "unbalanced_factorization",
    "decompose_both",
    "rank_dropout_scale",
    "rs_lora",
    "use_cp",
    "use_conv_cp",
    "disable_conv_cp",
)
PRESET_KEYS = (
    "enable_conv",
    "target_module",
    "target_name",
    "module_algo_map",
    "name_algo_map",
    "lora_prefix",
    "use_fnmatch",
    "unet_target_module",
    "unet_target_name",
    "text_encoder_target_module",
    "text_encoder_target_name",
    "exclude_name",
)
MODULE_KEYS = (
    "algo",
    "dim",
    "alpha",
    "factor",
    "use_tucker",
    "use_scalar",
    "decompose_both",
    "rank_dropout_scale",
    "weight_decompose",
    "wd_on_out",
    "full_matrix",
    "bypass_mode",
    "rs_lora",
    "unbalanced_factorization",
    "dropout",
    "rank_dropout",
    "module_dropout",
)


class _PresetShape(BaseModel):
    model_config = ConfigDict(extra="allow")
    target_module: list[str] = []
    module_algo_map: dict[str, dict[str, Any]] = {}
    name_algo_map: dict[str, dict[str, Any]] = {}


def _check_preset(preset: dict[str, Any] | None) -> dict[str, Any] | None:
    if preset is not None:
        _PresetShape.model_validate(preset)
    return preset


def _check_factor(factor: int) -> int:
    if factor != -1 and factor < 1:
        raise ValueError("must be -1 (let LyCORIS choose) or an integer >= 1")
    return factor


class LycorisConfig(BaseModel):
    """The LyCORIS config file: the LoKr adapter's shape and where it attaches."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    algo: Literal["lokr"]
    """LyCORIS algorithm; this trainer builds LoKr adapters."""
    multiplier: float = Field(1.0, ge=-100, le=100)
    """Adapter output scale while training."""
    linear_dim: int = Field(4, gt=0)
    """LoKr rank; with full_matrix a large value (10000) means the full matrix (LyCORIS's default: 4)."""
    linear_alpha: float = Field(1.0, ge=-1e6, le=1e6)
    """LoKr alpha (scale = alpha / dim, unless full_matrix; LyCORIS's default: 1)."""
    factor: Annotated[int, AfterValidator(_check_factor)] = -1
    """Kronecker factor for modules the preset does not override; -1 lets LyCORIS choose."""
    full_matrix: bool = False
    """Train the full LoKr w2 matrix instead of a low-rank one."""
    bypass_mode: bool = False
    """Add the adapter's output instead of merging into the (quantized) base weight."""
    apply_preset: Annotated[dict[str, Any] | None, AfterValidator(_check_preset)] = None
    """Which module classes are wrapped, with per-class overrides (target_module, module_algo_map)."""

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for lycoris.create_lycoris besides multiplier, linear_dim, linear_alpha."""
        skip = {"multiplier", "linear_dim", "linear_alpha", "apply_preset"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}

    def raw(self) -> dict[str, Any]:
        """The file's dict as written, for the adapter's safetensors metadata."""
        return json.loads(json.dumps(self._raw)) if self._raw else self.model_dump()


def _unknown(keys: Iterable[Any], known: tuple[str, ...], where: Where) -> list[str]:
    return [unknown_key_problem(str(k), known, where) for k in keys if k not in known]


def lycoris_key_problems(data: Mapping[str, Any], name: str) -> list[str]:
    """Keys LyCORIS would not read: at the top, in apply_preset, and in each module's or name's settings."""
    top = (*LycorisConfig.model_fields, *LYCORIS_EXTRA_KEYS)
    problems = _unknown(data, top, Where(name))
    preset = data.get("apply_preset")
    if not isinstance(preset, dict):
        return problems
    problems += _unknown(preset, PRESET_KEYS, Where(f"{name}.apply_preset"))
    for map_key in ("module_algo_map", "name_algo_map"):
        entries = preset.get(map_key)
        for target, settings in entries.items() if isinstance(entries, dict) else ():
            if isinstance(settings, dict):
                problems += _unknown(settings, MODULE_KEYS, Where(f"{name}.apply_preset.{map_key}[{target}]"))
    return problems


def load_lycoris(path: Path) -> tuple[LycorisConfig | None, list[str]]:
    data, problems = read_json(path)
    if data is None:
        return None, problems
    if not isinstance(data, dict):
        return None, [*problems, f"{path.name}: must be a JSON object, got {type(data).__name__}"]
    good, errors = field_problems(LycorisConfig, data, Where(path.name))
    errors += lycoris_key_problems(data, path.name)
    if errors or problems:
        return None, problems + errors
    config = built(LycorisConfig, good)
    config._raw = json.loads(json.dumps(data))
    return config, []


# ---------------------------------------------------------------- multidatabackend.json

Resolution = Literal["pixel_area", "pixel"]


class DataBackendConfig(BaseModel):
    """One entry of SimpleTuner's multidatabackend.json."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    id: str
    """Unique name of this dataset; caches and buckets are keyed by it."""
    type: Literal["local", "aws"] = "local"
    """Where the files live: a local folder or an S3 bucket."""
    dataset_type: Literal["image", "text_embeds"] = "image"
    """Training images, or the cache of text-encoder outputs."""
    default: bool = False
    """For text_embeds: the cache that every image dataset uses."""
    text_embeds: str | None = None
    """For an image dataset: the id of the text_embeds backend holding its caption embeddings (null: the default)."""
    disabled: bool = False
    """Skip this entry entirely."""
    instance_data_dir: str | None = None
    """Folder with the images (local backends)."""
    cache_dir: str | None = None
    """Cache folder (text_embeds backends)."""
    cache_dir_vae: str | None = None
    """Where this dataset's VAE latents are cached."""
    caption_strategy: Literal["textfile", "filename", "parquet", "instanceprompt"] = "textfile"
    """Where captions come from."""
    instance_prompt: str | None = None
    """The caption for every image with caption_strategy instanceprompt."""
    resolution: float | None = Field(None, gt=0)
    """Training resolution for this dataset; null uses --resolution."""
    resolution_type: Resolution | None = None
    """How resolution is read; null uses --resolution_type."""
    minimum_image_size: float | None = Field(None, ge=0)
    """Skip images smaller than this; null uses --minimum_image_size."""
    maximum_image_size: float | None = Field(None, gt=0)
    """Downsample images larger than this."""
    target_downsample_size: float | None = Field(None, gt=0)
    """Size to downsample images above maximum_image_size to."""
    crop: bool = False
    """Crop images to the bucket instead of resizing."""
    crop_style: Literal["center", "random", "corner"] = "center"
    """Where the crop is taken."""
    crop_aspect: Literal["square", "preserve", "closest", "random"] = "square"
    """Aspect ratio of the crop."""
    repeats: int = Field(0, ge=0)
    """Extra passes over this dataset per epoch."""
    probability: float = Field(1.0, ge=0)
    """Relative chance this dataset is sampled."""
    aws_bucket_name: str | None = None
    """S3 bucket (aws backends)."""
    aws_region_name: str | None = None
    """S3 region."""
    aws_endpoint_url: str | None = None
    """S3-compatible endpoint; null for AWS itself."""
    aws_data_prefix: str | None = None
    """Key prefix inside the bucket."""
    aws_access_key_id: SecretStr | None = None
    """S3 access key id; null uses the environment or instance role."""
    aws_secret_access_key: SecretStr | None = None
    """S3 secret key; null uses the environment or instance role."""
    metadata_backend: Literal["discovery", "parquet"] = "discovery"
    """How image sizes and captions are indexed."""
    parquet: dict[str, Any] | None = None
    """Parquet caption/metadata table settings."""
    skip_file_discovery: str = ""
    """Discovery steps to skip for this dataset (space-separated)."""
    preserve_data_backend_cache: bool = False
    """Keep this dataset's bucket cache when the config changes."""
    vae_cache_clear_each_epoch: bool = False
    """Rebuild the VAE cache every epoch (for random crops)."""


def _entry_checks(values: Mapping[str, Any], entry: Mapping[str, Any], where: Where) -> list[str]:
    """Keys that one entry's other values make necessary (checked on what was written)."""
    needs = []
    if values["dataset_type"] == "image" and values["type"] == "local":
        needs.append(("instance_data_dir", "a local image backend"))
    if values["type"] == "aws":
        needs.append(("aws_bucket_name", "an aws backend"))
    if values["caption_strategy"] == "instanceprompt":
        needs.append(("instance_prompt", "caption_strategy 'instanceprompt'"))
    return [where.line(f"{who} needs '{key}'") for key, who in needs if not entry.get(key)]


def _set_checks(entries: list[Mapping[str, Any]], name: str) -> list[str]:
    problems = []
    ids = [e.get("id") for e in entries]
    for dup in sorted({i for i in ids if isinstance(i, str) and ids.count(i) > 1}):
        problems.append(f"{name}: id '{dup}' is used by more than one entry; ids must be unique")
    live = [e for e in entries if not e.get("disabled")]
    text = [e for e in live if e.get("dataset_type") == "text_embeds"]
    defaults = [e for e in text if e.get("default") is True]
    if text and len(defaults) != 1:
        problems.append(f'{name}: exactly one text_embeds backend must have "default": true (found {len(defaults)})')
    if not any(e.get("dataset_type", "image") == "image" for e in live):
        problems.append(f"{name}: no enabled image backend; add one with dataset_type 'image'")
    text_ids = [e.get("id") for e in text]
    for entry in live:
        link = entry.get("text_embeds")
        if entry.get("dataset_type", "image") == "image" and link is not None and link not in text_ids:
            known = ", ".join(repr(i) for i in text_ids) or "none"
            problems.append(
                f"{name}[{entry.get('id')}].text_embeds: got {link!r}; it must name an enabled text_embeds backend (ids: {known})"
            )
    return problems


def _entry_where(name: str, index: int, entry: Any) -> Where:
    tag = entry.get("id") if isinstance(entry, dict) else None
    return Where(f"{name}[{tag if isinstance(tag, str) and tag else index}]")


def load_backends(path: Path) -> tuple[list[DataBackendConfig], list[str]]:
    data, problems = read_json(path)
    if data is None:
        return [], problems
    if not isinstance(data, list):
        return [], [*problems, f"{path.name}: must be a JSON list of backends, got {type(data).__name__}"]
    checked: list[dict[str, Any]] = []
    accepted: list[dict[str, Any]] = []
    for index, entry in enumerate(data):
        where = _entry_where(path.name, index, entry)
        if not isinstance(entry, dict):
            problems.append(where.line(f"must be a JSON object, got {type(entry).__name__}"))
            continue
        good, errors = field_problems(DataBackendConfig, entry, where)
        values = with_defaults(DataBackendConfig, good)
        problems += errors + _entry_checks(values, entry, where)
        checked.append(values)
        accepted.append(good)
    problems += _set_checks(checked, path.name)
    if problems:
        return [], problems
    return [built(DataBackendConfig, good) for good in accepted], []


# ---------------------------------------------------------------- webhook.json


class WebhookConfig(BaseModel):
    """One backend of SimpleTuner's webhook config. The URL and token are secrets: masked wherever shown."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    webhook_type: Literal["discord", "raw"] = "discord"
    """Discord messages with images, or raw JSON posted to a callback."""
    webhook_url: SecretStr | None = None
    """Where messages are posted (required for discord; accepted for raw too)."""
    callback_url: SecretStr | None = None
    """SimpleTuner's name for the URL of a raw webhook."""
    auth_token: SecretStr | None = None
    """Sent as the X-API-Key header (raw webhooks)."""
    message_prefix: str | None = None
    """Text put before every message; null uses the tracker project name."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    """Least severe message level that is sent."""
    ssl_no_verify: bool = False
    """Skip TLS certificate checks (self-signed receivers)."""

    @property
    def url(self) -> SecretStr:
        """The URL to post to, whichever key the file used."""
        url = self.webhook_url or self.callback_url
        if url is None:
            raise ValueError("webhook config has no URL")
        return url


def _webhook_checks(values: Mapping[str, Any], where: Where) -> list[str]:
    url = values["webhook_url"] or values["callback_url"]
    if url is None:
        key = "webhook_url" if values["webhook_type"] == "discord" else "callback_url"
        return [where.line(f"a {values['webhook_type']} webhook needs '{key}'")]
    if not url.get_secret_value().startswith(("http://", "https://")):
        return [where.line(f"the URL must start with http:// or https:// (value {HIDDEN})")]
    if problem := webhook_host_problem(url.get_secret_value()):
        return [where.line(problem)]
    return []


# Link-local addresses hold the cloud's metadata service (169.254.169.254: instance credentials, user data);
# no webhook receiver lives there, and a request there from a cluster node is how credentials leak. Names
# that resolve there are refused too. Loopback and private addresses are accepted: a receiver on this
# node or in the same network (a relay sidecar, a self-hosted chat) is a common, deliberate setup, and
# the request reaches only machines the user runs.
METADATA_HOSTS = ("metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal")


def webhook_host_problem(url: str) -> str | None:
    """Why a webhook URL's host is refused, or None; never names the URL or its host (a secret's parts)."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    try:
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
    except ValueError:
        return f"the URL does not parse (value {HIDDEN})"
    if not host:
        return f"the URL names no host (value {HIDDEN})"
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        try:  # the forms a resolver takes without DNS: 2852039166, 0xa9fea9fe, 169.254.43518
            address = ipaddress.ip_address(socket.inet_aton(host))
        except OSError:
            address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if host in METADATA_HOSTS or (address is not None and address.is_link_local):
        return (
            f"the URL's host is link-local or a cloud metadata name (value {HIDDEN}): the metadata service lives "
            "there, never a webhook receiver; point it at the receiver's own address"
        )
    return None


def _webhook_source(source: Path | SecretStr) -> tuple[Any, str, list[str]]:
    """(parsed JSON, name for messages, problems) from a webhook file or inline JSON text.

    Inline text holds URLs, so a parse error names only the position, never the text."""
    if isinstance(source, Path):
        data, problems = read_json(source)
        return data, source.name, problems
    try:
        return json_text.loads(source.get_secret_value()), "webhook_config", []
    except json_text.TooDeepError as exc:
        return None, "webhook_config", [f"'--webhook_config': inline JSON {exc}"]
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        return None, "webhook_config", [f"'--webhook_config': inline JSON is not valid at {where}: {exc.msg}"]


def load_webhook(source: Path | SecretStr) -> tuple[list[WebhookConfig], list[str]]:
    """The backends of a webhook config: a file or inline JSON, holding one object or a list of them."""
    data, name, problems = _webhook_source(source)
    if data is None:
        return [], problems
    if not isinstance(data, (dict, list)):
        return [], [*problems, f"{name}: must be a JSON object or a list of them, got {type(data).__name__}"]
    entries = (
        [(data, Where(name))] if isinstance(data, dict) else [(entry, Where(f"{name}[{i}]")) for i, entry in enumerate(data)]
    )
    accepted: list[dict[str, Any]] = []
    for entry, where in entries:
        if not isinstance(entry, dict):
            problems.append(where.line(f"must be a JSON object, got {type(entry).__name__}"))
            continue
        good, errors = field_problems(WebhookConfig, entry, where)
        accepted.append(good)
        bad = {k for k in entry if k not in good}
        if not bad & {"webhook_url", "callback_url", "webhook_type"}:
            errors += _webhook_checks(with_defaults(WebhookConfig, good), where)
        problems += errors
    if problems:
        return [], problems
    return [built(WebhookConfig, good) for good in accepted], []
