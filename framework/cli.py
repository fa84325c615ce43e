"""The ``fw`` command: LightningCLI (fit, validate, test, predict) plus fw's own subcommands.

    fw fit --config recipes/quickstart.yaml
    fw test --config recipes/quickstart.yaml --ckpt_path runs/quickstart/.../last.ckpt
    fw methods                       # installed method plugins
    fw inspect --config RECIPE       # the modified module tree and parameter counts
    fw export --config RECIPE --ckpt_path C --format peft --output DIR   # PEFT, merged or fw format
    fw test --config RECIPE --adapter DIR                   # evaluate an fw or PEFT adapter folder
    fw bench --config BENCH          # methods x seeds, measured side by side (recipes/bench/)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch import LightningDataModule, seed_everything
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from framework import data as _data  # noqa: F401  (short class names in recipes: ClassificationData, ...)
from framework import registry
from framework.checkpoint_io import SafeCheckpoints
from framework.config import deep_update
from framework.errors import (
    RECIPE_ERRORS,
    FieldError,
    RecipeError,
    check_recipe_files,
    check_trainer,
    debug,
    essential,
    parser_message,
)
from framework.finite import NonFiniteTrainingError
from framework.formats.fw import AdapterError, write_fw_adapter
from framework.formats.source import Adapter, method_class, plain, read_adapter
from framework.method import ExportNotSupportedError
from framework.module import PeftModule
from framework.predictions import PredictionWriter
from framework.quiet import progress_bars, quiet_libraries, verbose_requested
from framework.resume import ExactResume, last_checkpoint
from framework.settings import adopted
from framework.summary import RunSummary
from framework.validation import InvalidArgument, find_cause
from framework.wandb_credentials import wandb_has_credentials

_YAML_LOADER = get_loader("yaml")
#: what Lightning resolves itself as a --ckpt_path
LIGHTNING_CKPT_NAMES = {"last", "best", "hpc", "registry"}
#: the folder of a run's log directory that holds its adapter in fw's format
ADAPTER_DIR = "adapter"


def _yaml_with_method_names(text: str) -> Any:
    """jsonargparse's YAML loader, plus registered method names as class paths."""
    return registry.resolve_names(_YAML_LOADER(text))


