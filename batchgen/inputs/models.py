"""Find and convert models and their adapters; load their config, tokenizer (with a sound pad
token) and generation defaults; the content digest of an adapter.

Everything here runs before the weights load, so that every cheap check does too: the weights
load later, once the data is known good (``batchgen.engine.devices.load_model``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batchgen import paths
from batchgen.config import ModelConfig
from batchgen.errors import ModelError

# Config attributes that hold a decoder's context length, in the order models use them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
# The files of a peft adapter's folder that peft loads: what its digest covers (not a README).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class ModelSource:
    """Where weights and tokenizer load from, once ``pkg:`` and GGUF files are resolved; and
    the local folder of ``model.adapter`` (a hub adapter fetched into the hub cache)."""

    location: str
    gguf_file: str | None = None
    adapter: str | None = None


def cache_root() -> Path:
    """Folder for converted models: ``$BATCHGEN_CACHE``, else ``~/.cache/batchgen``."""
    return Path(os.environ.get("BATCHGEN_CACHE", Path.home() / ".cache" / "batchgen"))


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Resolve ``model.name_or_path`` (and ``model.gguf_file``) without loading anything.

    Raises:
        ModelError: a local path or GGUF file does not exist, or a hub id while the hub is
            unreachable (``batchgen.inputs.hub.hub_unreachable``) and the model is not in
            the cache.
    """
    try:
        location = paths.resolve(cfg.name_or_path, "model.name_or_path")
    except Exception as e:
        raise ModelError(str(e)) from e
    looks_local = location.startswith((".", "/", "~")) or Path(location).exists()
    if looks_local and not Path(location).expanduser().is_dir():
        raise ModelError(f"model.name_or_path={cfg.name_or_path!r}: no such folder {location!r}.")
    if cfg.gguf_file:
        gguf = Path(location).expanduser() / cfg.gguf_file
        if looks_local and not gguf.is_file():
            raise ModelError(f"model.gguf_file={cfg.gguf_file!r}: not found in {location!r}.")
    if not looks_local:  # a hub id: fail at once, not after a minute of retries, when offline
        from huggingface_hub import constants

        from batchgen.inputs.hub import hub_unreachable

        why = hub_unreachable(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        cached = Path(constants.HF_HUB_CACHE, f"models--{location.replace('/', '--')}").is_dir()
        if why is not None and not cached:
            raise ModelError(
                f"model.name_or_path={cfg.name_or_path!r} is no local folder, so it names a hub "
                f"model, but the Hugging Face hub is unreachable ({why}). To run offline, set "
                "model.name_or_path to a local folder, or set HF_HUB_OFFLINE=1 to load a hub "
                "model from the local cache (~/.cache/huggingface, $HF_HOME)."
            )
    return ModelSource(
        str(Path(location).expanduser()) if looks_local else location,
        cfg.gguf_file,
        resolve_adapter(cfg.adapter),
    )


def resolve_adapter(adapter: str | None) -> str | None:
    """The local folder of ``model.adapter``: a folder as given, or a hub adapter's files
    fetched into the hub cache (the cache alone while the hub is unreachable).

    Raises:
        ModelError: no such folder, a folder without ``adapter_config.json``, or a hub id
            that cannot be fetched.
    """
    if adapter is None:
        return None
    try:
        location = paths.resolve(adapter, "model.adapter")
    except Exception as e:
        raise ModelError(str(e)) from e
    folder = Path(location).expanduser()
    if not folder.is_dir():
        if location.startswith((".", "/", "~")):
            raise ModelError(f"model.adapter={adapter!r}: no such folder {location!r}.")
        from huggingface_hub import snapshot_download

        from batchgen.inputs.hub import hub_unreachable

        why = hub_unreachable(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        try:
            folder = Path(
                snapshot_download(
                    location, allow_patterns=list(ADAPTER_FILES), local_files_only=bool(why)
                )
            )
        except Exception as e:  # offline and not cached, no such repository, no access
            raise ModelError(
                f"model.adapter={adapter!r} is no local folder, so it names a hub adapter, "
                f"which could not be fetched{f' (the hub is unreachable: {why})' if why else ''}:"
                f" {e}"
            ) from e
    if not (folder / ADAPTER_FILES[0]).is_file():
        raise ModelError(
            f"model.adapter={adapter!r}: {str(folder)!r} holds no {ADAPTER_FILES[0]} (a peft "
            "adapter's folder, as its save_pretrained writes it)."
        )
    return str(folder)


def adapter_digest(folder: str) -> str:
    """The digest of the adapter in ``folder``: the bytes of the files peft loads
    (``ADAPTER_FILES``), not their path, so a moved or re-fetched copy is the same adapter.
    Hashed once per process while the files are unchanged (size and modification time)."""
    files = tuple(
        (name, stat.st_size, stat.st_mtime_ns)
        for name in ADAPTER_FILES
        if (path := Path(folder) / name).is_file() and (stat := path.stat())
    )
    return _files_digest(folder, files)


@functools.lru_cache(maxsize=16)
def _files_digest(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in files:
        h.update(f"{name}\0{_file_digest(Path(folder) / name)}\0".encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def convert_gguf(source: ModelSource) -> ModelSource:
    """De-quantize a local GGUF file once into a cached ``save_pretrained`` folder.

    Loading a GGUF file costs about 20 s on two cores; the cached folder loads in under one.
    The cache key is the file's content hash, and the folder appears atomically (rename), so
    concurrent workers never read a half-written copy.
    """
    if not source.gguf_file or not Path(source.location).is_dir():
        return source
    gguf = Path(source.location) / source.gguf_file
    target = cache_root() / "converted" / f"{gguf.stem}-{_file_digest(gguf)}"
    converted = replace(source, location=str(target), gguf_file=None)
    if (target / "config.json").is_file():
        return converted
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"batchgen: converting {gguf.name} once into {target} (later runs load in ~1 s)")
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
    # The GGUF loader leaves a quantizer on the de-quantized fp32 model, and save_pretrained
    # refuses such a model; the weights themselves are plain tensors by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:  # another process published the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return converted


# transformers' own values where a generation config sets none (GenerationConfig's documented
# defaults), and batchgen's max_new_tokens where it sets neither max_new_tokens nor max_length
# beyond transformers' 20 (prompt included), which no dataset job wants.
GENERATE_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 256,
}


def generation_defaults(generation_config) -> dict[str, Any]:
    """The sampling ``model.generate()`` with no arguments uses under ``generation_config``:
    its values, transformers' defaults where it sets none (``GENERATE_DEFAULTS``)."""
    values = {k: getattr(generation_config, k, None) for k in GENERATE_DEFAULTS}
    return {k: GENERATE_DEFAULTS[k] if v is None else v for k, v in values.items()}


def load_generation_config(source: ModelSource, cfg: ModelConfig):
    """The model's ``generation_config.json`` (cheap, no weights); transformers' defaults when
    the model ships none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source.location, revision=cfg.revision)
    except OSError:  # no generation_config.json: many base models
        return GenerationConfig()


def load_config_and_tokenizer(source: ModelSource, cfg: ModelConfig):
    """Load the model config and tokenizer (cheap), with the tokenizer set up for batching.

    Returns:
        (config, tokenizer)

    Raises:
        ModelError: the model cannot be found (hub unreachable, bad id) or has no usable pad token.
    """
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path!r} could not be loaded: {e}. "
            "Use a local folder, or check the id and that the hub is reachable."
        ) from e
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    # Decoder-only prompts end where generation starts, so they are padded on the left;
    # an encoder reads the whole padded input and conventionally pads on the right.
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    _set_pad_token(tokenizer, cfg)
    return config, tokenizer


def _set_pad_token(tokenizer, cfg: ModelConfig) -> None:
    if cfg.pad_token is not None:
        if cfg.pad_token not in tokenizer.get_vocab():
            raise ModelError(
                f"model.pad_token={cfg.pad_token!r} is not in the tokenizer's vocabulary."
            )
        tokenizer.pad_token = cfg.pad_token
    elif tokenizer.pad_token is None:
        # Pads are masked out of attention and sliced off the output, so any existing token is
        # sound; EOS is the usual choice because generate also fills finished rows with it.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(
                f"model.name_or_path={cfg.name_or_path!r}: the tokenizer has no pad, EOS or "
                "UNK token to pad batches with; set model.pad_token to a token of its vocabulary."
            )
        tokenizer.pad_token = fallback


def context_length(config, tokenizer, cfg: ModelConfig) -> int | None:
    """Most tokens (prompt plus completion) the model can attend to; None when unbounded."""
    if cfg.max_context:
        return cfg.max_context
    if getattr(config, "is_encoder_decoder", False):
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in CONTEXT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None
