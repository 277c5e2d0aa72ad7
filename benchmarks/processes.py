"""Time and memory of one recipe under several launch settings, run back to back on this machine.

Each setting is a full ``dfkd train`` run through ``accelerate launch`` (with
``recipes/accelerate/cpu.yaml`` for more than one process on a CPU), in its own
output folder. The table reports, per setting:

- the training throughput, the median of the logged ``train/samples_per_s``
  (global images per second over each log interval; evaluation excluded);
- the run's wall time and its synthesis time (summed over the run, rank 0);
- the peak resident memory of every process, and their sum;

and the ratio of each throughput to the first setting's. Settings run one after
the other, so machine noise is shared only as far as it is steady; repeat the
command to see the spread.

    python benchmarks/processes.py RECIPE --settings 1:no 2:no 1:bf16 [-- key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(recipe: str, processes: int, precision: str, overrides: list[str], out: Path) -> dict:
    """One launch; returns its summary plus the median logged training throughput."""
    launcher = Path(sys.executable).with_name("accelerate")
    topology = ["--config_file", "recipes/accelerate/cpu.yaml"] if processes > 1 else ["--num_processes", "1"]
    cmd = [
        str(launcher), "launch", *topology, "--num_processes", str(processes), "--main_process_port", str(_free_port()),
        "-m", "dfkd", "train", recipe, *overrides, f"train.mixed_precision={precision}", "train.progress_bar=false",
        f"output_dir={out}",
    ]
    # One process gets every core; several share them equally (torchrun's default is one thread each).
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    rates = [e.value for e in events.Scalars("train/samples_per_s")]
    summary["samples_per_s"] = statistics.median(rates[1:] or rates)  # the first interval includes start-up
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--settings", nargs="+", default=["1:no", "2:no", "1:bf16"], help="PROCESSES:PRECISION")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]  # key=value overrides for every setting
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(args.settings):
            processes, precision = setting.split(":")
            summary = run(args.recipe, int(processes), precision, args.overrides, Path(tmp) / str(i))
            rows.append((setting, summary))
            print(f"{setting}: done, {summary['samples_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    base = rows[0][1]["samples_per_s"]
    print("| processes:precision | images/s (train) | vs first | wall s | synth s | steps | peak RSS per process MB | sum MB |")
    print("|---|---|---|---|---|---|---|---|")
    for setting, s in rows:
        peaks = s["peak_mem_mb_per_process"]
        print(
            f"| {setting} | {s['samples_per_s']:.1f} | {s['samples_per_s'] / base:.2f} | {s['wall_s']:.1f} | "
            f"{s['synth_s']:.1f} | {s['steps']} | {', '.join(f'{p:.0f}' for p in peaks)} | {sum(peaks):.0f} |"
        )


if __name__ == "__main__":
    main()
