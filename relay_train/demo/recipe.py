"""The demo recipe (configs/demo) pointed at other folders: the one builder tests and benchmarks use."""

from __future__ import annotations

import json
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"


def write_backends(path: Path, data: Path, text_cache: Path, vae_cache: Path | None = None, demo: Path = DEMO) -> Path:
    """`demo`'s multidatabackend.json at `path`, reading images from `data`, the text cache in `text_cache`
    (and the VAE cache in `vae_cache`, else the demo's own)."""
    backends = json.loads((demo / "multidatabackend.json").read_text())
    backends[0]["instance_data_dir"] = str(data)
    if vae_cache is not None:
        backends[0]["cache_dir_vae"] = str(vae_cache)
    backends[1]["cache_dir"] = str(text_cache)
    Path(path).write_text(json.dumps(backends))
    return Path(path)


def write_recipe(
    folder: Path,
    model: Path,
    data: Path,
    *,
    out: str = "out",
    text_cache: Path | None = None,
    vae_cache: Path | None = None,
    lycoris: Path | None = None,
    drop: tuple[str, ...] = (),
    demo: Path = DEMO,
    **keys,
) -> Path:
    """Write `demo`'s config.json and multidatabackend.json into `folder`, as config-<out>.json and
    backends-<out>.json, reading `model` and `data`, with the output in folder/<out> and the text cache in
    `text_cache` (default folder/cache). `keys` set config keys by name: a key the demo writes bare (as
    SimpleTuner allows, e.g. use_ema) stays bare, any other gets "--"; `drop` removes keys as written."""
    folder = Path(folder)
    backend_file = write_backends(folder / f"backends-{out}.json", data, text_cache or folder / "cache", vae_cache, demo)
    raw = json.loads((demo / "config.json").read_text())
    raw.update(
        {
            "--pretrained_model_name_or_path": str(model),
            "--data_backend_config": str(backend_file),
            "--lycoris_config": str(lycoris or demo / "lycoris_config.json"),
            "--output_dir": str(folder / out),
        }
    )
    for key in drop:
        raw.pop(key, None)
    raw.update({f"--{k}" if f"--{k}" in raw or k not in raw else k: v for k, v in keys.items()})
    path = folder / f"config-{out}.json"
    path.write_text(json.dumps(raw, indent=2))
    return path
