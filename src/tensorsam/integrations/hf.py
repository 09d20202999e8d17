"""The HuggingFace ``Trainer`` with tensorsam's optimizers: SAM's two passes in ``training_step``,
DAS / BAR / rebalancing as ordinary optimizers, and Q / Cov in the Trainer's logs.

Usage (tested with transformers 5.24, accelerate 1.15)::

    import tensorsam.adapters                 # registers FLoRA / LoRETTA with peft
    from tensorsam.integrations.hf import NormTrackerCallback, SAMTrainer, build_trainer_optimizer

    args = TrainingArguments("out", gradient_accumulation_steps=4, max_steps=300, bf16=True)
    trainer = SAMTrainer(model=peft_model, args=args, train_dataset=ds, method="sam",
                         method_options={"rho": 0.05}, callbacks=[NormTrackerCallback()])
    trainer.train()

    # DAS, BAR, rebalancing: ordinary optimizers, in any Trainer
    opt = build_trainer_optimizer("das", peft_model, args, alpha=0.1)
    Trainer(model=peft_model, args=args, train_dataset=ds, optimizers=(opt, None)).train()

**SAM in the Trainer.**  The Trainer calls ``training_step`` once per micro-batch, then, after the
last micro-batch of an accumulation window, clips the gradient (``max_grad_norm``) and calls
``optimizer.step()`` with no closure.  :class:`SAMTrainerMixin` runs the SAM passes of
:mod:`tensorsam.train.steps` on each micro-batch:

1. the gradient accumulated so far (the earlier micro-batches' perturbed gradients) is stashed;
2. backward at w on this micro-batch alone;
3. ``SAM.first_step``: w is saved and moved to w + e, e = rho g / ||g|| from this micro-batch's g;
4. the stash is put back, and the backward at w + e adds this micro-batch's perturbed gradient;
5. ``SAM.restore``: w is copied back exactly (``copy_``, not a subtraction).

Each micro-batch thus takes its own ascent step: m-sharpness with m = the micro-batch, as in
``train.steps``.  This differs from full-batch SAM, which perturbs once with the gradient of the
whole window; the two agree with one micro-batch per step.  The Trainer then clips the sum of the
perturbed gradients (the gradient the base step uses), and ``optimizer.step()`` is
``SAM.second_step()``: w is already restored, so it is the base step.  Steps that ``sam-every-K``
or ``sam-random-Q`` do not perturb take the Trainer's own one-pass ``training_step``.

**Mixed precision.**  accelerate autocasts the model's forward (bf16 or fp16) in both passes; under
fp16 both backward passes go through the Trainer's GradScaler.  The ascent direction g / ||g|| does
not depend on the loss scale; a non-finite first-pass gradient gives e = 0 and a NaN gradient, so
the scaler skips the step and lowers its scale, as after any overflow.

**DDP.**  The Trainer runs every micro-batch but the last in ``no_sync``.  The first pass always
runs unsynchronised (each replica perturbs with its own gradient, the paper's m-sharpness), unless
``sam_sync=True`` (one perturbation from the all-reduced micro-batch gradient); the second pass
follows the Trainer, so the summed perturbed gradients are all-reduced once, on the last
micro-batch.  DeepSpeed, which keeps the gradients itself, is refused for SAM.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics

from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from tensorsam.dynamics import NormTracker
from tensorsam.groups import named_scale_invariant_groups
from tensorsam.optim import SAM, build_optimizer
from tensorsam.optim.factory import BASES, base_class
from tensorsam.train.steps import sam_passes

__all__ = ["GROUP_METHODS", "PAIR_METHODS", "NormTrackerCallback", "SAMTrainer", "SAMTrainerMixin",
           "UnsupportedMethod", "build_trainer_optimizer", "check_method", "total_training_steps"]

GROUP_METHODS = ("das", "nbar", "obar", "rebalance")   # methods that act on scale-invariant groups
PAIR_METHODS = ("nbar", "obar")                        # ... on (x, y) pairs only


class UnsupportedMethod(ValueError):
    """``method`` is not defined for this model: BAR on groups that are not pairs (FLoRA's
    (A, G, B), LoRETTA's TT cores), or a group method on a model without groups.  A grid records
    the cell as ``skipped`` with ``str(err)`` as the reason."""


def check_method(method: str, model) -> None:
    """Raise :class:`UnsupportedMethod` if ``method`` needs groups that ``model`` lacks."""
    if method not in GROUP_METHODS:
        return
    groups = named_scale_invariant_groups(model)
    if not groups:
        raise UnsupportedMethod(f"{method} acts on scale-invariant groups (adapters, tensorized layers), "
                                f"and {type(model).__name__} has no trainable ones")
    bad = [g for g in groups if len(g) != 2]
    if method in PAIR_METHODS and bad:
        kinds = ", ".join(sorted({f"{g.kind} ({len(g)} tensors)" for g in bad}))
        raise UnsupportedMethod(f"{method} (BAR) is defined for two-factor pairs such as LoRA's (A, B); "
                                f"{len(bad)} of this model's groups are not pairs: {kinds}, e.g. {bad[0].module!r}")


def total_training_steps(args: TrainingArguments, num_examples: int | None = None) -> int | None:
    """The optimizer steps the Trainer will take: ``args.max_steps`` if positive, else counted from
    ``num_examples`` as the Trainer counts them (batches per process, then accumulation windows per
    epoch, times epochs); ``None`` if neither is known."""
    if args.max_steps > 0:
        return int(args.max_steps)
    if num_examples is None:
        return None
    per_batch = args.train_batch_size * max(args.world_size, 1)
    batches = num_examples // per_batch if args.dataloader_drop_last else math.ceil(num_examples / per_batch)
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def _param_groups(model, weight_decay: float, decays: bool) -> list[dict]:
    """The trainable parameters, with weight decay off for biases and norm layers (the Trainer's
    rule by name)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if not decays:
        return [{"params": [p for _, p in named]}]
    exempt = [("bias" in n.lower() or "norm" in n.lower()) for n, _ in named]
    groups = [{"params": [p for (_, p), e in zip(named, exempt) if not e], "weight_decay": weight_decay},
              {"params": [p for (_, p), e in zip(named, exempt) if e], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_trainer_optimizer(method: str, model, args: TrainingArguments, *, total_steps: int | None = None,
                            num_examples: int | None = None, base="adamw", **options):
    """``build_optimizer(method, ...)`` over ``model``'s trainable parameters, with the Trainer's
    settings: ``lr`` = ``args.learning_rate``, Adam's betas and eps from ``args``, ``args.weight_decay``
    (not on biases and norms), ``groups=model`` for das / nbar / obar / rebalance, and
    ``total_steps`` (for decaying alpha schedules) from :func:`total_training_steps` unless given.
    ``options`` override these and are checked by the factory.  Pass the result as
    ``Trainer(optimizers=(opt, None))``; SAM needs :class:`SAMTrainer`.

    Raises :class:`UnsupportedMethod` (a ``ValueError``) for BAR on groups that are not pairs.
    """
    check_method(method, model)
    if total_steps is None:
        total_steps = total_training_steps(args, num_examples)
    cls = base_class(method if method in BASES else base)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {"lr": args.learning_rate}
    if "betas" in accepted:
        defaults["betas"] = (args.adam_beta1, args.adam_beta2)
    if "eps" in accepted:
        defaults["eps"] = args.adam_epsilon
    weight_decay = options.pop("weight_decay", args.weight_decay)
    params = _param_groups(model, weight_decay, "weight_decay" in accepted)
    return build_optimizer(method, params, groups=model if method in GROUP_METHODS else None, base=base,
                           total_steps=total_steps, **{**defaults, **options})


def _as_loss(loss, _labels):
    return loss


@contextlib.contextmanager
def _force_sync(model):
    """Have DDP all-reduce this pass even inside the Trainer's ``no_sync`` (``sam_sync=True``)."""
    old = getattr(model, "require_backward_grad_sync", None)
    if old is None:
        yield
        return
    model.require_backward_grad_sync = True
    try:
        yield
    finally:
        model.require_backward_grad_sync = old


class _MicroBatchLoss:
    """What ``train.steps``' SAM passes call as the model: calling it gives the Trainer's loss on
    one micro-batch, scaled for accumulation as ``Trainer.training_step`` scales it.  Those passes
    enter ``no_sync()`` around the first pass only, so it sets the first pass's synchronisation."""

    def __init__(self, trainer: Trainer, model, num_items_in_batch, sam_sync: bool):
        self.trainer, self.model, self.num_items, self.sam_sync = trainer, model, num_items_in_batch, sam_sync

    def __call__(self, inputs):
        t = self.trainer
        with t.compute_loss_context_manager():
            loss = t.compute_loss(self.model, inputs, num_items_in_batch=self.num_items)
        if t.args.n_gpu > 1:
            loss = loss.mean()              # DataParallel: one loss per device
        scaled = getattr(t, "loss_is_scaled_for_ga", None)
        if scaled is None:                  # the Trainer's rule: normalised by num_items_in_batch already?
            scaled = (t.model_accepts_loss_kwargs and self.num_items is not None) or t.compute_loss_func is not None
        if not scaled:
            loss = loss / getattr(t, "current_gradient_accumulation_steps", t.args.gradient_accumulation_steps)
        return loss

    def no_sync(self):
        return _force_sync(self.model) if self.sam_sync else self.trainer.accelerator.no_sync(self.model)

    def modules(self):
        return self.model.modules()


class SAMTrainerMixin:
    """Mix into a ``transformers.Trainer`` (before it): SAM's two passes per micro-batch in
    ``training_step`` (see the module docstring), optimizers by name, and Q / Cov of a
    :class:`NormTrackerCallback` in the training logs.

    Args (besides the Trainer's):
        method, method_options: build the optimizer with :func:`build_trainer_optimizer` when
            training starts, with ``total_steps`` = the Trainer's own step count.  Or pass an
            optimizer through ``optimizers=``.
        sam_sync: under DDP, all-reduce the first pass's gradient (one perturbation for all
            replicas) instead of perturbing per replica.
    """

    def __init__(self, *args, method: str | None = None, method_options: dict | None = None,
                 sam_sync: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if method is not None and (self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None)):
            raise ValueError("give method= or an optimizer (optimizers= / optimizer_cls_and_kwargs=), not both")
        if not isinstance(sam_sync, bool):
            raise ValueError(f"sam_sync must be a bool, got {sam_sync!r}")  # noqa: TRY004
        if method is not None:
            check_method(method, self.model)
        self.method, self.method_options, self.sam_sync = method, dict(method_options or {}), sam_sync

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.method is not None:
            options = dict(self.method_options)
            options.setdefault("total_steps", self.state.max_steps or None)
            self.optimizer = build_trainer_optimizer(self.method, model if model is not None else self.model,
                                                     self.args, **options)
            return self.optimizer
        return super().create_optimizer(model)

    def sam_optimizer(self) -> SAM | None:
        """The SAM inside the Trainer's optimizer (accelerate wraps it), or ``None``."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, SAM):
            opt = getattr(opt, "optimizer", None)
        return opt

    def training_step(self, model, inputs, num_items_in_batch=None):
        sam = self.sam_optimizer()
        if sam is None or not sam.perturbs_this_step():
            return super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("SAM's two passes work on the gradients in .grad, which DeepSpeed keeps itself: "
                             "train SAM without DeepSpeed (one process or DDP)")
        prepare_cp = getattr(self, "_prepare_context_parallel_inputs", None)
        cp_context, inputs = prepare_cp(model, inputs) if prepare_cp else (contextlib.nullcontext, inputs)
        with cp_context():
            model.train()
            if callable(getattr(self.optimizer, "train", None)):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            loss_model = _MicroBatchLoss(self, model, num_items_in_batch, self.sam_sync)
            # one micro-batch, sam_sync=False: the first pass's sync is loss_model.no_sync()'s choice
            (loss,) = sam_passes(loss_model, sam, _as_loss, [(inputs, None)], self.accelerator.scaler, None, False)
        return loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:      # a training log: add what the trackers recorded for this step
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, NormTrackerCallback):
                    logs.update(cb.pop_logs())
        return super().log(logs, *args, **kwargs)


class SAMTrainer(SAMTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`SAMTrainerMixin`."""


class NormTrackerCallback(TrainerCallback):
    """Q and Cov(s, gamma) of the model's scale-invariant groups (a
    :class:`~tensorsam.dynamics.NormTracker`) in the Trainer's logs, at its logging steps.

    They are measured on the weights and the gradient the optimizer step is about to use (after
    accumulation and clipping) and logged with the step's loss as ``norm/Q_mean``, ``norm/Q_max``,
    ``norm/cov_mean`` and ``norm/u`` (with ``per_group=True`` also ``norm/Q/<module>`` and
    ``norm/cov/<module>``).  Every group's row is in ``tracker.history`` and, with ``path``, in a
    CSV / JSONL file.  With :class:`SAMTrainer` they reach every logger (``report_to``) and
    ``state.log_history``; with a plain Trainer, only the log history and loggers that come after
    this callback.

    Args:
        source: the model or groups to track (default: the Trainer's model, at train start).
        path, per_group, prefix: the tracker's file; per-group keys; the key prefix.
    """

    def __init__(self, source=None, *, path=None, per_group: bool = False, prefix: str = "norm/"):
        self.source, self.path, self.per_group, self.prefix = source, path, per_group, prefix
        self.tracker: NormTracker | None = None
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.tracker is None:
            self.tracker = NormTracker(self.source if self.source is not None else model, path=self.path)

    def _log_due(self, args, state, step: int) -> bool:
        """Whether the Trainer logs at ``step`` (its DefaultFlowCallback's rule)."""
        if step == 1 and args.logging_first_step:
            return True
        return (args.logging_strategy == IntervalStrategy.STEPS and state.logging_steps > 0
                and step % state.logging_steps == 0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1            # the step being taken, as its log will be numbered
        if self.tracker is None or not self._log_due(args, state, step):
            return
        rows = self.tracker.record(step, force=True)
        q, cov = [r["Q"] for r in rows], [r["cov"] for r in rows]
        p = self.prefix
        self._pending = {f"{p}Q_mean": statistics.fmean(q), f"{p}Q_max": max(q),
                         f"{p}cov_mean": statistics.fmean(cov), f"{p}u": rows[0]["u"]}
        if self.per_group:
            for r in rows:
                self._pending[f"{p}Q/{r['group']}"] = r["Q"]
                self._pending[f"{p}cov/{r['group']}"] = r["cov"]

    def pop_logs(self) -> dict[str, float]:
        """The values recorded for the coming log, once."""
        out, self._pending = self._pending, {}
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs:
            return                              # SAMTrainer.log took them already
        pending = self.pop_logs()
        logs.update(pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(pending)

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.close()