class FwSaveConfig(SaveConfigCallback):
    """Saves config.yaml in the log dir (as Lightning does) and logs the full config to every logger."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": yaml.safe_load(config)})


class FwCLI(LightningCLI):
    """LightningCLI with fw's defaults: summary at the end, test after fit, W&B offline without a key."""

    _adapter: Adapter | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after `fit`, evaluate on the test split (when the data has one)",
        )
        parser.add_argument(
            "--ckpt_settings",
            type=Literal["recipe", "adopt"],
            default="recipe",
            help="with --ckpt_path: `recipe` refuses a checkpoint trained with another backbone, method, method "
            "arguments or head; `adopt` takes the checkpoint's (never its trust_remote_code)",
        )
        parser.add_argument(
            "--adapter",
            type=str | None,
            default=None,
            help="validate/test/predict: an fw or Hugging Face PEFT adapter folder, loaded on the recipe's backbone",
        )

    def _parse_ckpt_path(self) -> None:
        """Unlike LightningCLI, never take a checkpoint's settings silently (framework/settings.py):
        only with ``--ckpt_settings adopt``, or a ``config`` backbone's seed the recipe leaves open."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        path = config.get("ckpt_path") if config is not None else None
        if path == "last":
            path = config.ckpt_path = str(last_checkpoint(config.trainer))
        if not path or str(path) in LIGHTNING_CKPT_NAMES:
            return
        if not Path(path).is_file():
            raise FieldError(f"--ckpt_path: no such checkpoint '{path}'")
        hparams = read_adapter(path).hparams
        backbone = config.model.backbone
        if config.get("ckpt_settings") == "adopt":
            update = adopted(hparams, trust_remote_code=bool(backbone.trust_remote_code))
            print(f"fw: --ckpt_settings adopt: the model's {', '.join(update)} are the checkpoint's")
        elif backbone.config is not None and backbone.seed is None and (hparams.get("backbone") or {}).get("seed") is not None:
            update = {"backbone": {"seed": hparams["backbone"]["seed"]}}  # the random weights it was trained on
        else:
            return
        self.config = self.parser.parse_object({subcommand: {"model": update}}, self.config)

    def _use_adapter(self, config: Any) -> None:
        """``--adapter DIR``: build the adapter's method (checked against the recipe's) and
        remember the weights for :meth:`instantiate_classes`."""
        if self.subcommand == "fit":
            raise AdapterError(
                "--adapter: fit starts from the recipe's fresh method; to continue a run use --ckpt_path "
                "(--adapter is for validate, test and predict)"
            )
        if config.get("ckpt_path"):
            raise AdapterError("--adapter and --ckpt_path both give weights; pass one of them")
        adapter = read_adapter(config.adapter)
        update = adapter.model_update(config.model)
        self.config = self.parser.parse_object({self.subcommand: {"model": update}}, self.config)
        self._adapter = adapter

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand:
            check_trainer(config.trainer, self.subcommand)
            progress_bars(config.trainer.get("enable_progress_bar") is not False)
            if config.get("weights_only") is False:
                raise AdapterError(
                    "--weights_only false: fw never unpickles objects from a checkpoint (its own checkpoints are "
                    "plain data); leave weights_only unset"
                )
            config.weights_only = True  # torch.load refuses pickled objects, whatever TORCH_FORCE_* says
        if config.get("adapter"):
            self._use_adapter(config)
            config = self.config[self.subcommand]
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not hasattr(logger, "class_path") or not str(logger.class_path).endswith("WandbLogger"):
                continue
            args = logger.init_args
            if not args.get("offline") and "WANDB_MODE" not in os.environ and not wandb_has_credentials():
                args["offline"] = True
                print("fw: no W&B API key found; the W&B run is written offline (sync it later with `wandb sync`)")
            if args.get("save_dir") in (None, ".") and config.trainer.get("default_root_dir"):
                args["save_dir"] = config.trainer.default_root_dir  # the run's files go with its logs

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        try:
            return super().instantiate_trainer(**kwargs)
        except (*RECIPE_ERRORS, MisconfigurationException) as err:
            raise RecipeError(f"trainer: {essential(str(err))}") from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except RECIPE_ERRORS as err:
            method = self.config[self.subcommand].model.get("method") if self.subcommand else None
            raise RecipeError(construction_error(err, method)) from err
        if self._adapter is not None:
            self._adapter.load_into(self.model)

    def _summary(self) -> RunSummary | None:
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, RunSummary)), None)

    def _report(self) -> None:
        summary = self._summary()
        if summary is not None:
            summary.write(self.trainer, self.model)

    def _save_adapter(self) -> None:
        """Every finished fit leaves its adapter in fw's format beside ``summary.json``."""
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / ADAPTER_DIR
        write_fw_adapter(self.model, directory, write=self.trainer.is_global_zero)
        summary = self._summary()
        if summary is not None:
            summary.adapter_dir = str(directory)
        if self.trainer.is_global_zero:
            print(f"fw: adapter written to {directory} (fw export --adapter {directory} --format peft|merged ...)")

    def before_fit(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:
            rank_zero_info(
                f"fw: resuming from {ckpt_path}: the same batches, order and random states from there on; this part "
                f"logs to {self.trainer.log_dir} and its summary covers the whole run"
            )

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if self.trainer.interrupted:
            self._report()
            return
        self._save_adapter()
        has_test = hasattr(self.datamodule, "test_dataloader") and self.datamodule is not None
        if config.get("test_after_fit") and has_test:
            self.trainer.test(self.model, datamodule=self.datamodule)
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()


def cli_main(argv: list[str]) -> FwCLI:
    set_loader("yaml", _yaml_with_method_names)
    # fw passes the command line as `args` after rewriting registered method names
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # fw's training order resumes mid-epoch (framework/resume.py), which Lightning cannot see
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    return FwCLI(
        PeftModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=FwSaveConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [RunSummary(), PredictionWriter(), SafeCheckpoints(), ExactResume()]},
        auto_configure_optimizers=False,
        # errors come back as exceptions (main prints them as one line), not usage + exit
        parser_kwargs={"exit_on_error": False, **{sub: {"exit_on_error": False} for sub in FwCLI.subcommands()}},
        args=registry.resolve_cli_names(argv),
    )


# -- fw methods ---------------------------------------------------------------------------


def methods_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fw methods", description="List the installed method plugins.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    plugins = registry.discover()
    if args.json:
        rows = [
            {"name": p.name, "package": p.distribution, "class_path": p.class_path, "description": p.description}
            for p in plugins.values()
        ]
        print(json.dumps(rows, indent=2))
        return 0
    width_name = max([4, *(len(n) for n in plugins)])
    width_pkg = max([7, *(len(p.distribution) for p in plugins.values())])
    print(f"{'name':<{width_name}}  {'package':<{width_pkg}}  description")
    for p in plugins.values():
        print(f"{p.name:<{width_name}}  {p.distribution:<{width_pkg}}  {p.description}")
    return 0


