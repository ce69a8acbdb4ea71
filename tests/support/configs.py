"""A minimal SimpleTuner-style config for unit tests that parse one (parse_config): its LyCORIS file and
multidatabackend.json are written into `folder`, which is also the base the config's paths resolve from."""

from __future__ import annotations

from pathlib import Path


def raw_config(folder: Path, **extra: object) -> dict[str, object]:
    (folder / "lyco.json").write_text('{"algo": "lokr"}')
    (folder / "data.json").write_text('[{"id": "d", "type": "local", "instance_data_dir": "x"}]')
    return {
        "--pretrained_model_name_or_path": "demo/tiny-sd3",
        "--lycoris_config": "lyco.json",
        "--data_backend_config": "data.json",
        "--max_train_steps": 10,
        **extra,
    }
