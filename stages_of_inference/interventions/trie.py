"""Scheduling many block orders as one trie: pure Python, no torch.

Plans that share their first ``m`` steps share the residual stream after them (a step is a block
index, or a ``(block, part)`` pair that runs one sublayer: :mod:`~stages_of_inference.interventions.plan`;
the trie only compares steps). :func:`build_trie`
puts the distinct orders in a trie (one node per prefix); :func:`layout` walks it depth first and
finds the trunk (the unmodified order ``0, 1, ..., n_layers - 1``, which the executor runs first);
:func:`schedule` cuts the plan ends into windows and says, for each window, which nodes to
compute, depth by depth, which of them run the same block and may be stacked into one call, when
a residual can be freed, and which residuals to carry to the next window. Every node is computed
exactly once; the executor (:mod:`stages_of_inference.interventions.executor`) only follows the
schedule.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["Layout", "Node", "Run", "Window", "block_count", "build_trie", "layout", "schedule"]


class Node:
    """One prefix of the plans' block orders.

    Attributes:
        index: the node's number (the root is 0), unique within its trie.
        children: next step -> the node of the longer prefix.
        ends: the plan ids whose order is exactly this prefix.
    """

    __slots__ = ("children", "ends", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.children: dict[Hashable, Node] = {}
        self.ends: list[int] = []


def build_trie(orders: Sequence[tuple[Hashable, ...]]) -> Node:
    """The trie of ``orders``: plan ``k`` ends at the node of ``orders[k]``.

    Example:
        >>> root = build_trie([(0, 1), (0, 2), (1,)])
        >>> sorted(root.children), sorted(root.children[0].children)
        ([0, 1], [1, 2])
    """
    count = 1
    root = Node(0)
    for pid, order in enumerate(orders):
        node = root
        for block in order:
            child = node.children.get(block)
            if child is None:
                child = node.children[block] = Node(count)
                count += 1
            node = child
        node.ends.append(pid)
    return root


@dataclass(frozen=True)
class Layout:
    """A trie walked depth first.

    Attributes:
        parent: node index -> its parent node (``None`` for the root).
        depth: node index -> its depth (the root is 0: the embeddings).
        block: node index -> the step that leads to it (``None`` for the root).
        ends: the nodes where plans end, in depth-first (pre-)order.
        trunk: node index -> depth, for the nodes of the unmodified order (the root included).
    """

    parent: dict[int, Node | None]
    depth: dict[int, int]
    block: dict[int, Hashable]
    ends: list[Node]
    trunk: dict[int, int]


def layout(root: Node, n_layers: int) -> Layout:
    """Walk the trie depth first; find the trunk (the unmodified order of ``n_layers`` blocks).

    Example:
        >>> lay = layout(build_trie([(0, 1, 2), (0, 2), (1, 0, 2)]), 3)
        >>> [n.index for n in lay.ends], sorted(lay.trunk.values())
        ([3, 4, 7], [0, 1, 2, 3])
    """
    parent: dict[int, Node | None] = {}
    depth: dict[int, int] = {}
    block: dict[int, Hashable] = {}
    ends: list[Node] = []
    stack: list[tuple[Node, Node | None, int, Hashable]] = [(root, None, 0, None)]
    while stack:
        node, up, d, b = stack.pop()
        parent[node.index], depth[node.index], block[node.index] = up, d, b
        if node.ends:
            ends.append(node)
        stack.extend((child, node, d + 1, c) for c, child in reversed(list(node.children.items())))
    trunk = {root.index: 0}
    node = root
    for d in range(n_layers):
        child = node.children.get(d)
        if child is None:
            break
        trunk[child.index] = d + 1
        node = child
    return Layout(parent, depth, block, ends, trunk)


@dataclass(frozen=True)
class Run:
    """Nodes of one depth that run the same block: one (stacked) block call.

    Attributes:
        depth: the depth of the nodes (the block runs at execution step ``depth - 1``).
        block: the step they run (a block index, or a ``(block, part)`` pair).
        nodes: the nodes computed by this call; each one's input is its parent's residual.
    """

    depth: int
    block: Hashable
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class Window:
    """A run of consecutive plan ends and what computing them takes.

    Attributes:
        leaves: the nodes where the window's plans end, in depth-first order.
        runs: the block calls, depth by depth (a depth's runs all come before the next depth's).
        free_after: depth -> the node indices whose residuals are no longer needed once every run
            of that depth is done.
        carry: the node indices whose residuals the next windows need (the path to the last leaf).
    """

    leaves: tuple[Node, ...]
    runs: tuple[Run, ...]
    free_after: dict[int, tuple[int, ...]] = field(default_factory=dict)
    carry: frozenset[int] = frozenset()


def _path(lay: Layout, node: Node) -> set[int]:
    """The indices of ``node`` and its ancestors off the trunk."""
    path: set[int] = set()
    current: Node | None = node
    while current is not None and current.index not in lay.trunk:
        path.add(current.index)
        current = lay.parent[current.index]
    return path


def schedule(lay: Layout, window_size: int, lanes: int) -> Iterator[Window]:
    """The windows of ``window_size`` plan ends, and for each the block calls of at most ``lanes``
    stacked nodes that compute every node no earlier window computed.

    Depth-first order puts every node a later window shares on the path to the current window's
    last leaf, so carrying that path computes each node once.

    Example:
        >>> lay = layout(build_trie([(0, 1, 2), (0, 2), (1, 2), (0, 1)]), 3)
        >>> [[(r.depth, r.block, len(r.nodes)) for r in w.runs] for w in schedule(lay, 2, 2)]
        [[], [(1, 1, 1), (2, 2, 2)]]
    """
    if window_size < 1 or lanes < 1:
        raise ValueError(f"window_size and lanes must be at least 1, got {window_size} and {lanes}")
    carried: frozenset[int] = frozenset()
    for w0 in range(0, len(lay.ends), window_size):
        leaves = tuple(lay.ends[w0 : w0 + window_size])
        todo: dict[int, list[Node]] = {}
        seen: set[int] = set()
        for leaf in leaves:
            node: Node | None = leaf
            while node is not None and node.index not in lay.trunk and node.index not in carried | seen:
                seen.add(node.index)
                todo.setdefault(lay.depth[node.index], []).append(node)
                node = lay.parent[node.index]
        carry = frozenset(_path(lay, leaves[-1]))
        keep = carry | {leaf.index for leaf in leaves}
        runs: list[Run] = []
        free_after: dict[int, tuple[int, ...]] = {}
        for depth in sorted(todo):
            by_block: dict[Hashable, list[Node]] = {}
            for node in todo[depth]:
                by_block.setdefault(lay.block[node.index], []).append(node)
            for block, same in by_block.items():
                runs.extend(Run(depth, block, tuple(same[g : g + lanes])) for g in range(0, len(same), lanes))
            free_after[depth] = tuple(n.index for n in todo.get(depth - 1, ()) if n.index not in keep)
        yield Window(leaves, tuple(runs), free_after, carry)
        carried = carry


def block_count(orders: Sequence[tuple[Hashable, ...]], n_layers: int, shared: bool = True) -> int:
    """Block executions for ``orders`` and the unmodified order of ``n_layers`` blocks: with prefix
    sharing (the number of distinct non-empty prefixes) or without (the sum of lengths).

    Example:
        >>> block_count([(0, 2), (1, 2)], 3), block_count([(0, 2), (1, 2)], 3, shared=False)
        (6, 7)
    """
    every = [tuple(range(n_layers)), *orders]
    if not shared:
        return sum(len(o) for o in every)
    return len({order[:k] for order in every for k in range(1, len(order) + 1)})