# -- fw inspect ---------------------------------------------------------------------------


def build_module(model_config: dict[str, Any], overrides: list[str] | None = None) -> PeftModule:
    """A PeftModule from the ``model`` section of a recipe (as LightningCLI would build it)."""
    set_loader("yaml", _yaml_with_method_names)
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PeftModule, "model")
    model_config = registry.resolve_names(model_config)
    args = ["--model", json.dumps(model_config), *registry.resolve_cli_names(overrides or [])]
    config = parser.parse_args(args)
    try:
        return parser.instantiate_classes(config).model
    except RECIPE_ERRORS as err:
        raise RecipeError(construction_error(err, model_config.get("method"))) from err


def construction_error(err: BaseException, method_config: Any) -> str:
    """One line for an error building the recipe's components; a method's own argument is
    named by its place in the recipe, inside ``compose`` too."""
    cause = find_cause(err)
    if cause is None or cause.argument.startswith("model."):
        return essential(str(err))
    return str(cause.under(failing_part(plain(method_config), "model.method")))


def failing_part(config: Any, path: str) -> str:
    """The recipe path of the innermost nested part whose construction fails (``path`` when
    ``config`` has no parts or none fails alone)."""
    for where, part in method_parts(config):
        try:
            build_method(part)
        except InvalidArgument:
            return failing_part(part, f"{path}.init_args.{where}")
        except Exception:  # noqa: BLE001 - another kind of failure: not this part's argument
            continue
    return path


def holds_methods(value: Any) -> bool:
    """Whether an argument's value is a list or mapping of method configs (``class_path``)."""
    items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
    return bool(items) and all(isinstance(v, dict) and "class_path" in v for v in items)


def method_parts(config: Any) -> list[tuple[str, dict[str, Any]]]:
    """The method configs an argument of ``config`` holds (``compose``'s list ``methods``,
    ``multi``'s mapping ``adapters``), each with its place (``methods[1]``, ``adapters.sst``)."""
    args = (config.get("init_args") or {}) if isinstance(config, dict) else {}
    parts: list[tuple[str, dict[str, Any]]] = []
    for key, value in args.items():
        if holds_methods(value):
            named = enumerate(value) if isinstance(value, list) else value.items()
            parts += [(f"{key}[{k}]" if isinstance(value, list) else f"{key}.{k}", v) for k, v in named]
    return parts


def build_method(config: dict[str, Any]) -> Any:
    """A method from its recipe config alone (nested parts built first)."""
    args = dict(config.get("init_args") or {})
    for key, value in args.items():
        if holds_methods(value):
            args[key] = ([build_method(v) for v in value] if isinstance(value, list)
                         else {k: build_method(v) for k, v in value.items()})
    return method_class(config)(**args)


def instantiate_data(data_config: dict[str, Any]) -> LightningDataModule:
    """The DataModule of a recipe's ``data`` section (``class_path`` + ``init_args``)."""
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = parser.parse_args(["--data", json.dumps(data_config)])
    return parser.instantiate_classes(config).data


def read_model_section(parser: argparse.ArgumentParser, paths: list[str]) -> dict[str, Any]:
    """The ``model`` section of one or more recipes (later ones update earlier ones); seeds
    the run with the recipe's ``seed_everything``."""
    model_config: dict[str, Any] = {}
    seed = 0
    for path in paths:
        try:
            with open(path) as f:
                recipe = yaml.safe_load(f) or {}
        except OSError as err:
            parser.error(f"--config: cannot read {path} ({err.strerror})")
        deep_update(model_config, recipe.get("model") or {})
        seed = recipe.get("seed_everything", seed) or 0
    if not model_config:
        parser.error(f"{paths[-1]}: the recipe has no `model` section")
    seed_everything(seed, verbose=False)
    return model_config


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fw inspect",
        description="Build the recipe's backbone, attach its method, train nothing; print the modified "
        "module tree and the parameter counts. Extra --model.* arguments override the recipe.",
    )
    parser.add_argument("-c", "--config", action="append", required=True, help="recipe (YAML); may repeat")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args, overrides = parser.parse_known_args(argv)
    model_config = read_model_section(parser, args.config)
    module = build_module(model_config, overrides)
    if args.json:
        report = {
            "method": type(module.method).__name__ if module.method is not None else None,
            **module.param_counts().as_dict(),
            "modified_modules": module.modified_modules(),
        }
        print(json.dumps(report, indent=2))
    else:
        print(module.summary_text())
    return 0


