"""The one training loop.

Every run, whether it trains a teacher, a scratch student, a real-data KD
student or a data-free student, is this loop: ask the sample source for a
batch, take a student step on the recipe's loss, evaluate every few epochs,
log, and checkpoint. What differs between methods is which components the
recipe composes, never a branch on a method's name here.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dfkd.checkpoint import CheckpointManager, check_fit, load_weights, run_lock, save_model
from dfkd.config import load_config, save_config
from dfkd.cost import multiply_adds
from dfkd.data import DatasetSpec, build_dataset
from dfkd.data.transforms import Normalize, build_augmentation, to_unit
from dfkd.errors import CheckpointError, ConfigError, DfkdError, NonFiniteLossError, RunLockedError
from dfkd.losses import StudentLoss
from dfkd.metrics import histogram, per_sample_metrics, stability, summarize
from dfkd.models import create_model
from dfkd.optim import build_lr_scheduler, build_optimizer
from dfkd.policies.temperature import build_temperature
from dfkd.policies.weighting import build_weighting
from dfkd.sources import SOURCES, Batch, Context, SampleSource, SourceEnv
from dfkd.synthesis import check_generator_fits
from dfkd.tracking import Meter, RunLogger
from generators.synthesizers import COLLAPSED_SPREAD

__all__ = ["Trainer", "RunState", "build_eval_loader", "build_model", "build_normalize", "evaluate", "make_accelerator"]


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


# --------------------------------------------------------------------------- building blocks


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """The accelerator for a run; launch topology comes from ``accelerate launch``, not the recipe.

    On a machine with no accelerator, a multi-process launch runs on the CPU over
    gloo. accelerate 1.x starts several CPU processes itself only through mpirun;
    its torchrun path (``--multi_gpu``, or ``recipes/accelerate/cpu.yaml``) starts
    them without MPI, but would leave each process alone unless told to use the
    CPU, which is what ``cpu=True`` does here.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != cfg.train.mixed_precision:
        # accelerate keeps one state per process and refuses a second precision. One process runs several
        # recipes in turn when a run trains its teacher first (each with its own precision), so start the
        # precision state afresh; the process group, which belongs to PartialState, is kept. (accelerate's
        # own test harness resets it the same way.)
        AcceleratorState._reset_state(reset_partial_state=False)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=distributed and not torch.accelerator.is_available())
    if cfg.train.mixed_precision == "fp16" and not accelerator.native_amp:
        warnings.warn(
            f"train.mixed_precision=fp16 has no effect on {accelerator.device.type}: accelerate enables fp16 "
            "autocast only on GPUs, so this run computes in float32. For mixed precision on a CPU use bf16.",
            stacklevel=2,
        )
    return accelerator


