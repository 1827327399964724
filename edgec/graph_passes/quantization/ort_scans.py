"""onnxruntime.quantization's graph scans answered from name indexes.

``quantize_static`` rewires each tensor it quantizes by scanning every node of the graph
(``replace_input_of_all_nodes``), and finds each initializer by scanning every initializer
(``find_by_name``): linear per tensor, so quadratic per graph. On motion-dit tiny (qnn-htp,
w4a8, a floor search's eleven builds) the two scans were half of ``quantize_static``'s time.

Here both are answered from indexes of name → nodes (readers, writers) and name → first
initializer, built on first use per protobuf container and kept current:
- growth (ORT appends nodes and initializers) is indexed from the tail on the next lookup;
- a node's own input/output rewrite (``replace_node_input``/``_output``) moves it in the index;
- anything that removes or reorders (``remove_node``, ``remove_initializer``,
  ``topological_sort``, ``clean_initializers``) drops every index, rebuilt on next use;
- a container whose length fell, or whose last element is not the one indexed, is re-indexed.
The edits are ORT's own (every occurrence of a name in a node replaced; the first initializer of
a name found), verified per node before editing; the graph written is byte for byte the one the
original scans write (tests, on the targets' QDQ configs). ORT's QDQ quantizer changes nodes and
initializers only through these ``ONNXModel`` methods (onnxruntime 1.31, pinned in pyproject).
Only inside :func:`fast_ort_scans`, which the quantize pass holds around ``quantize_static``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["fast_ort_scans"]


class _Index:
    """name → {id: item} for one protobuf container (``key`` reads an item's names)."""

    def __init__(self, items, key):
        self.items, self.key = items, key
        self.by_name: dict[str, dict[int, Any]] = {}
        self.ids: set[int] = set()
        self.held: list[Any] = []  # the wrappers indexed (their ids stay theirs)
        self.count = 0

    def synced(self) -> _Index:
        items = self.items
        n = len(items)
        if n < self.count or (self.count and n and items[self.count - 1] is not self.held[-1]):
            self.__init__(self.items, self.key)  # something left or moved: index anew
        for i in range(self.count, n):
            self.add(items[i])
        self.count = n
        return self

    def add(self, item) -> None:
        self.held.append(item)
        self.ids.add(id(item))
        for name in self.key(item):
            self.by_name.setdefault(name, {})[id(item)] = item


_READS, _WRITES, _NAMED = (lambda n: n.input), (lambda n: n.output), (lambda t: (t.name,))
_indexes: dict[tuple[int, str], _Index] = {}  # (id(container), kind) → index; strong refs


def _index(items, kind: str, key) -> _Index:
    index = _indexes.get((id(items), kind))
    if index is None or index.items is not items:
        index = _indexes[(id(items), kind)] = _Index(items, key)
    return index.synced()


def _forget() -> None:
    _indexes.clear()


def _replace_in(names, old: str, new: str) -> bool:
    if old not in names:  # a C-level scan of the node's names
        return False
    for j, name in enumerate(names):
        if name == old:
            names[j] = new
    return True


def _rename_all(nodes, kind: str, key, old: str, new: str) -> None:
    index = _index(nodes, kind, key)
    found = index.by_name.pop(old, None)
    if not found:
        return
    moved = {i: node for i, node in found.items() if _replace_in(key(node), old, new)}
    index.by_name.setdefault(new, {}).update(moved)


def _replace_input_of_all_nodes(self, old_input_name: str, new_input_name: str) -> None:
    _rename_all(self.model.graph.node, "reads", _READS, old_input_name, new_input_name)


def _replace_output_of_all_nodes(self, old_output_name: str, new_output_name: str) -> None:
    _rename_all(self.model.graph.node, "writes", _WRITES, old_output_name, new_output_name)


def _renaming_one(original, kind: str):
    """ORT's ``replace_node_input``/``_output`` (one node), moving the node in the indexes."""
    def rename(node, old: str, new: str) -> None:
        original(node, old, new)
        for (_, k), index in _indexes.items():
            if k == kind and id(node) in index.ids:
                index.by_name.setdefault(new, {})[id(node)] = node
    return staticmethod(rename)


def _find_by_name(item_name, item_list):
    if type(item_list).__name__ != "RepeatedCompositeContainer":  # a Python list: scan it
        return next((item for item in item_list if item.name == item_name), None)
    found = _index(item_list, "named", _NAMED).by_name.get(item_name)
    if not found:
        return None
    first = next(iter(found.values()))
    if first.name != item_name:  # renamed in place: index anew
        _forget()
        return _find_by_name(item_name, item_list)
    return first


def _get_initializer(self, name):
    return _find_by_name(name, self.model.graph.initializer)


def _forgetting(original):
    def call(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            _forget()
    return call


def _targets():
    """(holder, attribute, replacement) for every place onnxruntime 1.31 keeps these."""
    from onnxruntime.quantization import base_quantizer, onnx_model, qdq_quantizer, quant_utils
    from onnxruntime.quantization.operators import matmul

    model = onnx_model.ONNXModel
    out = [(model, "replace_input_of_all_nodes", _replace_input_of_all_nodes),
           (model, "replace_output_of_all_nodes", _replace_output_of_all_nodes),
           (model, "replace_node_input", _renaming_one(model.replace_node_input, "reads")),
           (model, "replace_node_output", _renaming_one(model.replace_node_output, "writes")),
           (model, "get_initializer", _get_initializer)]
    out += [(model, name, _forgetting(getattr(model, name)))
            for name in ("remove_node", "remove_initializer", "topological_sort",
                         "clean_initializers", "replace_gemm_with_matmul")]
    for module in (quant_utils, onnx_model, base_quantizer, qdq_quantizer, matmul):
        if getattr(module, "find_by_name", None) is not None:
            out.append((module, "find_by_name", _find_by_name))
    return out


@contextlib.contextmanager
def fast_ort_scans() -> Iterator[None]:
    """onnxruntime.quantization's node and initializer scans answered from indexes while the
    block runs (a nested block restores what it found; the indexes go when the outer ends)."""
    targets = _targets()
    saved = [(holder, name, holder.__dict__[name] if isinstance(holder, type)
              else getattr(holder, name)) for holder, name, _ in targets]
    for holder, name, fn in targets:
        setattr(holder, name, fn)
    try:
        yield
    finally:
        for holder, name, fn in saved:
            setattr(holder, name, fn)
        _forget()
