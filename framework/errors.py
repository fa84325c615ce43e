"""A user's mistake is one line: ``fw: error: <field or file>: <what is wrong>; <how to fix>``.

- :func:`parser_message` turns jsonargparse's nested report (unions of subtypes, class paths,
  init args) into the field's dotted path and the innermost reason;
- :func:`check_recipe_files` reads every ``--config`` file strictly before LightningCLI does:
  YAML syntax errors name the file, line and column, and a key given twice in one mapping is
  an error (PyYAML lets the last one win silently).

``FW_DEBUG=1`` shows the traceback behind any such line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be built: reported as one line naming the field, before training."""


class FieldError(ValueError):
    """A recipe field or data file that is wrong, found while the run sets up (data, tokenizer,
    output folders): one line, like a :class:`RecipeError`."""


#: what a component's constructor raises for a bad argument (turned into a RecipeError)
RECIPE_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError)


def essential(message: str) -> str:
    """jsonargparse reports a failed Optional[...] as a union of errors; keep the real one."""
    if "Union subtypes" not in message:
        return message
    errors = [
        line.strip()[2:]
        for line in message.splitlines()
        if line.strip().startswith("- ") and "NoneType" not in line
    ]
    return "; ".join(errors) or message


def debug() -> bool:
    return os.environ.get("FW_DEBUG", "") not in ("", "0")


_KEY = re.compile(r'^(\s*)(?:- )?(?:Problem with given class_path .*?:\s*)?Parser key "([^"]+)":\s*(.*)$')
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "Problem with given class_path", "Expected a <class 'NoneType'>")


def parser_message(message: str) -> str:
    """jsonargparse's multi-line error as ``dotted.path: reason``."""
    path: list[tuple[int, str]] = []
    reason = ""
    for line in message.splitlines():
        match = _KEY.match(line)
        if match:
            indent = len(match.group(1))
            path = [(i, k) for i, k in path if i < indent] + [(indent, match.group(2))]
            if match.group(3).strip():
                reason = match.group(3).strip()
            continue
        text = line.strip().removeprefix("- ").strip()
        if text and not text.startswith(_NOISE) and not reason:
            reason = text
    if not path:
        return " ".join(message.split())
    keys = [k for _, k in path]
    dotted = keys[0] + "".join(f".init_args.{k}" if not k.startswith("init_args") else f".{k}" for k in keys[1:])
    reason = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", reason or "invalid value")
    return f"{dotted}: {reason}"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[arg-type]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first on line {seen[key] + 1}); remove one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def config_paths(argv: list[str]) -> list[str]:
    """The files given as ``--config``/``-c`` on a command line."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
    return out


def check_recipe_files(argv: list[str]) -> None:
    """Every ``--config`` file exists and is valid YAML without repeated keys."""
    for name in config_paths(argv):
        path = Path(name)
        if not path.is_file():
            raise RecipeError(f"--config: no such recipe file '{name}'")
        try:
            text = path.read_text()
        except UnicodeDecodeError as err:
            raise RecipeError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start}); save the recipe as UTF-8") from err
        try:
            loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise RecipeError(f"{name}: {where}{err.problem or err.context}") from err
        except yaml.YAMLError as err:
            raise RecipeError(f"{name}: not valid YAML ({err})") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"{name}: a recipe is a mapping (trainer:, model:, data:), got a {type(loaded).__name__}")


def _writable(folder: str | Path, field: str) -> None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fw-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise FieldError(f"{field}: cannot write to '{folder}' ({err.strerror}); choose a folder you can write") from err


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    return namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)


def check_trainer(trainer: Any, subcommand: str) -> None:
    """The trainer fields Lightning only trips over mid-run, and (``fit``) the folders the run
    writes: checked before anything is built."""
    accumulate = _get(trainer, "accumulate_grad_batches", 1)
    if isinstance(accumulate, int) and accumulate < 1:
        raise FieldError(f"trainer.accumulate_grad_batches: expected an integer >= 1, got {accumulate}")
    for key, low in (("max_steps", -1), ("max_epochs", -1), ("min_steps", 0), ("log_every_n_steps", 1)):
        value = _get(trainer, key)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            raise FieldError(f"trainer.{key}: expected an integer >= {low}, got {value}")
    interval = _get(trainer, "val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise FieldError(f"trainer.val_check_interval: expected > 0 (a fraction of an epoch or a number of steps), got {interval}")
    if subcommand != "fit":
        return
    if _get(trainer, "default_root_dir"):
        _writable(_get(trainer, "default_root_dir"), "trainer.default_root_dir")
    loggers = _get(trainer, "logger")
    for i, logger in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        save_dir = _get(_get(logger, "init_args") or {}, "save_dir")
        if save_dir:
            field = "trainer.logger" + (f"[{i}]" if isinstance(loggers, list) else "") + ".init_args.save_dir"
            _writable(save_dir, field)
    for i, callback in enumerate(_get(trainer, "callbacks") or []):
        dirpath = _get(_get(callback, "init_args") or {}, "dirpath")
        if dirpath and str(_get(callback, "class_path", "")).endswith("ModelCheckpoint"):
            _writable(dirpath, f"trainer.callbacks[{i}].init_args.dirpath")
