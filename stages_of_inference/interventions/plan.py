"""Layer plans: which transformer blocks (or which of their sublayers) run, in which order.

A :class:`LayerPlan` is plain, immutable data: a tuple of steps for a model with ``n_layers``
blocks. A step is a block index (the whole block) or a pair ``(i, "attn")`` / ``(i, "mlp")``: block
``i`` with only its attention, or only its MLP, writing to the residual stream (the other
sublayer's output is zero, as if ``blocks.i.hook_mlp_out`` or ``blocks.i.hook_attn_out`` were
zeroed). Every intervention on the order of blocks is one: deleting block 5 of a 12-block model is
``(0, 1, 2, 3, 4, 6, ..., 11)``, swapping blocks 5 and 6 is ``(..., 4, 6, 5, 7, ...)``, running
blocks 5-6 twice is ``(..., 4, 5, 5, 6, 6, 7, ...)``, deleting block 5's attention is
``(..., 4, (5, "mlp"), 6, ...)``. Plans validate themselves, print as the constructor call that
makes them, and round-trip through JSON (a sublayer step is the list ``[5, "mlp"]`` there).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "PARTS", "LayerPlan", "Step", "step_layer", "step_part", "step_text"]

KINDS = ("identity", "drop", "swap", "repeat", "permute", "drop_attention", "drop_mlp", "custom")
"""The kinds of plan :attr:`LayerPlan.kind` recognises."""

PARTS = ("attn", "mlp")
"""The sublayers a step can run alone: ``(i, "attn")`` runs only block ``i``'s attention,
``(i, "mlp")`` only its MLP."""

Step = int | tuple[int, str]
"""One step of a plan: a whole block, or one sublayer of it (:data:`PARTS`)."""


def step_layer(step: Step) -> int:
    """The block a step runs (all of it or one sublayer).

    Example:
        >>> step_layer(3), step_layer((3, "mlp"))
        (3, 3)
    """
    return step if isinstance(step, int) else step[0]


def step_part(step: Step) -> str:
    """``"block"`` for a whole block, else the sublayer (:data:`PARTS`) the step runs.

    Example:
        >>> step_part(3), step_part((3, "attn"))
        ('block', 'attn')
    """
    return "block" if isinstance(step, int) else step[1]


def _as_step(value: Any) -> Step:
    """A block index, or a ``(block, part)`` pair (a list from JSON too), validated."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[1] not in PARTS:
            raise ValueError(f"a sublayer step is a pair (block, part) with part in {PARTS}, got {value!r}")
        return (_as_int(value[0], "a sublayer step's block index"), str(value[1]))
    return _as_int(value, "every block index")


def step_text(step: Step) -> str:
    """A step as plan labels write it.

    Example:
        >>> step_text(4), step_text((4, "mlp"))
        ('4', '4.mlp')
    """
    return str(step) if isinstance(step, int) else f"{step[0]}.{step[1]}"


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} ({value!r})")
    return int(value)


def _flatten_layers(layers: Iterable[Any]) -> list[int]:
    out: list[int] = []
    for item in layers:
        if isinstance(item, (list, tuple, range, set, frozenset)):
            out.extend(_flatten_layers(item))
        else:
            out.append(_as_int(item, "a layer index"))
    return out


