"""The paper's figures from a folder of training runs, as PNG files (`dsbs plot`):

    dsbs plot RUNS_DIR --out DIR

- data_efficiency_<dataset>.png: test accuracy against the fraction of training data used,
  one line per method (standard finetuning, standard distillation, distilling step-by-step
  on gold or on teacher labels), the mean over runs with the same fraction (seeds) and each
  run as a dot, as the paper's Figures 4 and 5;
- learning_curves_<run>.png: per run, the label-task and rationale-task training losses
  apart (and the total), with validation accuracy beside them.

A run is any folder under RUNS_DIR that `dsbs train` has logged to (run_dir.find_runs);
once finished, its results place it (mixture_or_task_name, train_fraction). `dsbs train`
also draws its own run's learning curves into MODEL_DIR (plot_learning_curves). This module
reads runs through run_dir.RunDir only: it must not train, evaluate or change runs.
"""
import collections
import io
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from dsbs_jax import run_dir  # noqa: E402
from dsbs_jax import storage  # noqa: E402

# Mixture (or single task) name suffix -> (method, plot style). Longest suffixes first.
METHODS = {
    "_dsbs_teacher": "Distilling step-by-step (teacher labels)",
    "_dsbs_gold": "Distilling step-by-step (gold labels)",
    "_distill": "Standard distillation (teacher labels)",
    "_label_teacher": "Standard distillation (teacher labels)",
    "_finetune": "Standard finetuning (gold labels)",
    "_label_gold": "Standard finetuning (gold labels)",
}
STYLES = {
    "Standard finetuning (gold labels)": {"color": "tab:gray", "marker": "s"},
    "Standard distillation (teacher labels)": {"color": "tab:orange", "marker": "^"},
    "Distilling step-by-step (gold labels)": {"color": "tab:blue", "marker": "o"},
    "Distilling step-by-step (teacher labels)": {"color": "tab:green", "marker": "D"},
}


USER_ERRORS = (run_dir.ModelDirError,)


def method_of(mixture_or_task_name: str) -> Optional[tuple[str, str]]:
  """(dataset, method) of a mixture or task name, None for names of no known method."""
  for suffix, method in METHODS.items():
    if mixture_or_task_name.endswith(suffix):
      return mixture_or_task_name[:-len(suffix)], method
  return None


def run_name(run: run_dir.RunDir, runs_dir: storage.Path) -> str:
  relative = run.path.relative_to(runs_dir)
  return "_".join(relative.parts) if relative.parts else run.path.name


def accuracy_points(runs: list[run_dir.RunDir]) -> dict:
  """{dataset: {method: {train_fraction: [test accuracy per run]}}} of finished runs."""
  points = collections.defaultdict(lambda: collections.defaultdict(
      lambda: collections.defaultdict(list)))
  for run in runs:
    results = run.results() or {}
    accuracy = results.get("test", {}).get("accuracy")
    name, fraction = results.get("mixture_or_task_name"), results.get("train_fraction")
    placed = method_of(name) if name else None
    if accuracy is None or fraction is None or placed is None:
      continue
    dataset, method = placed
    points[dataset][method][float(fraction)].append(float(accuracy))
  return points


def plot_data_efficiency(dataset: str, by_method: dict, path: storage.Path) -> None:
  figure, axes = plt.subplots(figsize=(6, 4.2))
  fractions = set()
  for method in STYLES:
    if method not in by_method:
      continue
    by_fraction = by_method[method]
    xs = sorted(by_fraction)
    fractions.update(xs)
    means = [100 * sum(by_fraction[x]) / len(by_fraction[x]) for x in xs]
    axes.plot([100 * x for x in xs], means, label=method, linewidth=2, **STYLES[method])
    for x in xs:
      axes.scatter([100 * x] * len(by_fraction[x]), [100 * a for a in by_fraction[x]],
                   color=STYLES[method]["color"], alpha=0.35, s=14)
  axes.set_xscale("log", base=2)
  ticks = sorted(100 * x for x in fractions)
  axes.set_xticks(ticks, [f"{t:g}%" for t in ticks])
  axes.minorticks_off()
  axes.set_xlabel("training data used")
  axes.set_ylabel("test accuracy (%)")
  axes.set_title(f"{dataset}: accuracy against training-data size")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8, loc="lower right")
  figure.tight_layout()
  _save(figure, path)


def _save(figure, path) -> None:
  """Writes `figure` as a PNG to `path` (a local path or a URL) and closes it."""
  png = io.BytesIO()
  figure.savefig(png, format="png", dpi=120)
  plt.close(figure)
  storage.write_atomically(path, png.getvalue())


def plot_learning_curves(name: str, metrics: list[dict], path: storage.Path) -> bool:
  """Writes the run's curves; False when it has no training metrics yet."""
  train = [m for m in metrics if m.get("kind") == "train"]
  validation = [m for m in metrics if m.get("kind") == "validation" and "accuracy" in m]
  if not train:
    return False
  figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
  for key, label, style in (("label_loss", "label task", "-"),
                            ("rationale_loss", "rationale task", "-"),
                            ("loss", "total (weighted)", ":")):
    curve = [(m["step"], m[key]) for m in train if key in m]
    if curve:
      loss_axes.plot(*zip(*curve), style, label=label, linewidth=2 if style == "-" else 1.5)
  loss_axes.set_xlabel("step")
  loss_axes.set_ylabel("training loss")
  loss_axes.set_title("training losses per task")
  loss_axes.grid(alpha=0.3)
  loss_axes.legend()
  if validation:
    accuracies = [100 * m["accuracy"] for m in validation]
    accuracy_axes.plot([m["step"] for m in validation], accuracies, "o-", color="tab:green")
    accuracy_axes.set_ylim(0, max(5.0, 1.1 * max(accuracies)))
  else:
    accuracy_axes.text(0.5, 0.5, "no validation yet", ha="center", va="center",
                       transform=accuracy_axes.transAxes)
  accuracy_axes.set_xlabel("step")
  accuracy_axes.set_ylabel("validation accuracy (%)")
  accuracy_axes.set_title("label task, validation")
  accuracy_axes.grid(alpha=0.3)
  figure.suptitle(name)
  figure.tight_layout()
  _save(figure, path)
  return True


def plot_runs(runs_dir, out_dir) -> list[storage.Path]:
  """Writes every figure the runs allow; returns the PNG paths."""
  runs_dir, out_dir = storage.path(runs_dir), storage.path(out_dir)
  runs = run_dir.find_runs(runs_dir)
  if not runs:
    raise FileNotFoundError(f"{runs_dir}: no run folders (with "
                            f"{' or '.join(run_dir.RUN_MARKERS)})")
  if out_dir.exists() and not out_dir.is_dir():
    raise run_dir.ModelDirError(f"--out {out_dir}: exists and is not a folder")
  # Everything is read, and so checked, before anything is written.
  points = accuracy_points(runs)
  curves = {run_name(run, runs_dir): run.metrics() for run in runs}
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for dataset, by_method in sorted(points.items()):
    path = out_dir / f"data_efficiency_{dataset}.png"
    plot_data_efficiency(dataset, by_method, path)
    written.append(path)
  for name, rows in curves.items():
    path = out_dir / f"learning_curves_{name}.png"
    if plot_learning_curves(name, rows, path):
      written.append(path)
  return written


def run(args) -> int:
  storage.check(read=[args.runs_dir], write=[args.out])
  for path in plot_runs(args.runs_dir, args.out):
    print(path)
  return 0
