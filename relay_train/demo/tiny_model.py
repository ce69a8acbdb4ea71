"""Randomly initialised StableDiffusion3Pipeline folders, built fully offline.

`make_pipeline` writes the same diffusers layout as stabilityai/stable-diffusion-3.5-medium
(model_index.json plus one folder per component), so code under test loads it through
`StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True)` exactly as it would load
the real model; `relay make-tiny-model PATH [--preset sd35m] [--seed N]` writes one from the shell. Presets:

- "tiny": every component a few hundred kB; renders 64-512 px images in well under a second on CPU.
- "sd35m": the real SD3.5 Medium transformer (~2.2B parameters, saved in bfloat16, ~5 GB) with
  1-layer text encoders of the real widths, for GPU memory/throughput benchmarks.

SD3 conditioning fixes some widths: CLIP-L and CLIP-G hidden states are concatenated and
zero-padded to the T5 width, so T5 d_model == transformer joint_attention_dim >= L + G hidden;
the pooled vector is cat(L, G) text_embeds, so L + G projection_dim == pooled_projection_dim.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from sentencepiece import sentencepiece_model_pb2
from transformers.convert_slow_tokenizer import bytes_to_unicode

from relay_train.demo.data import COLOURS, SHAPES, SIZE_WORDS, WORDS

log = logging.getLogger(__name__)

PRESETS: tuple[str, ...] = ("tiny", "sd35m")

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512  # T5's usual limit; SD3 pipelines pass max_sequence_length (we use 154) anyway

_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 8,  # default render size: 8 latents * 8 = 64 px
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 16,
        # 4 × 16 = 64 = the patch's output width (2·2·16), so the adapter can reach every output
        # dimension through the frozen random proj_out; at 32 wide, overfitting stalls early.
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "caption_projection_dim": 64,  # must equal heads * head_dim
        "pooled_projection_dim": 64,
        # Longest side <= pos_embed_max_size * patch_size * 8 = 512 px.
        "pos_embed_max_size": 32,
        "dual_attention_layers": (0,),
        "qk_norm": "rms_norm",
    },
    "sd35m": {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    },
}


@dataclass(frozen=True)
class _TextWidths:
    clip_l: tuple[int, int, int, int]  # hidden, projection, intermediate, heads
    clip_g: tuple[int, int, int, int]
    t5: tuple[int, int, int, int]  # d_model, d_kv, d_ff, heads
    layers: int


_TEXT: dict[str, _TextWidths] = {
    "tiny": _TextWidths(clip_l=(32, 32, 64, 2), clip_g=(32, 32, 64, 2), t5=(64, 16, 128, 4), layers=2),
    "sd35m": _TextWidths(clip_l=(768, 768, 256, 12), clip_g=(1280, 1280, 256, 20), t5=(4096, 64, 256, 4), layers=1),
}
_VAE_CHANNELS = (16, 16, 16, 16)  # 4 blocks: 8x spatial downsampling, as in SD3's VAE


def transformer_config(preset: str) -> dict[str, Any]:
    """SD3Transformer2DModel keyword arguments for `preset` (a fresh copy)."""
    _check_preset(preset)
    return dict(_TRANSFORMERS[preset])


def make_pipeline(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised StableDiffusion3Pipeline folder to `path` and return it.

    Same (preset, seed) gives identical weights; the caller's global torch RNG is left untouched.
    """
    _check_preset(preset)
    root = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = _build_tokenizers(Path(scratch))
        with torch.random.fork_rng(devices=[]):
            pipe = _build_pipeline(preset, seed, tokenizers)
        if preset == "sd35m":
            pipe.to(torch.bfloat16)
        pipe.save_pretrained(root, safe_serialization=True)
        _copy_tokenizer_sources(Path(scratch), root)
    log.info("wrote %s SD3 pipeline (seed %d) to %s", preset, seed, root)
    return root


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def _seeded(seed: int, component: str) -> None:
    """Seed torch per component, so resizing one component never changes another's weights."""
    digest = hashlib.sha256(f"{seed}/{component}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))


def _build_pipeline(preset: str, seed: int, tokenizers: dict[str, Any]) -> StableDiffusion3Pipeline:
    widths = _TEXT[preset]
    _seeded(seed, "transformer")
    transformer = SD3Transformer2DModel(**transformer_config(preset))
    _seeded(seed, "vae")
    vae = _build_vae()
    _seeded(seed, "text_encoder")
    clip_l = _build_clip(widths.clip_l, widths.layers, "quick_gelu", tokenizers["tokenizer"])
    _seeded(seed, "text_encoder_2")
    clip_g = _build_clip(widths.clip_g, widths.layers, "gelu", tokenizers["tokenizer_2"])
    _seeded(seed, "text_encoder_3")
    t5 = _build_t5(widths.t5, widths.layers, tokenizers["tokenizer_3"])
    _check_widths(transformer.config, clip_l.config, clip_g.config, t5.config)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        text_encoder_3=t5,
        **tokenizers,
    )


