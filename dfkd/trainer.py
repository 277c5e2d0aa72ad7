"""A run's lifecycle: its folder, lock, resume, checkpoints and summary, around the one loop.

:class:`Trainer` is what ``dfkd train`` and ``dfkd bench`` run. It claims the
run folder, resumes from the latest checkpoint when asked, drives
:class:`dfkd.engine.Loop` epoch by epoch, checkpoints when due, survives a
non-finite loss by reloading (``train.nonfinite=reload``), and ends by writing
the trained networks and ``summary.json``. It trains nothing else: a missing
teacher is the teacher phase's business (:mod:`dfkd.teacher`), run before.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig

from dfkd.build import make_accelerator
from dfkd.checkpoint import CheckpointManager
from dfkd.config import save_config
from dfkd.engine import Loop
from dfkd.errors import CheckpointError, ConfigError, DfkdError, NonFiniteLossError, RunLockedError
from dfkd.lock import run_lock
from dfkd.metrics import stability
from dfkd.synthesis import check_generator_fits
from dfkd.tracking import RunLogger
from dfkd.weights import check_fit, save_model

__all__ = ["Trainer", "describe"]


def describe(cfg: DictConfig) -> str:
    """What a run does, in two or three words: its progress bar's label."""
    if cfg.teacher is None:
        return "train"
    return "distil without data" if cfg.synthesizer is not None else "distil"