def bench_main(argv: list[str]) -> int:
    from framework.bench import report, runner

    parser = argparse.ArgumentParser(
        prog="fw bench",
        description="Run a matrix of methods x seeds on one recipe (each run its own process) and write "
        "results.json, results.md and plots into the config's output_dir. Runs already done are kept.",
    )
    parser.add_argument("-c", "--config", required=True, help="bench config (recipes/bench/*.yaml)")
    parser.add_argument("--output_dir", help="override the config's output_dir")
    args = parser.parse_args(argv)
    config = runner.BenchConfig.load(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    records = runner.run_matrix(config)
    out = Path(config.output_dir)
    rows = report.write(records, out, f"fw bench: {Path(args.config).stem}", config.claims)
    if config.wandb is not None:
        report.to_wandb(rows, out, config.wandb)
    print((out / "results.md").read_text())
    print(f"written: {out / 'results.json'}, {out / 'results.md'}, {out / 'score_vs_params.png'}, {out / 'peak_memory.png'}")
    return 0


def export_main(argv: list[str]) -> int:
    from framework.export import export

    parser = argparse.ArgumentParser(
        prog="fw export",
        description="Write a trained adapter (a run's checkpoint, or an fw/PEFT adapter folder) as a Hugging Face "
        "PEFT adapter (peft), a merged transformers model (merged) or fw's own adapter folder (fw). Extra "
        "--model.* arguments override the recipe.",
    )
    parser.add_argument("-c", "--config", action="append", required=True, help="the run's recipe (YAML); may repeat")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="a checkpoint of the run (e.g. .../checkpoints/last.ckpt)")
    source.add_argument("--adapter", help="an fw adapter folder (every fit leaves one) or a PEFT adapter folder")
    parser.add_argument("--format", required=True, choices=["peft", "merged", "fw"], help="what to write")
    parser.add_argument("--output", required=True, help="the folder to write (created)")
    args, overrides = parser.parse_known_args(argv)
    model_config = read_model_section(parser, args.config)
    written = export(model_config, args.ckpt_path or args.adapter, args.format, args.output, overrides)
    print(f"fw export: wrote {args.format} format to {written}: {', '.join(sorted(p.name for p in written.iterdir()))}")
    return 0


COMMANDS = {"methods": methods_main, "inspect": inspect_main, "bench": bench_main, "export": export_main}


USER_ERRORS = (RecipeError, FieldError, registry.UnknownMethodError, AdapterError, ExportNotSupportedError)


def user_error(err: BaseException) -> tuple[str, int] | None:
    """``(the one line, exit code)`` for an error the user can fix; None for fw's own bugs."""
    if isinstance(err, USER_ERRORS):
        return str(err), 2
    if isinstance(err, argparse.ArgumentError):  # jsonargparse, with exit_on_error=False
        message = parser_message(str(err))
        if "subcommand" in message:
            message = f"{message.rstrip('.')}; fw's own commands: {', '.join(COMMANDS)}"
        return message, 2
    if isinstance(err, NonFiniteTrainingError):
        return str(err), 1
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a crafted checkpoint
        reason = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(err))
        return (
            "--ckpt_path: the checkpoint holds pickled objects beyond tensors and plain data"
            f"{f' ({reason.group(1)})' if reason else ''}; fw loads checkpoints with weights_only=True and never "
            "runs code from a file",
            2,
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """``fw``: one ``fw: error:`` line and exit code 2 (1 for a run that went non-finite) for
    what the user can fix; a traceback for fw's own bugs, or for anything with FW_DEBUG=1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose, argv = verbose_requested(argv)
    quiet_libraries(verbose)
    registry.discover()  # every fw.methods entry point is imported before parsing
    try:
        check_recipe_files(argv)
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        cli_main(argv)
    except Exception as err:
        reported = user_error(err)
        if reported is None or debug():
            raise
        print(f"fw: error: {reported[0]}", file=sys.stderr)
        return reported[1]
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave torch.distributed before the interpreter exits. Lightning destroys only NCCL
    groups at exit; a gloo group left open can abort the process while it shuts down
    ("terminate called without an active exception", seen once in a sharded `fw validate`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