def build_model(cfg: DictConfig, spec: DatasetSpec, role: str) -> nn.Module:
    """A zoo model sized for ``spec``, loaded from ``cfg.checkpoint`` when one is given."""
    model = create_model(cfg.arch, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if cfg.checkpoint:
        load_weights(model, cfg.checkpoint, what=f"{role} checkpoint")
    return model


def ensure_teacher(cfg: DictConfig) -> None:
    """Train the teacher first when the recipe names a ``teacher.recipe`` and its checkpoint is missing.

    The teacher recipe runs with ``output_dir`` set to the checkpoint's folder
    (whose file must be that run's ``student.safetensors``), so a second run of
    the same recipe reuses the teacher instead of training it again. On the
    same dataset it reads the data from this run's ``data.root``.
    """
    teacher = cfg.teacher
    if teacher is None or not teacher.recipe:
        return
    if not teacher.checkpoint:
        raise ConfigError("teacher.recipe needs teacher.checkpoint: the path the teacher run will write.")
    checkpoint = Path(teacher.checkpoint)
    if checkpoint.is_file():
        return
    if checkpoint.name != "student.safetensors":
        raise ConfigError(
            f"teacher.checkpoint {str(checkpoint)!r} is missing and would be produced by teacher.recipe, which "
            "writes <output_dir>/student.safetensors: point teacher.checkpoint at such a file."
        )
    teacher_cfg = load_config(teacher.recipe, [f"output_dir={checkpoint.parent}", "train.resume=auto"])
    if teacher_cfg.data.name == cfg.data.name:  # the same dataset is where this run was told it is
        teacher_cfg.data.root = cfg.data.root
    if teacher_cfg.student.arch != teacher.arch:
        raise ConfigError(
            f"teacher.recipe trains {teacher_cfg.student.arch!r} but teacher.arch is {teacher.arch!r}."
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"no teacher checkpoint at {checkpoint}: training the teacher first ({teacher_cfg.student.arch} on "
            f"{teacher_cfg.data.name}, {teacher.recipe}); later runs reuse it", flush=True,
        )
    Trainer(teacher_cfg, phase="teacher").fit()


def build_normalize(cfg: DictConfig, spec: DatasetSpec) -> Normalize:
    """The dataset's normalisation, or the recipe's override of it."""
    mean = list(cfg.data.mean) if cfg.data.mean is not None else list(spec.mean)
    std = list(cfg.data.std) if cfg.data.std is not None else list(spec.std)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != spec.in_channels:
            raise ConfigError(f"{key} has {len(values)} values but {spec.name} images have {spec.in_channels} channels.")
    if min(std) <= 0:
        raise ConfigError(f"data.std must be positive, got {std}.")
    return Normalize(mean, std)


def build_eval_loader(test_set: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """An in-order loader over the test split; in-memory datasets need no worker processes."""
    in_memory = isinstance(getattr(test_set, "images", None), Tensor)
    return DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=0 if in_memory else num_workers)


@torch.no_grad()
def evaluate(
    student: nn.Module,
    loader: DataLoader,
    normalize: nn.Module,
    accelerator: Accelerator,
    teacher: nn.Module | None = None,
    *,
    per_sample: bool = False,
    teacher_cache: list[Tensor] | None = None,
) -> dict[str, Any]:
    """Acc@1/5, and against a teacher Agree@1, loyalty and loyalty_ref, over every test sample once.

    Args:
        loader: a loader prepared by ``accelerator`` yielding ``(uint8 images, labels)``.
        per_sample: also return the gathered per-sample values under ``"per_sample"``.
        teacher_cache: the frozen teacher's logits per batch of ``loader``, which must yield the
            same batches in the same order every time. An empty list is filled on the first call
            and later calls read it instead of running the teacher again.
    """
    was_training = student.training
    student.eval()
    chunks: dict[str, list[Tensor]] = defaultdict(list)
    cached = len(teacher_cache) if teacher_cache is not None else 0
    for index, (images, labels) in enumerate(loader):
        x = normalize(to_unit(images))
        with accelerator.autocast():
            s_logits = student(x)
            if teacher is None:
                t_logits = None
            elif index < cached:
                t_logits = teacher_cache[index]
            else:
                t_logits = teacher(x)
                if teacher_cache is not None:
                    teacher_cache.append(t_logits)
        values = per_sample_metrics(s_logits.float(), labels, None if t_logits is None else t_logits.float())
        for name, value in accelerator.gather_for_metrics(values).items():
            chunks[name].append(value)
    student.train(was_training)
    gathered = {name: torch.cat(parts) for name, parts in chunks.items()}
    result: dict[str, Any] = summarize(gathered)
    if per_sample:
        result["per_sample"] = {k: v.cpu() for k, v in gathered.items()}
    return result


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine(device: torch.device) -> str:
    """What a run ran on, for the benchmark tables: processor, core count, accelerator and torch."""
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model; platform does not
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return f"{os.cpu_count()} x {cpu}; {where}; torch {torch.__version__}"


def _peak_memory_mb(device: torch.device) -> float:
    """Peak device memory on CUDA; on CPU, the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _phase(cfg: DictConfig) -> str:
    """What a run does, in two or three words: its progress bar's label."""
    if cfg.teacher is None:
        return "train"
    return "distil without data" if cfg.synthesizer is not None else "distil"


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds a run from its config and runs the loop.

    Args:
        cfg: a validated config from :func:`dfkd.config.load_config`.
        accelerator: reuse an accelerator (tests); by default one is made from the config.
        phase: what the run is, for its progress bar and log (by default from the config: ``train``,
            ``distil`` or ``distil without data``).
    """

    def __init__(self, cfg: DictConfig, accelerator: Accelerator | None = None, *, phase: str | None = None) -> None:
        self.cfg = cfg
        self.phase = phase or _phase(cfg)
        # The teacher's own run comes first: before seeding, so a reused and a freshly trained teacher give
        # the same run, and before this run's accelerator, whose precision state the teacher run would reset.
        # A generator that cannot make this dataset's images is reported before that training, not after.
        check_generator_fits(cfg)
        ensure_teacher(cfg)
        self.accelerator = accelerator or make_accelerator(cfg)
        self.device = self.accelerator.device
        self.output_dir = Path(cfg.output_dir)
        self._created = self._prepare_output_dir()
        try:
            self._build()
        except BaseException:
            self._discard_if_unused()
            raise

    def _build(self) -> None:
        """Everything a run needs, from the data to the checkpoint manager."""
        cfg = self.cfg
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
            accelerator=self.accelerator, seed=cfg.seed, teacher=self.teacher,
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
        self.student, self.optimizer, self.eval_loader = self.accelerator.prepare(self.student, optimizer, eval_loader)
        self._teacher_eval_logits: list[Tensor] = []  # the frozen teacher on the test split: computed once
        if self.temperature.module is not None:  # on the device, and under DDP its gradients are all-reduced
            self.temperature.module = self.accelerator.prepare(self.temperature.module)

        self.macs_per_image = self._macs_per_image()
        if cfg.train.compile:  # in place, so state dicts and checkpoints keep their keys
            for name, module in self._checkpoint_modules().items():
                if name in ("student", "generator"):
                    module.compile()
        self.state = RunState()
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        self._last_per_sample: dict[str, Tensor] = {}  # the last step's per-sample loss and weights, for histograms
        self._collapse_reported = False

    # -- setup helpers

    def _prepare_output_dir(self) -> list[Path]:
        """Make the run folder (on the main process); returns the folders this made, deepest first."""
        if not self.accelerator.is_main_process:
            return []
        created = [p for p in (self.output_dir, *self.output_dir.parents) if not p.exists()]
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise DfkdError(
                f"cannot write to output_dir {str(self.output_dir)!r} ({exc.strerror}). "
                "Choose a writable folder with output_dir=PATH."
            ) from None
        return created

    def _discard_if_unused(self) -> None:
        """After a failure: remove the run folder this run made if it holds no checkpoint to resume from,
        and the parents made with it while they are empty. A failed run leaves nothing behind."""
        if not self._created or CheckpointManager(self.output_dir / "checkpoints").latest() is not None:
            return
        shutil.rmtree(self.output_dir, ignore_errors=True)
        for folder in self._created[1:]:
            try:
                folder.rmdir()
            except OSError:  # not empty: something else lives there now
                break

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
        networks = {"student": (self.unwrapped_student, image)}
        if self.teacher is not None:
            networks["teacher"] = (self.teacher, image)
        generator = getattr(self.source, "checkpoint_modules", dict)().get("generator")
        if generator is not None:
            networks["generator"] = (generator, (generator.nz,))
        return {name: multiply_adds(net, shape, self.device) for name, (net, shape) in networks.items()}

    @property
    def unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)

    def context(self, epoch: int) -> Context:
        return Context(
            teacher=self.teacher, student=self.student, epoch=epoch, step=self.state.step,
            epochs=self.cfg.train.epochs, steps_per_epoch=self.steps_per_epoch,
            metrics=self.state.history[-1] if self.state.history else {},
            log=lambda name, value: self.logger.scalars({name: value}, self.state.step),
            histogram=lambda name, values: self.logger.histogram(name, values, self.state.step),
        )

    # -- the loop

    def fit(self) -> dict[str, Any]:
        """Train to the end (resuming first if asked) and return the summary.

        Raises:
            RunLockedError: another process is training into the same output_dir.
        """
        try:
            with self._exclusive_output_dir():
                return self._fit()
        except BaseException:
            self._discard_if_unused()
            raise

    @contextmanager
    def _exclusive_output_dir(self) -> Iterator[None]:
        """Process 0 locks the run folder for the whole fit, and every process learns whether it could."""
        with ExitStack() as stack:
            refused: RunLockedError | None = None
            if self.accelerator.is_main_process:
                try:
                    stack.enter_context(run_lock(self.output_dir))
                except RunLockedError as exc:
                    refused = exc
            if self.accelerator.num_processes > 1:
                flag = torch.tensor([float(refused is not None)], device=self.device)
                if self.accelerator.reduce(flag, "sum").item() and refused is None:
                    refused = RunLockedError(f"process 0 could not lock {str(self.output_dir)!r}: another run holds it.")
            if refused is not None:
                raise refused
            yield

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._resume()
        if self.accelerator.is_main_process:
            save_config(cfg, self.output_dir / "config.yaml")
            costs = ", ".join(f"{name} {macs / 1e6:.3g} M" for name, macs in self.macs_per_image.items())
            print(f"{self.phase}: {cfg.output_dir}; multiply-adds per image: {costs}", flush=True)
        self.logger = RunLogger(
            self.output_dir, enabled=self.accelerator.is_main_process, total_steps=self.total_steps,
            initial_step=self.state.step, progress_bar=cfg.train.progress_bar, history=self.state.history,
            label=self.phase,
        )
        if cfg.train.nonfinite == "reload" and self.checkpoints.latest() is None:
            self._save_checkpoint()  # a fault before the first epoch ends goes back to the start
        try:
            while True:
                try:
                    self._train_epochs()
                    break
                except NonFiniteLossError as fault:
                    self._reload_after(fault)
            return self._finish()
        finally:
            self.logger.close()

    def _train_epochs(self) -> None:
        """The loop from the current state to the last epoch."""
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
            self._log_training(meter)  # before any checkpoint: a checkpoint never holds a non-finite run
            self._log_images()
            self._update_wall()
            last = self.state.epoch == cfg.train.epochs or self.state.budget_spent
            if self.state.epoch % cfg.train.eval_every == 0 or last:
                self._evaluate_and_record()
            if self.state.epoch % cfg.train.checkpoint_every == 0 or last:
                self._save_checkpoint()
            if self.state.budget_spent:
                break
        self._update_wall()

    def _update_wall(self) -> None:
        started, before = self._clock
        self.state.wall_s = before + time.perf_counter() - started

    def _budget_spent(self) -> bool:
        """Whether the training time, synthesis included and evaluation excluded, has reached
        ``train.time_budget_s``; once it has, the run evaluates, checkpoints and ends there."""
        budget = self.cfg.train.time_budget_s
        if budget is None:
            return False
        self._update_wall()
        self.state.budget_spent = self.state.wall_s - self.state.eval_s >= budget
        return self.state.budget_spent

    def _reload_after(self, fault: NonFiniteLossError) -> None:
        """The ``reload`` policy: back to the last good checkpoint with fresh randomness, or re-raise.

        The reloaded state would replay the same batches into the same fault, so the
        random streams are reseeded from the seed and the reload count.
        """
        cfg, reloads = self.cfg, self.state.reloads + 1
        last = self.checkpoints.latest()
        if cfg.train.nonfinite != "reload" or last is None:
            raise fault
        if reloads > cfg.train.max_reloads:
            raise NonFiniteLossError(
                f"{fault} This is fault {reloads}; train.max_reloads={cfg.train.max_reloads} reloads are spent."
            ) from None
        self._update_wall()
        wall_s = self.state.wall_s  # time spent is not undone
        self._load_checkpoint(last)
        self.state.reloads, self.state.wall_s = reloads, wall_s
        set_seed(cfg.seed + 1_000_003 * reloads, device_specific=True)
        self.logger.rewind(self.state.step, self.state.history)
        self.logger.scalars({"faults/reloads": float(reloads)}, self.state.step)
        if self.accelerator.is_main_process:
            print(
                f"dfkd: warning: {fault} Reloaded {last} (step {self.state.step}); "
                f"reload {reloads} of at most {cfg.train.max_reloads}.", file=sys.stderr, flush=True,
            )

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

        terms = {"loss": loss.detach(), **weighting_logs, **temperature_logs}
        for name, value in raw.items():
            terms[f"student/{name}"] = value.detach().mean()
            terms[f"student/{name}_weighted"] = self.loss.weights[name] * terms[f"student/{name}"]
        self._last_per_sample = {"loss": per_sample.detach()}
        if weights is not None:
            self._last_per_sample["weight"] = weights
        return terms

    # -- logging, evaluation, checkpoints

    def _log_training(self, meter: Meter) -> None:
        means = meter.pop_means(self._mean_over_processes)
        if not means:
            return
        bad = [name for name, value in means.items() if not np.isfinite(value)]
        if bad:
            last = self.checkpoints.latest()
            raise NonFiniteLossError(
                f"non-finite loss at or before step {self.state.step} in: {', '.join(bad)}. "
                f"The last good checkpoint is {str(last) if last else 'none (no checkpoint yet)'}; "
                "lower the learning rate or the offending term's weight, then resume with train.resume=auto "
                "(or let the run reload it by itself with train.nonfinite=reload)."
            )
        self._check_collapse(means.get("synth/spread"))
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

    def _check_collapse(self, spread: float | None) -> None:
        """Say so, once, when the synthetic images stop differing from each other.

        A generator that saturates (a tanh or sigmoid output pinned at its limits, which
        the DAFL generator's affine-free output BN then maps to zeros) makes one image
        for every noise vector and rarely recovers: the student then learns nothing for
        the rest of the run, while every loss looks calm.
        """
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
        return float(getattr(self.source, "synth_seconds", 0.0)), int(getattr(self.source, "synth_images", 0))

    def _log_images(self, n: int = 64) -> None:
        """An image grid of the source's samples, once per epoch, where the source can show them."""
        preview = getattr(self.source, "preview", None)
        if preview is None or not self.accelerator.is_main_process:
            return
        from torchvision.utils import make_grid, save_image

        images = preview(n).detach().float().cpu()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        grid = make_grid(images, nrow=8, padding=1)
        self.logger.images("synthetic", grid, self.state.step)
        save_image(grid, self.output_dir / "synthetic.png")  # the latest grid, also as a file to open

    def _evaluate_and_record(self) -> None:
        started = time.perf_counter()
        metrics = evaluate(
            self.student,
            self.eval_loader,
            self.normalize,
            self.accelerator,
            self.teacher,
            per_sample=self.teacher is not None,
            teacher_cache=self._teacher_eval_logits,
        )
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

    def _stateful(self) -> dict[str, Any]:
        """What every process holds the same of; the source's state is each process's own (its shard)."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "run": self.state}

    def _checkpoint_modules(self) -> dict[str, nn.Module]:
        extra = getattr(self.source, "checkpoint_modules", None)
        modules = {"student": self.unwrapped_student, **(extra() if extra is not None else {})}
        if self.temperature.module is not None:
            modules["temperature"] = self.accelerator.unwrap_model(self.temperature.module)
        return modules

    def _identity(self) -> dict[str, str | None]:
        """What a checkpoint can only be resumed by: the run's sample source and synthesizer."""
        synthesizer = self.cfg.synthesizer
        return {"source.name": self.cfg.source.name, "synthesizer.name": synthesizer.name if synthesizer else None}

    def _save_checkpoint(self) -> Path:
        self.state.synth_s = float(getattr(self.source, "synth_seconds", 0.0))
        state = {name: obj.state_dict() for name, obj in self._stateful().items()}
        state["identity"] = self._identity()
        return self.checkpoints.save(
            self.state.step, self._checkpoint_modules(), state, {"rng": _rng_state(), "source": self.source.state_dict()},
            rank=self.accelerator.process_index, is_main=self.accelerator.is_main_process,
            barrier=self.accelerator.wait_for_everyone,
        )

    def _resume(self) -> None:
        resume = self.cfg.train.resume
        if not resume:
            return
        folder = self.checkpoints.latest() if resume == "auto" else Path(resume)
        if folder is None:
            return  # nothing to resume from: a fresh start
        self._load_checkpoint(folder)
        if self.accelerator.is_main_process:
            print(f"resumed from {folder} at epoch {self.state.epoch}, step {self.state.step}", flush=True)

    def _load_checkpoint(self, folder: Path) -> None:
        models, state, local = CheckpointManager.load(folder, rank=self.accelerator.process_index)
        for key, value in state.get("identity", {}).items():
            if value != self._identity()[key]:
                raise CheckpointError(
                    f"checkpoint {str(folder)!r} was written by a run with {key}={value}, and this run has "
                    f"{key}={self._identity()[key]}: resume only a run's own checkpoints, or start afresh "
                    "without train.resume (or with another output_dir)."
                )
        for name, module in self._checkpoint_modules().items():
            if name not in models:
                raise CheckpointError(
                    f"checkpoint {str(folder)!r} has no {name!r} network: it was written by a run of another "
                    "method. Resume only a run's own checkpoints, or start afresh without train.resume."
                )
            check_fit(module, models[name], f"the {name} in checkpoint {str(folder)!r}")
            module.load_state_dict(models[name])
        for name, obj in self._stateful().items():
            obj.load_state_dict(state[name])
        self.source.load_state_dict(local["source"])
        _set_rng_state(local["rng"])

    def _finish(self) -> dict[str, Any]:
        cfg, history = self.cfg, self.state.history
        final = history[-1] if history else {}
        summary: dict[str, Any] = {f"final_{k}": v for k, v in final.items() if k not in ("epoch", "step", "lr", "elapsed_s", "eval_s")}
        for metric in ("agree1", "loyalty"):
            values = [h[metric] for h in history if metric in h]
            if values:
                summary[f"best_{metric}"] = max(values)
        summary.update(stability([h["acc1"] for h in history], [h["epoch"] for h in history], cfg.train.epochs, cfg.eval.stability_from))
        self.state.synth_s = float(getattr(self.source, "synth_seconds", 0.0))
        peaks = self.accelerator.gather(torch.tensor([_peak_memory_mb(self.device)], device=self.device)).tolist()
        summary.update(
            wall_s=self.state.wall_s, synth_s=self.state.synth_s, eval_s=self.state.eval_s,
            train_s=self.state.wall_s - self.state.eval_s, stopped_at_budget=self.state.budget_spent, peak_mem_mb=max(peaks), peak_mem_mb_per_process=peaks,
            steps=self.state.step, epochs=self.state.epoch, reloads=self.state.reloads, seed=cfg.seed,
            processes=self.accelerator.num_processes, git_commit=_git_commit(), machine=_machine(self.device),
            macs_per_image=self.macs_per_image,
        )
        if self.state.loyalty_hist is not None:
            summary["final_loyalty_hist"] = self.state.loyalty_hist
        if self.accelerator.is_main_process:
            save_model(self.unwrapped_student, self.output_dir / "student.safetensors", {
                "arch": cfg.student.arch, "num_classes": self.spec.num_classes, "in_channels": self.spec.in_channels,
                "image_size": self.spec.image_size, "dataset": self.spec.name,
                "mean": list(self.normalize.mean.flatten().tolist()), "std": list(self.normalize.std.flatten().tolist()),
            })
            for name, module in self._checkpoint_modules().items():
                if name != "student":
                    save_model(module, self.output_dir / f"{name}.safetensors", {"dataset": self.spec.name})
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        return summary
