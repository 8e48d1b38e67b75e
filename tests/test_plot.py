"""dsbs_jax.plots (`dsbs plot`): the data-efficiency and learning-curve PNGs from fake runs."""
import json
import pathlib

import pytest

from dsbs_jax import plots as plot
from dsbs_jax import run_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: pathlib.Path, mixture: str, train_fraction: float, accuracy: float,
              finished: bool = True) -> None:
  run_dir.mkdir(parents=True)
  (run_dir / "run.json").write_text(json.dumps({
      "mixture_or_task_name": mixture, "input_length": 128, "target_length": 64,
      "label_prefix": "[label] ", "rationale_prefix": "[rationale] "}))
  lines = []
  for step in (50, 100, 150):
    lines.append({"step": step, "kind": "train", "loss": 6.0 / step, "label_loss": 5.0 / step,
                  "rationale_loss": 7.0 / step, "accuracy": 0.3})
  lines.append({"step": 150, "kind": "validation", "accuracy": accuracy})
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  if finished:
    (run_dir / "results.json").write_text(json.dumps({
        "best_step": 150, "mixture_or_task_name": mixture, "train_fraction": train_fraction,
        "alpha": 0.5, "validation": {"accuracy": accuracy}, "test": {"accuracy": accuracy},
        "majority_baseline_test": {"accuracy": 0.2}}))


def test_method_of_reads_the_mixture_name():
  assert plot.method_of("cqa_dsbs_teacher") == ("cqa", "Distilling step-by-step (teacher labels)")
  assert plot.method_of("my_data_finetune") == ("my_data", "Standard finetuning (gold labels)")
  assert plot.method_of("cqa_label_teacher")[1] == "Standard distillation (teacher labels)"
  assert plot.method_of("something_else") is None


def test_plots_written_for_every_dataset_and_run(tmp_path):
  runs = tmp_path / "runs"
  for i, (mixture, fraction, accuracy) in enumerate([
      ("cqa_finetune", 0.25, 0.30), ("cqa_finetune", 1.0, 0.40),
      ("cqa_dsbs_teacher", 0.25, 0.35), ("cqa_dsbs_teacher", 0.25, 0.37),
      ("cqa_dsbs_teacher", 1.0, 0.45), ("svamp_distill", 0.5, 0.1)]):
    write_run(runs / f"run{i}", mixture, fraction, accuracy)
  write_run(runs / "unfinished", "cqa_dsbs_gold", 0.5, 0.3, finished=False)

  points = plot.accuracy_points(run_dir.find_runs(runs))
  assert points["cqa"]["Distilling step-by-step (teacher labels)"][0.25] == [0.35, 0.37]
  assert "Distilling step-by-step (gold labels)" not in points["cqa"]  # no results.json yet

  written = plot.plot_runs(runs, tmp_path / "figures")
  names = sorted(path.name for path in written)
  assert names == sorted(["data_efficiency_cqa.png", "data_efficiency_svamp.png"]
                         + [f"learning_curves_run{i}.png" for i in range(6)]
                         + ["learning_curves_unfinished.png"])
  for path in written:
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_empty_runs_dir_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no run folders"):
    plot.plot_runs(tmp_path, tmp_path / "figures")
