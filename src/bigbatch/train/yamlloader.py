"""Reading a config's YAML within bounds: a config is a small mapping, never a bomb.

PyYAML's safe loader builds whatever a document describes: anchors of anchors (an alias bomb)
expand to billions of values, a list nested thousands deep exhausts Python's recursion, and a key
given twice silently keeps the last value. `load_yaml` composes with `BoundedLoader`, which counts
the values as aliases expand them, limits the nesting, and refuses a recursive alias and a
repeated key, each as a `YamlRefused` naming the line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DEPTH = 32
"""Nesting deeper than this is refused (a config is a mapping with a few small sections)."""
MAX_VALUES = 100_000
"""A document that holds more values than this, aliases expanded, is refused."""

_MERGE = "tag:yaml.org,2002:merge"


class YamlRefused(Exception):
    """A YAML document past bigbatch's bounds: the reason, and the 1-based line where."""

    def __init__(self, reason: str, mark: Any) -> None:  # a yaml Mark, or None
        super().__init__(reason)
        self.reason = reason
        self.line = mark.line + 1 if mark is not None else None


class BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that counts expanded values, bounds nesting and refuses repeated keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._values: dict[int, int] = {}  # id(node) -> values it holds, aliases expanded

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        if self._depth >= MAX_DEPTH:
            raise YamlRefused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(event, yaml.AliasEvent):
            if id(node) not in self._values:  # its node is still open: it contains itself
                raise YamlRefused(
                    f"alias *{event.anchor} refers to a value that contains it", event.start_mark
                )
            return node
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [child for pair in node.value for child in pair]
        count = 1 + sum(self._values[id(child)] for child in children)
        if count > MAX_VALUES:
            raise YamlRefused(
                f"holds more than {MAX_VALUES:,} values once its aliases are expanded",
                event.start_mark,
            )
        self._values[id(node)] = count
        return node

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node: MappingNode = super().compose_mapping_node(anchor)
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                continue  # a merge (<<) may override keys: that is what it is for
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                text = key_node.value if len(key_node.value) <= 60 else key_node.value[:57] + "..."
                lines = f" (lines {first_line[key]} and {line})" if first_line[key] != line else ""
                raise YamlRefused(
                    f"key {text!r} appears twice{lines}; keep one", key_node.start_mark
                )
            first_line[key] = line
        return node


def load_yaml(text: str) -> Any:
    """The document in ``text``, read as `yaml.safe_load` would, within bigbatch's bounds.

    Raises:
        YamlRefused: nesting, size or a repeated key past the bounds.
        yaml.YAMLError: malformed YAML.
        ValueError: an integer of more than 4300 digits.

    Example:
        >>> load_yaml("lr: 0.1\\nlr_scaling: {rule: sqrt}")
        {'lr': 0.1, 'lr_scaling': {'rule': 'sqrt'}}
    """
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
