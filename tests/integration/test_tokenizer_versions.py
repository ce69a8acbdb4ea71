"""`relay make-tiny-model` builds its tokenizers with the oldest transformers/tokenizers/sentencepiece the project
allows, and with the pair the H200 machine had (transformers 5.17 + tokenizers 0.23.2 + sentencepiece 0.2.2 failed
there: an empty precompiled_charsmap, and a TrainerSpec field 0.2.2's Python schema lacks). Each pair goes into a
throwaway venv that sees this one's other packages; the T5 and CLIP token ids must equal this venv's."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PAIRS = {
    # huggingface_hub 1.33 is the H200's; transformers 5.0-5.17 want one below 2.0 (this venv has 2.x)
    "oldest allowed": ["transformers==5.0.0", "tokenizers==0.22.2", "sentencepiece==0.2.0", "huggingface_hub==1.33.0"],
    "the H200's": ["transformers==5.17.0", "tokenizers==0.23.2", "sentencepiece==0.2.2", "huggingface_hub==1.33.0"],
}

# Builds the whole tiny pipeline, reloads it as the code under test does, prints the versions and token ids.
SCRIPT = """
import json, sys, tempfile
from pathlib import Path
if len(sys.argv) > 1:
    # transformers 5.25 (this venv) brought `kernels` 0.19; 5.0.0 predates it and fails importing it. A real
    # 5.0.0 install has no `kernels`, so this venv's copy is hidden from the old one.
    sys.modules["kernels"] = None
sys.path.insert(0, {repo!r})
import sentencepiece, tokenizers, transformers
from diffusers import StableDiffusion3Pipeline
from relay_train.demo.tiny_model import make_pipeline
with tempfile.TemporaryDirectory() as scratch:
    pipe = StableDiffusion3Pipeline.from_pretrained(make_pipeline(Path(scratch) / "p"), local_files_only=True)
    prompt = "a photo of a cat, the quick brown fox 42"
    print(json.dumps({{
        "versions": [transformers.__version__, tokenizers.__version__, sentencepiece.__version__],
        "t5": pipe.tokenizer_3(prompt).input_ids,
        "clip": pipe.tokenizer(prompt).input_ids,
    }}))
"""


@functools.cache  # this venv's ids, once per process for both pairs
def build_tokenizers(python: str, *args: str) -> dict:
    done = subprocess.run(
        [python, "-c", SCRIPT.format(repo=str(REPO)), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("pins", PAIRS.values(), ids=PAIRS.keys())
def test_tiny_model_tokenizers_build_with_older_transformers(tmp_path, pins):
    venv = tmp_path / "venv"
    # no pip of its own (ensurepip costs seconds): this venv's pip installs into its site-packages
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin/python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # This venv's packages come after the pinned ones: torch, diffusers and the rest are shared, not reinstalled.
    Path(site, "zz_relay_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", site, *pins],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        pytest.skip(f"pip could not install {pins} here: {install.stderr[-500:]}")
    old = build_tokenizers(python, "hide-kernels")
    assert old["versions"] == [pin.split("==")[1] for pin in pins[:3]]
    assert old == {**build_tokenizers(sys.executable), "versions": old["versions"]}