def _build_vae() -> AutoencoderKL:
    blocks = len(_VAE_CHANNELS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _build_clip(
    widths: tuple[int, int, int, int], layers: int, act: str, tokenizer: CLIPTokenizer
) -> CLIPTextModelWithProjection:
    hidden, projection, intermediate, heads = widths
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=projection,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=act,
        # The pooled output is read at the first eos token, so these ids must match the tokenizer.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def _build_t5(widths: tuple[int, int, int, int], layers: int, tokenizer: T5TokenizerFast) -> T5EncoderModel:
    d_model, d_kv, d_ff, heads = widths
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3's T5-XXL
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _check_widths(transformer: Any, clip_l: Any, clip_g: Any, t5: Any) -> None:
    clip_hidden = clip_l.hidden_size + clip_g.hidden_size
    if not (t5.d_model == transformer.joint_attention_dim >= clip_hidden):
        raise ValueError(f"T5 d_model {t5.d_model} must equal joint_attention_dim and cover CLIP's {clip_hidden}")
    if clip_l.projection_dim + clip_g.projection_dim != transformer.pooled_projection_dim:
        raise ValueError("CLIP-L + CLIP-G projection_dim must equal pooled_projection_dim")
    if transformer.caption_projection_dim != transformer.num_attention_heads * transformer.attention_head_dim:
        raise ValueError("caption_projection_dim must equal num_attention_heads * attention_head_dim")


def make_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Write a random CLIPModel + CLIPProcessor folder (~300 kB) for evaluation_type clip in tests.

    It loads with `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained`, as openai/clip-vit-large-patch14
    does; its scores mean nothing, but the code path is the real one. The caller's torch RNG is untouched."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _build_tokenizers(Path(scratch))["tokenizer"]
        text = {
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": CLIP_MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        }
        with torch.random.fork_rng(devices=[]):
            _seeded(seed, "clip")
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPProcessor(
            tokenizer=tokenizer,
            image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        )
        model.save_pretrained(root, safe_serialization=True)
        processor.save_pretrained(root)
    log.info("wrote a tiny CLIP (seed %d) to %s", seed, root)
    return root


# --- tokenizers -------------------------------------------------------------------------------


def _corpus() -> list[str]:
    """A few dozen sentences covering the demo captions' vocabulary (see demo_data)."""
    colours, shapes, sizes = sorted(COLOURS), list(SHAPES), sorted(SIZE_WORDS)
    sentences = [
        f"a {size} {colour} {shape} on a {background} background"
        for (colour, background), shape, size in zip(
            itertools.permutations(colours, 2), itertools.cycle(shapes), itertools.cycle(sizes)
        )
    ]
    sentences += [f'a picture with the word "{word}" on the left and on the right' for word in WORDS]
    sentences += [
        "a photo of a cat sitting in a tree",
        "terminus relay fine-tunes stable diffusion 3.5 medium",
        # Pangrams and digits, so no letter or number of a new prompt falls back to <unk>.
        "the quick brown fox jumps over the lazy dog",
        "pack my box with five dozen liquor jugs",
        "0 1 2 3 4 5 6 7 8 9, 10 and 100: one two three!",
    ]
    return sentences


def _build_tokenizers(scratch: Path) -> dict[str, Any]:
    corpus = _corpus()
    clip_dir, t5_dir = scratch / "clip", scratch / "t5"
    _write_clip_bpe(clip_dir, corpus, merges=300)
    _write_sentencepiece(t5_dir, corpus, vocab_size=200)
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(clip_dir, model_max_length=CLIP_MAX_LENGTH),
        # SD3's CLIP-G tokenizer pads with "!" rather than <|endoftext|>; mirror that quirk.
        "tokenizer_2": CLIPTokenizer.from_pretrained(clip_dir, model_max_length=CLIP_MAX_LENGTH, pad_token="!"),
        "tokenizer_3": T5TokenizerFast.from_pretrained(t5_dir, model_max_length=T5_MAX_LENGTH),
    }


def _copy_tokenizer_sources(scratch: Path, root: Path) -> None:
    """Add the source files the real SD3.5 repo ships next to tokenizer.json (vocab/merges, spiece)."""
    for name in ("tokenizer", "tokenizer_2"):
        for source in ("vocab.json", "merges.txt"):
            (root / name / source).write_bytes((scratch / "clip" / source).read_bytes())
    (root / "tokenizer_3" / "spiece.model").write_bytes((scratch / "t5" / "spiece.model").read_bytes())


def _write_clip_bpe(folder: Path, corpus: list[str], merges: int) -> None:
    """Write vocab.json and merges.txt of a byte-level BPE in CLIP's format."""
    byte_chars = bytes_to_unicode()
    learned = _learn_merges(corpus, merges, byte_chars)
    base = list(byte_chars.values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in learned]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, as in CLIP's vocabulary
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learned))


