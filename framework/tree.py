"""The modified-module tree fw prints at fit start and in ``fw inspect`` (like OpenDelta's).

Only the branches that lead to a modified module are shown; numbered siblings whose
subtrees are identical fold into one line (``0-11 (BertLayer) x12``).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _insert(trie: dict[str, Any], name: str, note: str) -> None:
    node = trie
    for part in name.split("."):
        node = node.setdefault(part, {})
    node["\0note"] = note


def _fold_numbered(keys: list[str], rendered: dict[str, list[str]]) -> list[tuple[str, str, int]]:
    """[(label, representative key, count)]: runs of numbered keys with equal subtrees fold."""
    out: list[tuple[str, str, int]] = []
    i = 0
    while i < len(keys):
        key = keys[i]
        j = i + 1
        if key.isdigit():
            while (
                j < len(keys)
                and keys[j].isdigit()
                and int(keys[j]) == int(keys[j - 1]) + 1
                and rendered[keys[j]] == rendered[key]
            ):
                j += 1
        label = key if j == i + 1 else f"{key}-{keys[j - 1]}"
        out.append((label, key, j - i))
        i = j
    return out


def render_tree(model: nn.Module, modified: dict[str, str]) -> str:
    """A text tree of ``model`` restricted to the ``modified`` modules and their ancestors."""
    trie: dict[str, Any] = {}
    root_note = modified.get("")  # a note on the whole model (e.g. a mask chosen later)
    for name, note in modified.items():
        if name:
            _insert(trie, name, note)

    def subtree(path: str, node: dict[str, Any]) -> list[str]:
        keys = [k for k in node if k != "\0note"]
        rendered = {k: subtree(f"{path}.{k}" if path else k, node[k]) for k in keys}
        lines: list[str] = []
        groups = _fold_numbered(keys, rendered)
        for index, (label, key, count) in enumerate(groups):
            last = index == len(groups) - 1
            child_path = f"{path}.{key}" if path else key
            module = model.get_submodule(child_path)
            head = f"{label} ({type(module).__name__})" + (f" x{count}" if count > 1 else "")
            note = node[key].get("\0note")
            if note:
                head += f"  <- {note}"
            lines.append(("└── " if last else "├── ") + head)
            lines += [("    " if last else "│   ") + line for line in rendered[key]]
        return lines

    root = type(model).__name__ + (f"  <- {root_note}" if root_note else "")
    return "\n".join([root, *subtree("", trie)])
