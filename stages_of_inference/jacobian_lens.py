"""The Jacobian lens (Gurnee et al. 2026, "Verbalizable Representations Form a Global Workspace in
Language Models"): each readout is carried to the last block's output by the average Jacobian of
that output with respect to it, then read like the per-layer-norm logit lens.

For readout ``k`` (the residual stream before block ``k``; ``0`` is the embeddings) the estimator
is the one of the authors' reference implementation, which TransformerLens 4.3 ships as
``tools/analysis/jacobian_lens.py``:

    J_k = mean over prompts of  (1 / |V|) sum_{t in V} sum_{t' in V, t' >= t}  d h_final[t'] / d h_k[t]

where ``h_final`` is the output of the last block (before the final norm) and ``V`` the valid
positions of a prompt: all but the first ``skip_first_positions`` and the last. It is computed
exactly with one forward pass per prompt and ``d_model / dim_batch`` backward passes, each planting
a one-hot cotangent for ``dim_batch`` output dimensions at every valid position at once (causal
attention makes the gradient at ``t`` the sum over ``t' >= t``). There is no randomness.

The fit runs on the library's own hooks (``blocks.{k}.hook_resid_pre``, and the last block's
``hook_resid_post``), so it works on a ``HookedTransformer`` and on a ``TransformerBridge``; the
readouts are those of the loaded model (processed weights: for LayerNorm families, with centred
writing weights, a basis other than the raw checkpoint's).

A fitted lens is a :class:`~stages_of_inference.tuned_lens.TunedLens` of kind ``"jacobian"``
(translator ``h @ J_k^T``, written in the residual form ``weight = J_k^T - I``, no bias): pass it as
``convention=`` wherever a lens convention is accepted; tables say ``"jacobian"``. Saved lenses use
the tuned lens's safetensors format; :func:`load_jacobian_lens` also reads the artifact TransformerLens
4.3 and the reference implementation write (a ``torch.save`` zip), with a reader that interprets
only the allowed parts of its pickle (dicts, lists, numbers, strings and tensors): nothing in it is
ever executed or imported.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_count, check_model, check_tokens
from stages_of_inference._utils import progress as _progress
from stages_of_inference.batch import Tokens, describe_any
from stages_of_inference.interventions.hooks import resid_hook_name
from stages_of_inference.tuned_lens import TunedLens, cached_lens, lens_key, load_tuned_lens, model_record

__all__ = ["DEFAULT_SKIP_FIRST_POSITIONS", "fit_jacobian_lens", "from_jacobians", "load_jacobian_lens",
           "read_torch_artifact"]

DEFAULT_SKIP_FIRST_POSITIONS = 16
"""Leading positions left out of the average (attention sinks), as the reference implementation."""


def fit_jacobian_lens(
    model: Model,
    tokens: Tokens,
    *,
    dim_batch: int = 8,
    skip_first_positions: int = DEFAULT_SKIP_FIRST_POSITIONS,
    cache: bool | str | os.PathLike[str] = False,
    progress: bool = True,
) -> TunedLens:
    """Fit a Jacobian lens on ``tokens``, each row one prompt (module docstring: the estimator).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[prompts, pos]`` token ids, BOS first, longer than ``skip_first_positions + 1``.
        dim_batch: output dimensions per backward pass (memory: the prompt is replicated this
            many times; the number of products is the same).
        skip_first_positions: leading positions left out of the average.
        cache: ``False`` (default): fit; ``True``: reuse or store the lens in the library's cache
            folder, keyed by the model's weights, the tokens and the settings (as the tuned lens);
            a folder: there.
        progress: show a progress bar over prompts.

    Returns:
        A :class:`~stages_of_inference.tuned_lens.TunedLens` of kind ``"jacobian"`` with a translator
        for every readout ``0 .. n_layers - 1``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=16, d_head=4, d_vocab=11, act_fn="relu", normalization_type="LN"))
        >>> lens = fit_jacobian_lens(m, torch.randint(0, 11, (2, 6)), skip_first_positions=1, progress=False)
        >>> lens.kind, lens.weight.shape
        ('jacobian', torch.Size([2, 8, 8]))
    """
    model = check_model(model)
    skip = _whole(skip_first_positions, "skip_first_positions")
    tokens_t = check_tokens(model, tokens, min_len=skip + 2)
    dim_batch = check_count(dim_batch, "dim_batch", "a positive number of output dimensions per backward pass")
    n = model.cfg.n_layers
    settings = {"estimator": "jacobian_lens", "skip_first_positions": skip, "dim_batch": dim_batch}
    key = lens_key(model, tokens, settings)

    def fit() -> TunedLens:
        total = torch.zeros(n, model.cfg.d_model, model.cfg.d_model, dtype=torch.float64)
        for row in _progress(range(tokens_t.shape[0]), progress, desc="Jacobian lens"):
            total += _prompt_jacobians(model, tokens_t[row : row + 1], dim_batch, skip).double()
        record = {"key": key, "model": model_record(model), "tokens": describe_any(tokens),
                  "n_prompts": int(tokens_t.shape[0]), "settings": settings, "readouts": list(range(n))}
        return from_jacobians((total / tokens_t.shape[0]).float(), record)
    return cached_lens(model, key, cache, fit)


def from_jacobians(jacobians: Tensor, provenance: dict[str, Any]) -> TunedLens:
    """The lens of Jacobians ``[n_layers, d_model, d_model]`` (``jacobians[k]`` carries readout ``k``
    to the last block's output: ``final ~= J @ h``), as a ``TunedLens`` of kind ``"jacobian"``.
    """
    eye = torch.eye(jacobians.shape[-1], dtype=jacobians.dtype)
    return TunedLens(jacobians.transpose(1, 2) - eye, torch.zeros(jacobians.shape[:2]), provenance, kind="jacobian")


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number of positions (0 or more), got {value!r}")
    return value


def _prompt_jacobians(model: Model, tokens: Tensor, dim_batch: int, skip: int) -> Tensor:
    """``[n_layers, d_model, d_model]``: one prompt's Jacobian rows, averaged over valid sources."""
    n, d = model.cfg.n_layers, model.cfg.d_model
    seq = tokens.shape[1]
    valid = torch.arange(skip, seq - 1, device=tokens.device)
    captured: dict[str, Tensor] = {}
    names = [resid_hook_name(model, k) for k in range(n + 1)]

    def capture(name: str) -> Any:
        def hook_fn(activation: Tensor, hook: Any) -> Tensor:  # keyed by our name: a Bridge reports its own
            if name == names[0] and not activation.requires_grad:
                activation = activation.detach().requires_grad_(True)  # the graph's root: readout 0
            captured[name] = activation
            return activation
        return hook_fn

    with torch.enable_grad():
        model.run_with_hooks(tokens.expand(dim_batch, -1), return_type=None,
                             fwd_hooks=[(name, capture(name)) for name in dict.fromkeys(names)])
        target = captured[names[n]]
        sources = [captured[names[k]] for k in range(n)]
        rows = torch.zeros(n, d, d, dtype=torch.float32)
        cotangent = torch.zeros_like(target)
        lanes = torch.arange(dim_batch, device=target.device)
        passes = -(-d // dim_batch)
        for p in range(passes):
            start, width = p * dim_batch, min(dim_batch, d - p * dim_batch)
            cotangent.zero_()
            cotangent[lanes[:width, None], valid[None, :], start + lanes[:width, None]] = 1.0
            grads = torch.autograd.grad(target, sources, grad_outputs=cotangent, retain_graph=p < passes - 1,
                                        allow_unused=True)
            for k, grad in enumerate(grads):
                if grad is not None:
                    rows[k, start : start + width] = grad[:width, valid].float().mean(dim=1).cpu()
    return rows


# ----------------------------------------------------------------------------- artifacts
def load_jacobian_lens(path: str | os.PathLike[str], model: Model) -> TunedLens:
    """Read a Jacobian lens for ``model``: one this library saved (safetensors,
    :func:`~stages_of_inference.tuned_lens.save_tuned_lens`), or the artifact TransformerLens 4.3's
    ``JacobianLens.save`` and the reference implementation write (``J``: block -> matrix, fitted on
    the output of block ``l``, i.e. readout ``l + 1``; readouts it does not cover read as the logit
    lens).

    The artifact was fitted on the raw checkpoint's residual stream. A model whose loaded residual
    stream is in another basis (a LayerNorm family with centred writing weights) is refused.

    Raises:
        ValueError: not a lens file, a file for another width, or a model in another basis.
    """
    model = check_model(model)
    path = Path(path)
    if path.suffix == ".safetensors":
        lens = load_tuned_lens(path, model)
        if lens.kind != "jacobian":
            raise ValueError(f"{path} holds a {lens.kind} lens, not a Jacobian lens")
        return lens
    payload = read_torch_artifact(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("J"), dict) or not payload["J"]:
        raise ValueError(f"{path} is not a Jacobian-lens artifact (no 'J' mapping of layers to matrices)")
    n, d = model.cfg.n_layers, model.cfg.d_model
    if str(model.cfg.normalization_type) in ("LN", "LNPre") and bool(getattr(model.cfg, "center_writing_weights", True)):
        raise ValueError("this artifact was fitted on the raw residual stream; this model's LayerNorm family was "
                         "loaded with centred writing weights (another basis): fit the lens on it with fit_jacobian_lens")
    jacobians = torch.eye(d).repeat(n, 1, 1)
    for layer, matrix in payload["J"].items():
        if not isinstance(layer, int) or not 0 <= layer < n - 1:
            raise ValueError(f"{path}: block {layer!r} is not a source block of this model (0 .. {n - 2})")
        if tuple(matrix.shape) != (d, d):
            raise ValueError(f"{path}: the matrix of block {layer} is {tuple(matrix.shape)}; this model's width is {d}")
        jacobians[layer + 1] = matrix.float()
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    record = {"model": model_record(model), "artifact": path.name, "n_prompts": payload.get("n_prompts"), "artifact_metadata": metadata,
              "settings": {"estimator": "jacobian_lens", "source": "TransformerLens / reference artifact"},
              "readouts": sorted(layer + 1 for layer in payload["J"])}
    return from_jacobians(jacobians, record)


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype
    key: str
    numel: int


_MARK = object()
_CONSTANTS = {"EMPTY_TUPLE": (), "MARK": _MARK, "NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_STORAGES = {f"torch {name}": dtype for name, dtype in (
    ("HalfStorage", torch.float16), ("FloatStorage", torch.float32), ("BFloat16Storage", torch.bfloat16),
    ("DoubleStorage", torch.float64), ("LongStorage", torch.int64), ("IntStorage", torch.int32))}
_ALLOWED = {"torch._utils _rebuild_tensor_v2", "collections OrderedDict", *_STORAGES}
_PUSH = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
         "BINFLOAT", "SHORT_BINBYTES", "BINBYTES"}