def _learn_merges(corpus: list[str], merges: int, byte_chars: dict[int, str]) -> list[tuple[str, str]]:
    """Greedy BPE over the corpus' words; a word's last symbol carries CLIP's '</w>' suffix."""
    counts = collections.Counter(word for line in corpus for word in _clip_words(line))
    words = {}
    for word in counts:
        symbols = [byte_chars[b] for b in word.encode()]
        words[word] = tuple(symbols[:-1]) + (symbols[-1] + "</w>",)
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # ties broken by the pair itself: deterministic
        learned.append(best)
        words = {word: _merge(symbols, best) for word, symbols in words.items()}
    return learned


def _clip_words(line: str) -> list[str]:
    # CLIP's pre-tokenisation, restricted to ASCII: lowercase letter runs, single digits, punctuation runs.
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", line.lower())


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            out.append(pair[0] + pair[1])
            index += 2
        else:
            out.append(symbols[index])
            index += 1
    return tuple(out)


def _write_sentencepiece(folder: Path, corpus: list[str], vocab_size: int) -> None:
    """Train a unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    folder.mkdir(parents=True)
    # On a corpus this small the suffix-array seeding finds only a few dozen substrings and no
    # whole words, so seed the unigram model with every word (SentencePiece's "▁" marks its start).
    seeds = collections.Counter(word for line in corpus for word in line.split())
    seed_file = folder / "seeds.tsv"
    seed_file.write_text("".join(f"\u2581{word}\t{count}\n" for word, count in sorted(seeds.items())))
    # One normalisation rule (no-break space -> space) rather than "identity": identity leaves the model's
    # precompiled_charsmap empty, which transformers 5.x up to at least 5.17 (with tokenizers 0.23) hands
    # to tokenizers' Precompiled normalizer, and that refuses it ("Cannot parse precompiled_charsmap").
    # nmt_nfkc's charsmap would be ~240 kB; this one is about 1 kB and changes no ASCII text.
    rules = folder / "rules.tsv"
    rules.write_text("A0\t20\n")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a tiny corpus cannot support vocab_size pieces
        seed_sentencepieces_file=str(seed_file),
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_tsv=str(rules),
        num_threads=1,
        minloglevel=2,
    )
    # The model records its training options, the (temporary) seed and rule file paths included; drop
    # them so the same corpus always yields the same bytes. sentencepiece 0.2.2's Python schema lacks the
    # seed file's field (its trainer writes it all the same), so that one goes as an unknown field.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    if "seed_sentencepieces_file" in proto.trainer_spec.DESCRIPTOR.fields_by_name:
        proto.trainer_spec.ClearField("seed_sentencepieces_file")
    proto.normalizer_spec.ClearField("normalization_rule_tsv")
    proto.DiscardUnknownFields()
    (folder / "spiece.model").write_bytes(proto.SerializeToString(deterministic=True))