@dataclass(frozen=True)
class LayerPlan:
    """An order of transformer blocks (or of their sublayers) for a model with ``n_layers`` blocks.

    Attributes:
        order: the steps, in execution order: block indices in ``0 .. n_layers - 1``, or
            ``(index, part)`` pairs that run one sublayer (:data:`PARTS`) of the block. A block may
            be left out (deletion) or appear several times (repetition).
        n_layers: the number of blocks of the model the plan is for.

    Raises:
        ValueError: an empty plan, an index out of range, an unknown sublayer, or ``n_layers`` < 1.
        TypeError: indices that are not integers.

    Example:
        >>> LayerPlan.drop(6, 2)
        LayerPlan.drop(6, 2)
        >>> LayerPlan.swap(6, 2).order
        (0, 1, 3, 2, 4, 5)
        >>> LayerPlan(order=(0, 2, 1), n_layers=3).kind, LayerPlan.swap(6, 2).label
        ('swap', 'swap 2<->3')
        >>> LayerPlan.from_json(LayerPlan.repeat(4, [1, 2]).to_json()).order
        (0, 1, 1, 2, 2, 3)
        >>> LayerPlan.drop_mlp(3, 1).order, LayerPlan.drop_attention(3, 1).label
        ((0, (1, 'attn'), 2), 'drop attn 1')
    """

    order: tuple[Step, ...]
    n_layers: int

    def __post_init__(self) -> None:
        n = _as_int(self.n_layers, "n_layers")
        if n < 1:
            raise ValueError(f"n_layers must be at least 1, got {n}")
        if isinstance(self.order, (str, bytes)) or not isinstance(self.order, Iterable):
            raise TypeError(f"order must be a sequence of block indices, got {type(self.order).__name__}")
        order = tuple(_as_step(i) for i in self.order)
        if not order:
            raise ValueError(f"a plan must run at least one block; got an empty order (blocks are 0 .. {n - 1})")
        bad = sorted({step_layer(i) for i in order if not 0 <= step_layer(i) < n})
        if bad:
            raise ValueError(
                f"block index(es) {bad} out of range for a model with {n} blocks: allowed 0 .. {n - 1}"
            )
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "n_layers", n)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def identity(cls, n_layers: int) -> LayerPlan:
        """The unmodified model: every block once, in order.

        Example:
            >>> LayerPlan.identity(3).order
            (0, 1, 2)
        """
        n = _as_int(n_layers, "n_layers")
        return cls(order=tuple(range(n)), n_layers=n)

    @classmethod
    def drop(cls, n_layers: int, *layers: int | Iterable[int]) -> LayerPlan:
        """Delete one or more blocks (each given once; ints or iterables of ints).

        Example:
            >>> LayerPlan.drop(5, 0, 3).order, LayerPlan.drop(5, [1, 2]).order
            ((1, 2, 4), (0, 3, 4))
        """
        n = _as_int(n_layers, "n_layers")
        dropped = _flatten_layers(layers)
        if not dropped:
            raise ValueError("LayerPlan.drop needs at least one block index to delete")
        bad = sorted({i for i in dropped if not 0 <= i < n})
        if bad:
            raise ValueError(f"cannot drop block(s) {bad}: a model with {n} blocks has blocks 0 .. {n - 1}")
        if len(set(dropped)) != len(dropped):
            raise ValueError(f"block(s) listed twice in drop: {sorted(dropped)}")
        if len(dropped) == n:
            raise ValueError(f"cannot drop all {n} blocks: a plan must run at least one block")
        gone = set(dropped)
        return cls(order=tuple(i for i in range(n) if i not in gone), n_layers=n)

    @classmethod
    def swap(cls, n_layers: int, i: int) -> LayerPlan:
        """Exchange adjacent blocks ``i`` and ``i + 1``.

        Example:
            >>> LayerPlan.swap(4, 0).order
            (1, 0, 2, 3)
        """
        n = _as_int(n_layers, "n_layers")
        i = _as_int(i, "the first swapped block")
        if not 0 <= i < n - 1:
            raise ValueError(
                f"cannot swap blocks {i} and {i + 1}: a model with {n} blocks allows i in 0 .. {n - 2}"
            )
        order = list(range(n))
        order[i], order[i + 1] = order[i + 1], order[i]
        return cls(order=tuple(order), n_layers=n)

    @classmethod
    def drop_attention(cls, n_layers: int, *layers: int | Iterable[int]) -> LayerPlan:
        """Delete the attention of one or more blocks: each runs only its MLP.

        Example:
            >>> LayerPlan.drop_attention(3, 0, 2).order
            ((0, 'mlp'), 1, (2, 'mlp'))
        """
        return cls._drop_part(n_layers, layers, keep="mlp", what="drop_attention")

    @classmethod
    def drop_mlp(cls, n_layers: int, *layers: int | Iterable[int]) -> LayerPlan:
        """Delete the MLP of one or more blocks: each runs only its attention.

        Example:
            >>> LayerPlan.drop_mlp(3, 1)
            LayerPlan.drop_mlp(3, 1)
        """
        return cls._drop_part(n_layers, layers, keep="attn", what="drop_mlp")

    @classmethod
    def _drop_part(cls, n_layers: int, layers: tuple[Any, ...], keep: str, what: str) -> LayerPlan:
        n = _as_int(n_layers, "n_layers")
        chosen = _flatten_layers(layers)
        if not chosen:
            raise ValueError(f"LayerPlan.{what} needs at least one block index")
        bad = sorted({i for i in chosen if not 0 <= i < n})
        if bad:
            raise ValueError(f"cannot {what.replace('_', ' ')} of block(s) {bad}: a model with {n} blocks has "
                             f"blocks 0 .. {n - 1}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"block(s) listed twice in {what}: {sorted(chosen)}")
        return cls(order=tuple((i, keep) if i in set(chosen) else i for i in range(n)), n_layers=n)

    @classmethod
    def repeat(cls, n_layers: int, layers: int | Iterable[int], times: int = 2) -> LayerPlan:
        """Run each block in ``layers`` ``times`` times in place (``0, 1, 1, 2, ...``).

        Example:
            >>> LayerPlan.repeat(4, range(1, 3), times=3).order
            (0, 1, 1, 1, 2, 2, 2, 3)
        """
        n = _as_int(n_layers, "n_layers")
        chosen = _flatten_layers([layers])
        times = _as_int(times, "times")
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        if not chosen:
            raise ValueError("LayerPlan.repeat needs at least one block index to repeat")
        bad = sorted({i for i in chosen if not 0 <= i < n})
        if bad:
            raise ValueError(f"cannot repeat block(s) {bad}: a model with {n} blocks has blocks 0 .. {n - 1}")
        chosen_set = set(chosen)
        order = [i for i in range(n) for _ in range(times if i in chosen_set else 1)]
        return cls(order=tuple(order), n_layers=n)

    @classmethod
    def permute(cls, n_layers: int, order: Iterable[int]) -> LayerPlan:
        """Any permutation of the blocks: every block exactly once, in the given order.

        For orders that leave blocks out or repeat them, use ``LayerPlan(order=..., n_layers=...)``.

        Example:
            >>> LayerPlan.permute(3, [2, 0, 1]).kind
            'permute'
        """
        n = _as_int(n_layers, "n_layers")
        order = tuple(_flatten_layers([order]))
        if sorted(order) != list(range(n)):
            raise ValueError(
                f"LayerPlan.permute needs every block 0 .. {n - 1} exactly once, got {list(order)}; "
                "use LayerPlan(order=..., n_layers=...) for orders that drop or repeat blocks"
            )
        return cls(order=order, n_layers=n)

    # ----------------------------------------------------------------- description
    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    @property
    def is_identity(self) -> bool:
        """True when the plan is the unmodified model."""
        return self.order == tuple(range(self.n_layers))

    @property
    def dropped(self) -> tuple[int, ...]:
        """Blocks that never run (not even one sublayer), in increasing order."""
        present = {step_layer(s) for s in self.order}
        return tuple(i for i in range(self.n_layers) if i not in present)

    @property
    def has_sublayers(self) -> bool:
        """True when some step runs only one sublayer of a block."""
        return any(not isinstance(s, int) for s in self.order)

    def _describe_parts(self) -> tuple[str, tuple[Any, ...]] | None:
        """``("drop_attention" | "drop_mlp", blocks)`` for the plans those constructors make."""
        n, order = self.n_layers, self.order
        if len(order) != n or any(step_layer(s) != k for k, s in enumerate(order)):
            return None
        parts = {step_part(s) for s in order} - {"block"}
        if len(parts) != 1:
            return None
        kind = "drop_attention" if parts == {"mlp"} else "drop_mlp"
        return kind, tuple(k for k, s in enumerate(order) if not isinstance(s, int))

    def _describe(self) -> tuple[str, tuple[Any, ...]]:
        """(kind, constructor arguments after n_layers)."""
        n, order = self.n_layers, self.order
        ident = tuple(range(n))
        if order == ident:
            return "identity", ()
        if self.has_sublayers:
            return self._describe_parts() or ("custom", (order,))
        if len(order) < n and all(a < b for a, b in zip(order, order[1:])):
            return "drop", self.dropped
        if len(order) == n and sorted(order) == list(ident):
            diff = [k for k in range(n) if order[k] != k]
            if len(diff) == 2 and diff[1] == diff[0] + 1:
                return "swap", (diff[0],)
            return "permute", (order,)
        if len(order) > n and all(a <= b for a, b in zip(order, order[1:])) and set(order) == set(ident):
            counts = {i: order.count(i) for i in ident}
            repeated = tuple(i for i in ident if counts[i] > 1)
            times = {counts[i] for i in repeated}
            if len(times) == 1:
                return "repeat", (repeated, times.pop())
        return "custom", (order,)

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`: what the plan does to the unmodified order.

        Example:
            >>> LayerPlan(order=(0, 0, 2), n_layers=3).kind
            'custom'
        """
        return self._describe()[0]

    @property
    def label(self) -> str:
        """A short human-readable name: ``"identity"``, ``"drop 5"``, ``"swap 5<->6"``,
        ``"repeat 3,4 x2"``, ``"permute 2,0,1"``, ``"drop attn 5"``, ``"drop mlp 5"``,
        ``"custom 0,0,2"`` (a sublayer step reads ``5.attn`` there).

        Example:
            >>> LayerPlan.drop(8, 3, 4).label
            'drop 3,4'
        """
        kind, args = self._describe()
        if kind == "identity":
            return "identity"
        if kind == "drop":
            return "drop " + ",".join(map(str, args))
        if kind == "swap":
            return f"swap {args[0]}<->{args[0] + 1}"
        if kind == "repeat":
            return "repeat " + ",".join(map(str, args[0])) + f" x{args[1]}"
        if kind in ("drop_attention", "drop_mlp"):
            return f"drop {'attn' if kind == 'drop_attention' else 'mlp'} " + ",".join(map(str, args))
        return f"{kind} " + ",".join(map(step_text, self.order))

    def __repr__(self) -> str:
        kind, args = self._describe()
        n = self.n_layers
        if kind == "identity":
            return f"LayerPlan.identity({n})"
        if kind == "drop":
            return f"LayerPlan.drop({n}, {', '.join(map(str, args))})"
        if kind == "swap":
            return f"LayerPlan.swap({n}, {args[0]})"
        if kind == "repeat":
            layers, times = args
            return f"LayerPlan.repeat({n}, {list(layers)}, times={times})"
        if kind == "permute":
            return f"LayerPlan.permute({n}, {list(self.order)})"
        if kind in ("drop_attention", "drop_mlp"):
            return f"LayerPlan.{kind}({n}, {', '.join(map(str, args))})"
        return f"LayerPlan(order={self.order}, n_layers={n})"

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """``{"n_layers": n, "order": [...]}`` (a sublayer step as ``[block, part]``)."""
        return {"n_layers": self.n_layers, "order": [s if isinstance(s, int) else list(s) for s in self.order]}

    def to_json(self) -> str:
        """Compact JSON: ``{"n_layers": 3, "order": [0, 2]}``.

        Example:
            >>> LayerPlan.drop(3, 1).to_json()
            '{"n_layers": 3, "order": [0, 2]}'
        """
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> LayerPlan:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or set(data) != {"n_layers", "order"}:
            raise ValueError(f"a LayerPlan is a mapping with exactly the keys 'n_layers' and 'order', got {data!r}")
        order = data["order"]
        if not isinstance(order, list):
            raise ValueError(f"'order' must be a list of block indices, got {order!r}")
        return cls(order=tuple(tuple(s) if isinstance(s, list) else s for s in order), n_layers=data["n_layers"])

    @classmethod
    def from_json(cls, text: str) -> LayerPlan:
        """Inverse of :meth:`to_json`.

        Example:
            >>> LayerPlan.from_json('{"n_layers": 3, "order": [0, 2]}')
            LayerPlan.drop(3, 1)
        """
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"not a LayerPlan JSON string: {str(text)[:80]!r} ({err})") from None
        except RecursionError:
            raise ValueError(f"not a LayerPlan JSON string: {str(text)[:80]!r} (nested too deeply)") from None
        return cls.from_dict(data)

    def check(self, n_layers: int) -> LayerPlan:
        """Return ``self`` if it is a plan for a model with ``n_layers`` blocks, else raise ``ValueError``.

        Example:
            >>> LayerPlan.identity(2).check(2).order
            (0, 1)
        """
        if self.n_layers != n_layers:
            raise ValueError(
                f"{self!r} is a plan for a model with {self.n_layers} blocks, but this model has "
                f"{n_layers}; build it with n_layers=model.cfg.n_layers"
            )
        return self
