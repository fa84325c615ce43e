"""PeftModule: backbone + method + task + optimizer, as one LightningModule.

Building it freezes the backbone, lets the method attach, and unfreezes the task head
(configurable). Checkpoints hold only what trains (the method's weights and the head),
the method's hyper-parameters and the backbone's identity; never the frozen base.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from framework.backbone import Backbone
from framework.config import to_config
from framework.data.text import TextDataModule
from framework.errors import FieldError
from framework.finite import NonFiniteTrainingError, explain, grad_norm, is_finite
from framework.formats.fw import AdapterError, architecture
from framework.lean_attention import lean_grouped_attention
from framework.lean_mlp import lean_gated_mlps
from framework.lean_norm import lean_rms_norms
from framework.measure import ParamCounts, count_params, numel
from framework.method import PeftMethod
from framework.optim import OptimizerName, build_optimizer, param_groups
from framework.prepare import PrepareContext, unsharded_batches
from framework.settings import differences, method_defaults
from framework.sharding import full_tensor, is_sharded, shard_like, shard_model
from framework.targeting import head_module_names
from framework.tasks import Classification, Task
from framework.tree import render_tree
from framework.validation import InvalidArgument, method_errors

CHECKPOINT_KEY = "fw"
#: the checkpoint's entry for :meth:`PeftMethod.method_state` (tensors; absent when a method keeps none)
METHOD_STATE_KEY = "fw_method_state"


class PeftModule(LightningModule):
    """Fine-tunes ``backbone`` on ``task`` with ``method``.

    Args:
        backbone: the transformers model (pretrained ``name_or_path`` or random-init ``config``).
        method: the PEFT method plugin; None trains every weight (full fine-tuning).
        task: what is predicted: ``Classification``, ``CausalLM`` or ``Seq2SeqLM``.
        train_head: train the task head (None: the task's default, yes for classification).
        learning_rate: the optimizer's peak learning rate.
        weight_decay: AdamW's decoupled weight decay (matrices only, not biases and norms).
        optimizer: ``adamw`` (torch) or bitsandbytes' ``adamw_8bit``, ``paged_adamw``,
            ``paged_adamw_8bit`` (paging needs CUDA; elsewhere fw warns once and does not page).
        warmup_ratio: fraction of the training steps with a linear warm-up.
        scheduler: learning-rate decay after warm-up.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        lean_mlp: SwiGLU MLPs (Llama, Mistral, Qwen, ...) keep only their two projections'
            outputs for backward and recompute the SiLU there (:mod:`framework.lean_mlp`):
            bitwise the same training, a third less MLP activation memory; false: transformers'
            own forward.
        lean_norm: Llama-style RMS norms mark their output as recomputable from what they keep,
            so LoRA layers reading it keep no copy (:mod:`framework.lean_norm`): bitwise the
            same training, two hidden-width activations per layer less; false: transformers'
            own forward.
        lean_attention: models with grouped key/value heads (GQA: Llama 3, SmolLM2, Qwen, ...)
            train on CPU without repeating the keys and values for each query head
            (:mod:`framework.lean_attention`): the same forward, two thirds less of their
            saved keys/values; false: transformers' ``sdpa`` as it is.
        max_nonfinite_steps: how many steps with a NaN/inf loss or gradient are skipped (nothing
            applied) before the run stops; 0 (default): the first one stops it.
    """

    def __init__(
        self,
        backbone: Backbone,
        method: PeftMethod | None = None,
        task: Task | None = None,
        train_head: bool | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        gradient_checkpointing: bool = False,
        lean_mlp: bool = True,
        lean_norm: bool = True,
        lean_attention: bool = True,
        optimizer: OptimizerName = "adamw",
        max_nonfinite_steps: int = 0,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"model.learning_rate: expected > 0, got {learning_rate}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio: expected a fraction in [0, 1), got {warmup_ratio}")
        if weight_decay < 0:
            raise ValueError(f"model.weight_decay: expected >= 0, got {weight_decay}")
        if not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 0:
            raise ValueError(f"model.max_nonfinite_steps: expected an integer >= 0, got {max_nonfinite_steps!r}")
        task = task if task is not None else Classification()
        self.backbone = backbone
        self.method = method
        self.task = task
        self.train_head = task.train_head_default if train_head is None else train_head
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # skipped so far
        self._backwards = 0  # backward passes since the last optimizer step
        self._step_skipped = False  # the non-finite guard cleared this step's gradients
        self.model = backbone.build(task.auto_model_class(), **task.model_kwargs())
        self.save_hyperparameters(  # after building: a random-init backbone has recorded its seed
            to_config(
                {
                    "backbone": backbone,
                    "method": method,
                    "task": task,
                    "train_head": train_head,
                    "learning_rate": learning_rate,
                    "weight_decay": weight_decay,
                    "warmup_ratio": warmup_ratio,
                    "scheduler": scheduler,
                    "gradient_checkpointing": gradient_checkpointing,
                    "lean_mlp": lean_mlp,
                    "lean_norm": lean_norm,
                    "lean_attention": lean_attention,
                    "optimizer": optimizer,
                    "max_nonfinite_steps": max_nonfinite_steps,
                }
            )
        )

        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        task.configure_model(self.model)
        if lean_mlp:
            lean_gated_mlps(self.model)
        if lean_norm:
            lean_rms_norms(self.model)
        if lean_attention:
            lean_grouped_attention(self.model)
        self.backbone_params = numel(self.model.parameters())
        self.head_names = head_module_names(self.model)
        self.base_state_keys = set(self.model.state_dict())  # the architecture's own (a merged model has these)
        if method is not None:
            self.model.requires_grad_(False)
            with method_errors():
                method.attach(self.model)
        for name in self.head_names:
            if method is not None or not self.train_head:
                self.model.get_submodule(name).requires_grad_(self.train_head)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        self.val_metrics = task.metrics()
        self.test_metrics = task.metrics()
        self._tokenizer: Any = None

    # -- facts about the run --------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.backbone.load_tokenizer()
        return self._tokenizer

    def param_counts(self) -> ParamCounts:
        return count_params(self.model, self.method, self.backbone_params)

    def modified_modules(self) -> dict[str, str]:
        modified = dict(self.method.modified_modules) if self.method is not None else {}
        for name in self.head_names:
            head = self.model.get_submodule(name)
            if any(p.requires_grad for p in head.parameters()):
                modified[name] = f"task head, trainable (+{numel(head.parameters()):,})"
        return modified

    def summary_text(self) -> str:
        counts = self.param_counts()
        method = type(self.method).__name__ if self.method is not None else "full fine-tuning"
        lines = [
            render_tree(self.model, self.modified_modules()),
            "",
            f"method: {method}",
            f"backbone parameters:  {counts.backbone_params:>14,}",
            f"trainable parameters: {counts.trainable_params:>14,}  ({counts.percent('trainable_params'):.4f} %)",
            f"method parameters:    {counts.method_params:>14,}  ({counts.percent('method_params'):.4f} %)",
            f"stored parameters:    {counts.stored_params:>14,}  ({counts.percent('stored_params'):.4f} %)",
        ]
        return "\n".join(lines)

    # -- Lightning hooks ------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        expected = self.task.data_class
        if expected and isinstance(datamodule, TextDataModule) and expected not in {c.__name__ for c in type(datamodule).__mro__}:
            raise FieldError(
                f"data: {type(self.task).__name__} trains on {expected}, but the recipe's data is "
                f"{type(datamodule).__name__}; set data.class_path: {expected} (or model.task to match the data)"
            )
        if datamodule is not None and getattr(datamodule, "tokenizer", "absent") is None:
            datamodule.tokenizer = self.tokenizer
        self.task.bind_tokenizer(self.tokenizer)
        if callable(check_packing := getattr(datamodule, "check_packing", None)):
            check_packing(self.model, self.method)  # data.pack: refused where examples would mix
        names = getattr(datamodule, "label_names", None) if isinstance(self.task, Classification) else None
        if names is not None and len(names) > self.task.num_labels:
            raise FieldError(
                f"model.task.num_labels: the data has {len(names)} classes ({', '.join(names[:10])}) "
                f"but num_labels is {self.task.num_labels}; set model.task.num_labels: {len(names)}"
            )
        if self.method is not None and self._sharding():
            self._refuse_unshardable()
        if stage == "fit" and self.method is not None:
            try:
                self.method.prepare(self.prepare_context(datamodule))
            except InvalidArgument as err:
                raise FieldError(str(err.under("model.method"))) from err
            except ValueError as err:  # a plugin's other refusals of the recipe (its data, ...)
                raise FieldError(str(err)) from err

    def _sharding(self) -> bool:
        """Whether the trainer's strategy shards the model's weights (FSDP)."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def _refuse_unshardable(self) -> None:
        if self.method is not None and not self.method.supports_sharding:
            raise FieldError(
                f"trainer.strategy: {type(self.method).__name__} cannot be sharded by FSDP "
                f"({self.method.sharding_refusal or 'the method says so'}); train it with strategy: ddp"
            )

    def prepare_context(self, datamodule: Any) -> PrepareContext:
        """The run as :meth:`PeftMethod.prepare` sees it (framework/prepare.py)."""
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        return PrepareContext(
            model=self.model,
            tokenizer=lambda: self.tokenizer,
            loss=lambda batch: self.task.step(self.model, batch)[0],
            train_batches=(lambda: unsharded_batches(datamodule)) if datamodule is not None else None,
            device=strategy.root_device if strategy is not None else self.device,
            resuming=bool(trainer is not None and trainer.ckpt_path),
            world_size=trainer.world_size if trainer is not None else 1,
            broadcast=strategy.broadcast if strategy is not None else (lambda obj: obj),
            sharded=self._sharding(),
            progress=trainer is None or trainer.is_global_zero,
            total_steps=(lambda: int(trainer.estimated_stepping_batches)) if trainer is not None else None,
        )

    def configure_model(self) -> None:
        """Under :class:`framework.strategies.FSDP` (a device mesh is set): shard every
        transformer block, then the rest, with FSDP2's per-parameter sharding."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or is_sharded(self.model):
            return
        self._refuse_unshardable()
        shard_model(self.model, mesh["data_parallel"], getattr(self.trainer.strategy, "reshard_after_forward", True))

    def on_fit_start(self) -> None:
        if not any(p.requires_grad for p in self.model.parameters()):
            raise FieldError(
                f"model.train_head: nothing to train: {type(self.method).__name__} left no parameter trainable and "
                "the head is frozen; set model.train_head: true or choose a method that trains"
            )
        rank_zero_info(self.summary_text())
        if self.logger is not None:
            counts = {f"params/{k}": v for k, v in self.param_counts().as_dict().items()}
            for logger in self.loggers:
                logger.log_hyperparams(counts)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        batch, routing = self._routed(batch)
        with method_errors(FieldError), routing:
            loss, _ = self.task.step(self.model, batch)
            extra = self.method.loss_term(self.model) if self.method is not None else None
        total = loss if extra is None else loss + extra
        if self._nonfinite("loss", total.detach()):
            return None  # Lightning skips backward; the optimizer finds no gradient to apply
        size = self._batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)  # the task's loss, comparable across methods
        if extra is not None:
            self.log("train/method_loss", extra, batch_size=size)
            self.log("train/total_loss", total, batch_size=size)  # what is minimized
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if str(self.trainer.precision) == "16-mixed":
            return  # the loss scaler skips steps with inf gradients and lowers its scale
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._nonfinite("gradient norm", grad_norm(params)):
            self._step_skipped = True
            for p in params:
                p.grad = None  # the optimizer leaves parameters without a gradient alone

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, then :meth:`PeftMethod.on_after_optimizer_step` with the step count,
        unless nothing was applied (no backward ran since the last step, the non-finite guard
        cleared the gradients, or the 16-bit loss scaler skipped the step)."""
        self._step_skipped = False
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        backwards, self._backwards = self._backwards, 0
        skipped = self._step_skipped or not backwards or (scaler is not None and scaler.get_scale() < scale)
        if self.method is not None and not skipped:
            with method_errors(FieldError):  # Lightning counts this step once the hook returns: +1
                self.method.on_after_optimizer_step(self.model, self.trainer.global_step + 1)

    def _nonfinite(self, what: str, value: torch.Tensor) -> bool:
        """Whether this step is skipped; raises once more steps went bad than the recipe allows.
        Every rank takes the same decision."""
        value = full_tensor(value)  # a sharded gradient norm is reduced over the ranks here
        bad = not is_finite(value)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return False
        self.nonfinite_steps += 1
        if self.nonfinite_steps > self.max_nonfinite_steps:
            raise NonFiniteTrainingError(explain(what, float(value), self.global_step + 1, self))
        rank_zero_info(
            f"fw: step {self.global_step + 1} skipped: the {what} is {float(value)} "
            f"({self.nonfinite_steps} of model.max_nonfinite_steps={self.max_nonfinite_steps})"
        )
        return True

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        batch, routing = self._routed(batch)
        with method_errors(FieldError), routing:
            loss, outputs = self.task.step(self.model, batch)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        self.task.update_metrics(metrics, batch, outputs)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=self._batch_size(batch), sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        values = metrics.compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        batch, routing = self._routed(batch)
        with method_errors(FieldError), routing:
            records = self.task.predict(self.model, batch, self.tokenizer)
        if "text" in batch:
            for record, text in zip(records, batch["text"]):
                record["text"] = text
        return records

    def on_after_backward(self) -> None:
        self._backwards += 1  # since the last optimizer step (optimizer_step resets it)
        if self.method is not None:
            self.method.on_after_backward(self.model)

    def _routed(self, batch: dict[str, Any]) -> tuple[dict[str, Any], AbstractContextManager[Any]]:
        """The batch without the method's routing column (:attr:`PeftMethod.routing_column`,
        e.g. each example's named adapter), and the context its forward pass runs in."""
        column = self.method.routing_column if self.method is not None else None
        if column is None or column not in batch:
            return batch, nullcontext()
        batch = dict(batch)
        values = batch.pop(column)
        return batch, self.method.routed(self.model, values)

    @staticmethod
    def _batch_size(batch: dict[str, Any]) -> int:
        first = batch.get("input_ids", next(iter(batch.values())))
        return len(first)

    # -- optimization ---------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups: decay / no-decay (``p.fw_weight_decay``, default matrices),
        inside the groups the method asks for (:meth:`PeftMethod.param_groups`); the trainable
        parameters it does not list (the head's may be left out) take the default groups."""
        if self.method is None:
            return param_groups(self.model, self.weight_decay)
        with method_errors():
            requested = self.method.param_groups(self.model, self.learning_rate)
        heads = [p for name in self.head_names for p in self.model.get_submodule(name).parameters()]
        return param_groups(self.model, self.weight_decay, requested, type(self.method).__name__, heads)

    def configure_optimizers(self) -> Any:
        from transformers import get_scheduler

        optimizer = build_optimizer(self.optimizer, self.param_groups(), lr=self.learning_rate)
        total = int(self.trainer.estimated_stepping_batches)
        name = {"constant": "constant_with_warmup"}.get(self.scheduler, self.scheduler)
        schedule = get_scheduler(
            name, optimizer, num_warmup_steps=int(self.warmup_ratio * total), num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- adapter-only checkpoints ---------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: the method's weights and the trainable head (keys as in the
        model), as full tensors (gathered from every rank when the model is sharded)."""
        if self.method is None:
            state = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        else:
            state = self.method.trainable_state_dict(self.model)
        return {k: full_tensor(v) for k, v in state.items()}

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """What a finished run keeps (the method's stored form: a flat prefix, not its MLP; full
        fine-tuning: every trained weight), as full tensors like :meth:`adapter_state_dict`."""
        if self.method is None:
            return self.adapter_state_dict()
        return {k: full_tensor(v) for k, v in self.method.stored_state_dict(self.model).items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in self.adapter_state_dict().items()}
        checkpoint[CHECKPOINT_KEY] = {
            "method": to_config(self.method),
            "backbone": self.backbone.identity(),
            "architecture": architecture(self.model),
            "task": to_config(self.task),
            "param_counts": self.param_counts().as_dict(),
        }
        state = self.method.method_state(self.model) if self.method is not None else {}
        if state:  # e.g. a rank allocator's running scores: tensors, beside the weights
            checkpoint[METHOD_STATE_KEY] = {k: full_tensor(v) for k, v in state.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The recipe is the authority: a checkpoint of another backbone, method, method
        arguments or head is refused before its weights are loaded (framework/settings.py)."""
        found = differences(dict(self.hparams), checkpoint.get("hyper_parameters") or {}, method_defaults(self.method))
        if found:
            raise AdapterError(
                f"--ckpt_path: the checkpoint was trained with other settings than the recipe's: "
                f"{'; '.join(found[:6])}{'; ...' if len(found) > 6 else ''}. Use the run's recipe, or pass "
                "--ckpt_settings adopt to take the checkpoint's (its trust_remote_code is never taken)"
            )
        if self.method is not None:
            self.method.load_method_state(self.model, dict(checkpoint.get(METHOD_STATE_KEY) or {}))

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load an adapter-only state dict (keys ``model.<name>``) on top of the backbone."""
        foreign = [k for k in state_dict if not k.startswith("model.")]
        if foreign:
            raise KeyError(f"checkpoint keys outside the model: {foreign[:5]}")
        weights = shard_like(self.model, {k[len("model.") :]: v for k, v in state_dict.items()})
        if self.method is None:
            return self.model.load_state_dict(weights, strict=False)
        self.method.load_trainable_state_dict(self.model, weights)
        return None
