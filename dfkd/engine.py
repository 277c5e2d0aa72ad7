"""The one training loop.

Every run, whether it trains a teacher, a scratch student, a real-data KD
student or a data-free student, is this loop: ask the sample source for a
batch, take a student step on the recipe's loss, evaluate every few epochs
and log. What differs between methods is which components the recipe
composes, never a branch on a method's name here.

The run around the loop (its folder, lock, resume, checkpoints and summary)
is :class:`dfkd.trainer.Trainer`; the loop only says, after each epoch,
that the epoch is done.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dfkd.averaging import build_student_ema
from dfkd.build import build_eval_loader, build_model, build_normalize
from dfkd.cost import multiply_adds
from dfkd.data import build_dataset
from dfkd.data.transforms import build_augmentation
from dfkd.errors import ConfigError, NonFiniteLossError
from dfkd.evaluate import evaluate
from dfkd.losses import StudentLoss
from dfkd.metrics import histogram
from dfkd.optim import build_lr_scheduler, build_optimizer
from dfkd.policies.temperature import build_temperature
from dfkd.policies.weighting import build_weighting
from dfkd.sources import SOURCES, Batch, Context, SampleSource, SourceEnv
from dfkd.tracking import Meter, RunLogger, image_grid
from generators.synthesizers import COLLAPSED_SPREAD

__all__ = ["Loop", "RunState"]


@dataclass
class RunState:
    """Counters and history that make a run resumable; everything else is derived."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    wall_s: float = 0.0  # accumulated over restarts
    eval_s: float = 0.0  # the part of wall_s spent evaluating
    budget_spent: bool = False  # the run stopped at train.time_budget_s
    synth_s: float = 0.0
    reloads: int = 0  # faults survived by reloading a checkpoint (train.nonfinite=reload)
    loyalty_hist: list[int] | None = None  # the latest evaluation's per-sample loyalty, binned (metrics.histogram)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Loop:
    """The components of a run, built from its config, and the loop that trains them.

    Args:
        cfg: a validated config from :func:`dfkd.recipe.load_config`.
        accelerator: the run's accelerator (:func:`dfkd.build.make_accelerator`).

    ``logger`` is set by whoever runs the loop, before :meth:`epochs`: it knows
    where the run writes and from which step it resumes.
    """

    logger: RunLogger

    def __init__(self, cfg: DictConfig, accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.device = accelerator.device
        set_seed(cfg.seed, device_specific=True)

        data = cfg.data
        self.spec, test_set = build_dataset(
            data.name, data.root, "test", download=data.download, image_size=data.image_size,
            num_samples=data.test_samples, seed=cfg.seed,
        )
        self.normalize = build_normalize(cfg, self.spec).to(self.device)
        augment = build_augmentation(data.augment or self.spec.augment, self.spec.image_size).to(self.device)

        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.student = build_model(cfg.student, self.spec, "student").to(memory_format=self.memory_format)
        self.teacher = build_model(cfg.teacher, self.spec, "teacher") if cfg.teacher is not None else None
        if self.teacher is not None:  # never wrapped, never trained
            self.teacher.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)

        self.loss = StudentLoss(cfg.loss.terms, cfg.loss.label_smoothing)
        if self.loss.needs_teacher and self.teacher is None:
            raise ConfigError(f"loss.terms {list(cfg.loss.terms)} need a teacher, but the recipe has no 'teacher' section.")
        self.weighting = build_weighting(cfg.weighting)
        self.temperature = build_temperature(cfg.temperature, cfg.loss.temperature, self.spec.num_classes)
        if self.temperature.module is not None and "kd" not in self.loss.weights:
            raise ConfigError(
                f"temperature {cfg.temperature.name!r} learns the temperature of the kd term, but loss.terms "
                f"{list(cfg.loss.terms)} has no kd: add one (e.g. {{ce: 0.1, kd: 0.9}}) or use temperature.name=fixed."
            )

        env = SourceEnv(
            cfg=cfg, spec=self.spec, train_set=self._train_set, normalize=self.normalize, augment=augment,
            accelerator=accelerator, seed=cfg.seed, teacher=self.teacher,
        )
        options = OmegaConf.to_container(cfg.source)
        self.source: SampleSource = SOURCES.get(options.pop("name"))(env, **options)
        self.steps_per_epoch = cfg.train.steps_per_epoch or self.source.steps_per_epoch()
        if not self.steps_per_epoch:
            raise ConfigError(f"source {cfg.source.name!r} has no natural epoch length: set train.steps_per_epoch.")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch

        # A learnt temperature (CTKD) trains in the student's optimiser, with its lr, schedule and weight decay:
        # the public train_student.py builds one SGD over trainable_list = [student, Global_T].
        param_groups = [{"params": list(self.student.parameters())}]
        if self.temperature.module is not None:
            param_groups.append({"params": self.temperature.parameters()})
        optimizer = build_optimizer(param_groups, cfg.optim)
        self.scheduler = build_lr_scheduler(optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        eval_loader = build_eval_loader(test_set, cfg.eval.batch_size, data.num_workers)
        self.student, self.optimizer, self.eval_loader = accelerator.prepare(self.student, optimizer, eval_loader)
        self._teacher_eval_logits: list[Tensor] = []  # the frozen teacher on the test split: computed once
        if self.temperature.module is not None:  # on the device, and under DDP its gradients are all-reduced
            self.temperature.module = accelerator.prepare(self.temperature.module)

        self.macs_per_image = self._macs_per_image()
        # a moving average of the student's weights (dfkd.averaging), copied before compile: it stays eager
        self.ema = None if cfg.train.ema_decay is None else build_student_ema(self.unwrapped_student, cfg.train.ema_decay)
        if cfg.train.compile:  # in place, so state dicts and checkpoints keep their keys
            for name, module in self.modules().items():
                if name in ("student", "generator"):
                    module.compile()
        self.state = RunState()
        self._last_per_sample: dict[str, Tensor] = {}  # the last step's per-sample loss and weights, for histograms
        self._collapse_reported = False
        self._resets_reported = 0.0

    def _train_set(self):
        data = self.cfg.data
        _, train_set = build_dataset(
            data.name, data.root, "train", download=data.download, image_size=data.image_size,
            num_samples=data.train_samples, seed=self.cfg.seed,
        )
        return train_set

    def _macs_per_image(self) -> dict[str, int]:
        """Multiply-adds of one image through each network of the run: where its time goes."""
        image = (self.spec.in_channels, self.spec.image_size, self.spec.image_size)
        costs = {"student": multiply_adds(self.unwrapped_student, image, self.device)}
        if self.teacher is not None:
            costs["teacher"] = multiply_adds(self.teacher, image, self.device)
        generator = getattr(self.source, "checkpoint_modules", dict)().get("generator")
        if generator is not None:
            labelled = bool(getattr(generator, "conditional", False))
            costs["generator"] = multiply_adds(generator, (generator.nz,), self.device, labelled=labelled)
        return costs

    # -- what a checkpoint holds

    @property
    def unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)

    @property
    def evaluated_student(self) -> nn.Module:
        """The student the run evaluates and ships: the moving average of its weights where it keeps one."""
        return self.unwrapped_student if self.ema is None else self.ema.module

    def modules(self) -> dict[str, nn.Module]:
        """The trained networks by name: the student, the source's (a generator), a learnt temperature."""
        extra = getattr(self.source, "checkpoint_modules", None)
        modules = {"student": self.unwrapped_student, **(extra() if extra is not None else {})}
        if self.temperature.module is not None:
            modules["temperature"] = self.accelerator.unwrap_model(self.temperature.module)
        return modules

    def stateful(self) -> dict[str, Any]:
        """What every process holds the same of; the source's state is each process's own (its shard)."""
        stateful = {"optimizer": self.optimizer, "scheduler": self.scheduler, "run": self.state}
        if self.ema is not None:
            stateful["student_ema"] = self.ema
        return stateful

    def identity(self) -> dict[str, str | None]:
        """What a checkpoint can only be resumed by: the run's sample source and synthesizer, and the
        decay of the student's moving average (whose state a run without one has no place for)."""
        synthesizer, decay = self.cfg.synthesizer, self.cfg.train.ema_decay
        return {
            "source.name": self.cfg.source.name, "synthesizer.name": synthesizer.name if synthesizer else None,
            "train.ema_decay": None if decay is None else str(decay),
        }

    def synth_seconds(self) -> float:
        return float(getattr(self.source, "synth_seconds", 0.0))

    # -- the loop

    def context(self, epoch: int) -> Context:
        return Context(
            teacher=self.teacher, student=self.student, epoch=epoch, step=self.state.step,
            epochs=self.cfg.train.epochs, steps_per_epoch=self.steps_per_epoch,
            metrics=self.state.history[-1] if self.state.history else {},
            log=lambda name, value: self.logger.scalars({name: value}, self.state.step),
            histogram=lambda name, values: self.logger.histogram(name, values, self.state.step),
        )

    def epochs(self) -> Iterator[bool]:
        """Train from the current state to the last epoch, yielding after each epoch (once it is logged
        and, when due, evaluated) whether it is the last one: the end of the schedule or of the time budget.

        Raises:
            NonFiniteLossError: a logged mean was NaN or infinite; nothing of that epoch is yielded.
        """
        cfg = self.cfg
        meter = Meter()
        self._clock = (time.perf_counter(), self.state.wall_s)
        self._log_clock, self._samples_since_log = (time.perf_counter(), self._synth_counters()), 0
        for epoch in range(self.state.epoch, cfg.train.epochs):
            ctx = self.context(epoch)
            self.source.on_epoch_start(ctx)
            for _ in range(self.state.step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                ctx.step = self.state.step
                batch = self.source.next_batch(ctx)
                meter.update(batch.metrics)
                meter.update(self.train_step(batch))
                self._samples_since_log += len(batch.x)
                self.state.step += 1
                if self.state.step % cfg.train.log_every == 0:
                    self._log_training(meter)
                self.logger.progress()
                if self._budget_spent():
                    break
            self.source.on_epoch_end(ctx)
            self.state.epoch = epoch + 1
            self._log_training(meter)  # before the epoch is yielded: a checkpoint never holds a non-finite run
            self._log_images()
            self.update_wall()
            last = self.state.epoch == cfg.train.epochs or self.state.budget_spent
            if self.state.epoch % cfg.train.eval_every == 0 or last:
                self._evaluate_and_record()
            yield last
            if last:
                break
        self.update_wall()

    def update_wall(self) -> None:
        """Bring ``state.wall_s`` up to now (the clock starts with :meth:`epochs`)."""
        started, before = self._clock
        self.state.wall_s = before + time.perf_counter() - started

    def _budget_spent(self) -> bool:
        """Whether the training time, synthesis included and evaluation excluded, has reached
        ``train.time_budget_s``; once it has, the run evaluates, checkpoints and ends there."""
        budget = self.cfg.train.time_budget_s
        if budget is None:
            return False
        self.update_wall()
        self.state.budget_spent = self.state.wall_s - self.state.eval_s >= budget
        return self.state.budget_spent

    def train_step(self, batch: Batch) -> dict[str, Tensor]:
        """One optimizer step of the student on ``batch``; returns named device scalars."""
        x = batch.x.contiguous(memory_format=self.memory_format)
        with self.accelerator.autocast():
            s_logits = self.student(x)
            t_logits = batch.teacher_logits
            if t_logits is None and self.loss.needs_teacher:
                with torch.no_grad():
                    t_logits = self.teacher(x)
            progress, epochs = self.state.step / self.steps_per_epoch, self.cfg.train.epochs
            temperature, temperature_logs = self.cfg.loss.temperature, {}
            if self.loss.needs_teacher:
                temperature, temperature_logs = self.temperature(s_logits, t_logits, progress, epochs)
            per_sample, raw = self.loss(s_logits, t_logits, batch.y, temperature)
        weights, weighting_logs = self.weighting(per_sample, progress, epochs)
        loss = per_sample.mean() if weights is None else (weights * per_sample).mean()
        self.accelerator.backward(loss)
        if self.cfg.optim.grad_clip:
            self.accelerator.clip_grad_norm_(self.student.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.unwrapped_student)

        terms = {"loss": loss.detach(), **weighting_logs, **temperature_logs}
        for name, value in raw.items():
            terms[f"student/{name}"] = value.detach().mean()
            terms[f"student/{name}_weighted"] = self.loss.weights[name] * terms[f"student/{name}"]
        self._last_per_sample = {"loss": per_sample.detach()}
        if weights is not None:
            self._last_per_sample["weight"] = weights
        return terms

    # -- logging and evaluation

    def _log_training(self, meter: Meter) -> None:
        means = meter.pop_means(self._mean_over_processes)
        if not means:
            return
        bad = [name for name, value in means.items() if not np.isfinite(value)]
        if bad:
            raise NonFiniteLossError(f"non-finite loss at or before step {self.state.step} in: {', '.join(bad)}.")
        self._check_collapse(means.get("synth/spread"), means.get("synth/resets"))
        means["lr"] = self.scheduler.get_last_lr()[0]
        now, synth = time.perf_counter(), self._synth_counters()
        then, synth_before = self._log_clock
        if now > then:
            means["train/samples_per_s"] = self._samples_since_log * self.accelerator.num_processes / (now - then)
        if synth[0] > synth_before[0]:
            means["synth/images_per_s"] = (synth[1] - synth_before[1]) * self.accelerator.num_processes / (synth[0] - synth_before[0])
        self._log_clock, self._samples_since_log = (now, synth), 0
        self.logger.scalars(means, self.state.step)
        for name, values in self._last_per_sample.items():
            self.logger.histogram(f"per_sample/{name}", values, self.state.step)
        self.logger.progress(0, loss=means["loss"])

    def _check_collapse(self, spread: float | None, resets: float | None) -> None:
        """Say so, once, when the synthetic images stop differing from each other; or, where the
        synthesizer starts a fresh generator then (``reset_on_collapse``), each time it does.

        A generator that saturates (a tanh or sigmoid output pinned at its limits, which
        the DAFL generator's affine-free output BN then maps to zeros) makes one image
        for every noise vector and rarely recovers: the student then learns nothing for
        the rest of the run, while every loss looks calm.
        """
        if resets is not None:  # the synthesizer replaces a dead generator itself
            if resets > self._resets_reported and self.accelerator.is_main_process:
                print(
                    f"dfkd: warning: the generator collapsed to one image by step {self.state.step} and was "
                    f"re-initialised (synthesizer.reset_on_collapse; {resets:.0f} so far).", file=sys.stderr, flush=True,
                )
            self._resets_reported = resets
            return
        if spread is None or spread >= COLLAPSED_SPREAD or self._collapse_reported:
            return
        self._collapse_reported = True
        if self.accelerator.is_main_process:
            print(
                f"dfkd: warning: the synthetic images have collapsed to one image at step {self.state.step}: their "
                f"spread across the batch (synth/spread) is {spread:.2g}, below {COLLAPSED_SPREAD:g}. The student "
                "learns nothing from here on; lower synthesizer.lr and resume from an earlier checkpoint "
                "(train.resume=<checkpoint folder>), or let a generative synthesizer start a fresh generator "
                "when this happens (synthesizer.reset_on_collapse=true).", file=sys.stderr, flush=True,
            )

    def _mean_over_processes(self, sums: Tensor) -> Tensor:
        """Every process logs, and checks for faults, the same means: those over all processes."""
        if self.accelerator.num_processes == 1 or sums.device != self.device:  # host-known values agree already
            return sums
        return self.accelerator.reduce(sums, "mean")

    def _synth_counters(self) -> tuple[float, int]:
        """(seconds spent synthesising, images synthesised) so far, for sources that synthesise."""
        return self.synth_seconds(), int(getattr(self.source, "synth_images", 0))

    def _log_images(self, n: int = 64) -> None:
        """An image grid of the source's samples, once per epoch, where the source can show them."""
        preview = getattr(self.source, "preview", None)
        if preview is None or not self.accelerator.is_main_process:
            return
        from torchvision.utils import save_image

        grid = image_grid(preview(n))
        self.logger.images("synthetic", grid, self.state.step)
        save_image(grid, self.logger.dir / "synthetic.png")  # the latest grid, also as a file to open

    def _evaluate_and_record(self) -> None:
        started = time.perf_counter()
        metrics = evaluate(
            self.evaluated_student,
            self.eval_loader,
            self.normalize,
            self.accelerator,
            self.teacher,
            per_sample=self.teacher is not None,
            teacher_cache=self._teacher_eval_logits,
        )
        if self.ema is not None:  # the trained student beside its average, to see what averaging buys
            online = evaluate(self.student, self.eval_loader, self.normalize, self.accelerator, self.teacher,
                              teacher_cache=self._teacher_eval_logits)
            metrics.update({f"online_{name}": online[name] for name in ("acc1", "agree1") if name in online})
        per_sample = metrics.pop("per_sample", None)
        if per_sample is not None:
            self.state.loyalty_hist = histogram(per_sample["loyalty"])
        elapsed = self.state.wall_s - self.state.eval_s  # training time up to this evaluation, synthesis included
        self.state.eval_s += time.perf_counter() - started
        entry = {
            "epoch": self.state.epoch, "step": self.state.step, **metrics, "lr": self.scheduler.get_last_lr()[0],
            "elapsed_s": round(elapsed, 3), "eval_s": round(self.state.eval_s, 3),
        }
        self.state.history.append(entry)
        self.logger.scalars({f"eval/{k}": v for k, v in metrics.items()}, self.state.step)
        self.logger.record(entry)