class Trainer:
    """Builds a run from its config; :meth:`fit` trains it to the end and returns the summary.

    Args:
        cfg: a validated config from :func:`dfkd.recipe.load_config`.
        accelerator: reuse an accelerator (tests); by default one is made from the config.
        phase: what the run is, for its progress bar and log (by default :func:`describe`).

    Raises:
        ConfigError: the teacher's checkpoint is missing (run the teacher phase first:
            :func:`dfkd.teacher.train_missing_teacher`), or a part does not fit the data.
    """

    def __init__(self, cfg: DictConfig, accelerator: Accelerator | None = None, *, phase: str | None = None) -> None:
        self.cfg = cfg
        self.phase = phase or describe(cfg)
        check_generator_fits(cfg)
        _require_teacher(cfg)
        self.accelerator = accelerator or make_accelerator(cfg)
        self.output_dir = Path(cfg.output_dir)
        self._created = self._prepare_output_dir()
        try:
            self.loop = Loop(cfg, self.accelerator)
        except BaseException:
            self._discard_if_unused()
            raise
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep=cfg.train.keep_checkpoints)

    # -- the run folder

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
                flag = torch.tensor([float(refused is not None)], device=self.accelerator.device)
                if self.accelerator.reduce(flag, "sum").item() and refused is None:
                    refused = RunLockedError(f"process 0 could not lock {str(self.output_dir)!r}: another run holds it.")
            if refused is not None:
                raise refused
            yield

    # -- the run

    def fit(self) -> dict[str, Any]:
        """Train to the end (resuming first if asked) and return the summary.

        Raises:
            RunLockedError: another process is training into the same output_dir.
            NonFiniteLossError: a loss went NaN or infinite, and the recipe does not reload (or may not again).
        """
        try:
            with self._exclusive_output_dir():
                return self._fit()
        except BaseException:
            self._discard_if_unused()
            raise

    def _fit(self) -> dict[str, Any]:
        cfg, loop = self.cfg, self.loop
        self._resume()
        if self.accelerator.is_main_process:
            save_config(cfg, self.output_dir / "config.yaml")
            costs = ", ".join(f"{name} {macs / 1e6:.3g} M" for name, macs in loop.macs_per_image.items())
            print(f"{self.phase}: {cfg.output_dir}; multiply-adds per image: {costs}", flush=True)
        loop.logger = RunLogger(
            self.output_dir, enabled=self.accelerator.is_main_process, total_steps=loop.total_steps,
            initial_step=loop.state.step, progress_bar=cfg.train.progress_bar, history=loop.state.history,
            label=self.phase,
        )
        if cfg.train.nonfinite == "reload" and self.checkpoints.latest() is None:
            self._save_checkpoint()  # a fault before the first epoch ends goes back to the start
        try:
            while True:
                try:
                    for last in loop.epochs():
                        if loop.state.epoch % cfg.train.checkpoint_every == 0 or last:
                            self._save_checkpoint()
                    break
                except NonFiniteLossError as fault:
                    self._reload_after(fault)
            return self._finish()
        finally:
            loop.logger.close()

    def _reload_after(self, fault: NonFiniteLossError) -> None:
        """The ``reload`` policy: back to the last good checkpoint with fresh randomness, or stop.

        The reloaded state would replay the same batches into the same fault, so the
        random streams are reseeded from the seed and the reload count.
        """
        cfg, loop, reloads = self.cfg, self.loop, self.loop.state.reloads + 1
        last = self.checkpoints.latest()
        fault = NonFiniteLossError(
            f"{fault} The last good checkpoint is {str(last) if last else 'none (no checkpoint yet)'}; lower the "
            "learning rate or the offending term's weight, then resume with train.resume=auto (or let the run "
            "reload it by itself with train.nonfinite=reload)."
        )
        if cfg.train.nonfinite != "reload" or last is None:
            raise fault
        if reloads > cfg.train.max_reloads:
            raise NonFiniteLossError(
                f"{fault} This is fault {reloads}; train.max_reloads={cfg.train.max_reloads} reloads are spent."
            )
        loop.update_wall()
        wall_s = loop.state.wall_s  # time spent is not undone
        self._load_checkpoint(last)
        loop.state.reloads, loop.state.wall_s = reloads, wall_s
        set_seed(cfg.seed + 1_000_003 * reloads, device_specific=True)
        loop.logger.rewind(loop.state.step, loop.state.history)
        loop.logger.scalars({"faults/reloads": float(reloads)}, loop.state.step)
        if self.accelerator.is_main_process:
            print(
                f"dfkd: warning: {fault} Reloaded {last} (step {loop.state.step}); "
                f"reload {reloads} of at most {cfg.train.max_reloads}.", file=sys.stderr, flush=True,
            )

    # -- checkpoints

    def _save_checkpoint(self) -> Path:
        loop = self.loop
        loop.state.synth_s = loop.synth_seconds()
        state = {name: obj.state_dict() for name, obj in loop.stateful().items()}
        state["identity"] = loop.identity()
        return self.checkpoints.save(
            loop.state.step, loop.modules(), state, {"rng": _rng_state(), "source": loop.source.state_dict()},
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
            state = self.loop.state
            print(f"resumed from {folder} at epoch {state.epoch}, step {state.step}", flush=True)

    def _load_checkpoint(self, folder: Path) -> None:
        loop = self.loop
        models, state, local = CheckpointManager.load(folder, rank=self.accelerator.process_index)
        written_by = state.get("identity", {})
        for key, value in loop.identity().items():
            if written_by.get(key) != value:  # a key the checkpoint predates was unset there
                raise CheckpointError(
                    f"checkpoint {str(folder)!r} was written by a run with {key}={written_by.get(key)}, and this run "
                    f"has {key}={value}: resume only a run's own checkpoints, or start afresh "
                    "without train.resume (or with another output_dir)."
                )
        for name, module in loop.modules().items():
            if name not in models:
                raise CheckpointError(
                    f"checkpoint {str(folder)!r} has no {name!r} network: it was written by a run of another "
                    "method. Resume only a run's own checkpoints, or start afresh without train.resume."
                )
            check_fit(module, models[name], f"the {name} in checkpoint {str(folder)!r}")
            module.load_state_dict(models[name])
        for name, obj in loop.stateful().items():
            obj.load_state_dict(state[name])
        loop.source.load_state_dict(local["source"])
        _set_rng_state(local["rng"])

    # -- the end

    def _finish(self) -> dict[str, Any]:
        cfg, loop = self.cfg, self.loop
        run, device = loop.state, self.accelerator.device
        final = run.history[-1] if run.history else {}
        summary: dict[str, Any] = {f"final_{k}": v for k, v in final.items() if k not in ("epoch", "step", "lr", "elapsed_s", "eval_s")}
        for metric in ("agree1", "loyalty"):
            values = [h[metric] for h in run.history if metric in h]
            if values:
                summary[f"best_{metric}"] = max(values)
        summary.update(stability([h["acc1"] for h in run.history], [h["epoch"] for h in run.history], cfg.train.epochs, cfg.eval.stability_from))
        run.synth_s = loop.synth_seconds()
        peaks = self.accelerator.gather(torch.tensor([_peak_memory_mb(device)], device=device)).tolist()
        summary.update(
            wall_s=run.wall_s, synth_s=run.synth_s, eval_s=run.eval_s, train_s=run.wall_s - run.eval_s,
            stopped_at_budget=run.budget_spent, peak_mem_mb=max(peaks), peak_mem_mb_per_process=peaks,
            steps=run.step, epochs=run.epoch, reloads=run.reloads, seed=cfg.seed,
            processes=self.accelerator.num_processes, git_commit=_git_commit(), machine=_machine(device),
            macs_per_image=loop.macs_per_image,
        )
        if run.loyalty_hist is not None:
            summary["final_loyalty_hist"] = run.loyalty_hist
        if self.accelerator.is_main_process:
            spec, normalize = loop.spec, loop.normalize
            student_metadata = {
                "arch": cfg.student.arch, "num_classes": spec.num_classes, "in_channels": spec.in_channels,
                "image_size": spec.image_size, "dataset": spec.name,
                "mean": list(normalize.mean.flatten().tolist()), "std": list(normalize.std.flatten().tolist()),
            }
            save_model(loop.evaluated_student, self.output_dir / "student.safetensors", student_metadata)
            if loop.ema is not None:  # the trained weights themselves, beside their average
                save_model(loop.unwrapped_student, self.output_dir / "student_online.safetensors", student_metadata)
            for name, module in loop.modules().items():
                if name != "student":
                    save_model(module, self.output_dir / f"{name}.safetensors", {"dataset": spec.name})
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        return summary


def _require_teacher(cfg: DictConfig) -> None:
    """A missing teacher checkpoint that a teacher recipe would make: say how to make it."""
    teacher = cfg.teacher
    if teacher is None or not teacher.checkpoint or not teacher.recipe or Path(teacher.checkpoint).is_file():
        return
    raise ConfigError(
        f"teacher.checkpoint {teacher.checkpoint!r} does not exist yet; teacher.recipe {teacher.recipe!r} makes it. "
        "`dfkd train` and `dfkd bench` run that teacher phase first; from Python, call "
        "dfkd.teacher.train_missing_teacher(cfg) before building the Trainer."
    )


# --------------------------------------------------------------------------- what a checkpoint and a summary record


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