def read_torch_artifact(path: str | os.PathLike[str]) -> Any:
    """The object a ``torch.save`` zip holds, read without unpickling: the pickle's opcodes are
    interpreted for dicts, lists, tuples, numbers, strings, ``OrderedDict`` and tensors only; any
    other global (a function, a class) is refused in one line, and nothing is executed.

    Raises:
        ValueError: not a ``torch.save`` zip, or a pickle that names anything else.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a torch.save archive (a zip): {error}") from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path} is not a torch.save archive (no single data.pkl)")
        root = pickles[0][: -len("data.pkl")]
        return _interpret(archive.read(pickles[0]), lambda key: archive.read(f"{root}data/{key}"), path)


def _interpret(data: bytes, storage: Any, path: Path) -> Any:
    """Run :class:`_Machine` over the pickle ``data`` (see :func:`read_torch_artifact`)."""
    machine = _Machine(storage, path)
    for op, arg, _ in _ops(data, path):
        if op.name == "STOP":
            return machine.stack.pop()
        handler = _HANDLERS.get(op.name)
        if handler is None:
            raise ValueError(f"{path}: pickle opcode {op.name} is not one a lens artifact needs; refused")
        handler(machine, arg)
    raise ValueError(f"{path}: its pickle has no STOP")


class _Machine:
    """The stack and memo of the pickle interpreter; one small method per allowed opcode."""

    def __init__(self, storage: Any, path: Path) -> None:
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        self.storage, self.path = storage, path

    def to_mark(self) -> list[Any]:
        items = []
        while (item := self.stack.pop()) is not _MARK:
            items.append(item)
        return items[::-1]

    def push(self, arg: Any) -> None:
        self.stack.append(arg)

    def tuple_n(self, size: int) -> None:
        items = self.stack[len(self.stack) - size :]
        del self.stack[len(self.stack) - size :]
        self.stack.append(tuple(items))

    def setitem(self, arg: Any) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self.stack[-1][key] = value

    def setitems(self, arg: Any) -> None:
        items = self.to_mark()
        self.stack[-1].update(zip(items[::2], items[1::2]))

    def global_(self, arg: Any) -> None:
        if arg is None:  # STACK_GLOBAL: module and name on the stack
            attribute = self.stack.pop()
            arg = f"{self.stack.pop()} {attribute}"
        if arg not in _ALLOWED:
            raise ValueError(f"{self.path}: its pickle names {arg!r}; a lens artifact holds only tensors, numbers, "
                             "strings, lists and dicts, so it is refused (nothing was executed)")
        self.stack.append(_Global(arg))

    def persistent(self, arg: Any) -> None:
        pid = self.stack.pop()
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)
                and pid[1].name in _STORAGES):
            raise ValueError(f"{self.path}: an unexpected persistent id in its pickle")
        self.stack.append(_StorageRef(_STORAGES[pid[1].name], str(pid[2]), int(pid[4])))

    def reduce(self, arg: Any) -> None:
        args, fn = self.stack.pop(), self.stack.pop()
        self.stack.append(_call(fn, args, self.storage, self.path))

    def build(self, arg: Any) -> None:
        if self.stack.pop() not in ({}, None, ()):
            raise ValueError(f"{self.path}: an object with state in its pickle; refused")


_HANDLERS: dict[str, Any] = {
    **{name: _Machine.push for name in _PUSH},
    **{name: (lambda m, arg, v=value: m.stack.append(v)) for name, value in _CONSTANTS.items()},
    "PROTO": lambda m, arg: None, "FRAME": lambda m, arg: None,
    "EMPTY_DICT": lambda m, arg: m.stack.append({}), "EMPTY_LIST": lambda m, arg: m.stack.append([]),
    "TUPLE": lambda m, arg: m.stack.append(tuple(m.to_mark())),
    "TUPLE1": lambda m, arg: m.tuple_n(1), "TUPLE2": lambda m, arg: m.tuple_n(2), "TUPLE3": lambda m, arg: m.tuple_n(3),
    "SETITEM": _Machine.setitem, "SETITEMS": _Machine.setitems,
    "APPEND": lambda m, arg: m.stack[-2].append(m.stack.pop()),
    "APPENDS": lambda m, arg: (lambda items: m.stack[-1].extend(items))(m.to_mark()),
    "BINPUT": lambda m, arg: m.memo.__setitem__(arg, m.stack[-1]),
    "LONG_BINPUT": lambda m, arg: m.memo.__setitem__(arg, m.stack[-1]),
    "MEMOIZE": lambda m, arg: m.memo.__setitem__(len(m.memo), m.stack[-1]),
    "BINGET": lambda m, arg: m.stack.append(m.memo[arg]), "LONG_BINGET": lambda m, arg: m.stack.append(m.memo[arg]),
    "GLOBAL": _Machine.global_, "STACK_GLOBAL": _Machine.global_,
    "BINPERSID": _Machine.persistent, "REDUCE": _Machine.reduce, "BUILD": _Machine.build,
}


def _ops(data: bytes, path: Path) -> Iterator[tuple[Any, Any, Any]]:
    try:
        yield from pickletools.genops(data)
    except ValueError as error:
        raise ValueError(f"{path}: a damaged pickle ({error})") from None


def _call(fn: Any, args: Any, storage: Any, path: Path) -> Any:
    if not isinstance(fn, _Global) or not isinstance(args, tuple):
        raise ValueError(f"{path}: its pickle calls something other than an allowed constructor")
    if fn.name == "collections OrderedDict":
        return OrderedDict(*args)
    if fn.name != "torch._utils _rebuild_tensor_v2" or len(args) < 4 or not isinstance(args[0], _StorageRef):
        raise ValueError(f"{path}: its pickle calls {fn.name} in a way a tensor is never saved")
    ref, offset, size, stride = args[:4]
    raw = np.frombuffer(storage(ref.key), dtype=np.uint8).copy()
    flat = torch.from_numpy(raw).view(ref.dtype)
    if flat.numel() != ref.numel:
        raise ValueError(f"{path}: storage {ref.key} holds {flat.numel()} numbers, its record says {ref.numel}")
    return flat.as_strided(tuple(size), tuple(stride), int(offset)).clone()
