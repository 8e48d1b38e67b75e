"""tools/bench.py: packed batches unpacked into the same examples, the JSON lines' schema and
the consistency of FLOP counts, MFU and ratios (no assertions on timings)."""
import json
import os
import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import bench  # noqa: E402  (tools/ is not a package)

from dsbs_jax import flops  # noqa: E402

LABEL, RATIONALE = 1, 2
TRAIN_FIGURES = {"examples_per_sec", "tokens_per_sec", "step_time_sec", "model_flops_per_step",
                 "executed_flops_per_step", "mfu", "mfu_executed"}


def packed_rows() -> dict[str, np.ndarray]:
  """Two packed rows: row 0 holds a label and a rationale example, row 1 one label example."""
  return {
      "encoder_input_tokens": np.array([[5, 6, 1, 7, 1, 0], [8, 9, 4, 1, 0, 0]]),
      "encoder_segment_ids": np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]),
      "decoder_target_tokens": np.array([[3, 1, 4, 4, 1], [3, 1, 0, 0, 0]]),
      "decoder_segment_ids": np.array([[1, 1, 2, 2, 2], [1, 1, 0, 0, 0]]),
      "decoder_task_ids": np.array([[LABEL, LABEL, RATIONALE, RATIONALE, RATIONALE],
                                    [LABEL, LABEL, 0, 0, 0]]),
  }


def test_unpack_gives_each_example_with_its_task():
  label_segments, rationale_segments = bench.unpack(packed_rows())
  assert [(i.tolist(), t.tolist()) for i, t in label_segments] == [
      ([5, 6, 1], [3, 1]), ([8, 9, 4, 1], [3, 1])]
  assert [(i.tolist(), t.tolist()) for i, t in rationale_segments] == [([7, 1], [4, 4, 1])]
  batch = bench.Batch(packed_rows(), label_segments, rationale_segments)
  assert batch.examples == 1.5 and batch.tokens == 5 + 6 + 5
  assert bench.segment_count(packed_rows()) == 3


def test_model_flops_count_each_example_at_its_own_lengths(tiny_config):
  segments = bench.unpack(packed_rows())[0]
  assert bench.model_flops(tiny_config, segments) == (
      flops.train_step_flops(tiny_config, 1, 3, 2) + flops.train_step_flops(tiny_config, 1, 4, 2))


def test_ratios_are_this_project_over_the_baseline():
  record = bench.comparison("train", {"config": "tiny"}, {
      "dsbs_jax": {"examples_per_sec": 6.0, "step_time_sec": 1.0, "mfu": 0.3},
      "paper_torch": {"examples_per_sec": 2.0, "step_time_sec": 3.0, "mfu": 0.1}})
  assert record["ratio"] == pytest.approx({"examples_per_sec": 3.0, "step_time_sec": 1 / 3,
                                           "mfu": 3.0})
  assert record["measurement"] == "train" and record["config"] == "tiny"


def check_records(records: list[dict], config: str, steps: int, variants: int) -> None:
  """The records of one run: peaks, data, then per config decoding, trainings, collator."""
  kinds = [record["measurement"] for record in records]
  assert kinds == ["matmul_peak", "data", "decode"] + ["train"] * variants + ["data"]
  peak_record = records[0]
  peaks = peak_record["flops_per_sec"]
  assert list(peaks) == ["float32"] and peak_record["mfu_reference"] == "max float32"
  assert set(peaks["float32"]) == {"numpy", "torch", "jax"} and min(peaks["float32"].values()) > 0
  peak = max(peaks["float32"].values())
  assert peak_record["mfu_peak"] == peak
  assert records[1]["dsbs_jax_input_pipeline"]["examples_per_sec"] > 0

  for train in records[3:3 + variants]:
    assert train["config"] == config and train["steps"] == steps
    for side in bench.SIDES:
      figures = train[side]
      assert TRAIN_FIGURES <= set(figures)
      assert figures["examples_per_sec"] * figures["step_time_sec"] == pytest.approx(
          train["examples_per_step"])
      assert figures["mfu"] == pytest.approx(
          figures["model_flops_per_step"] / figures["step_time_sec"] / peak)
      assert figures["mfu_executed"] == pytest.approx(
          figures["executed_flops_per_step"] / figures["step_time_sec"] / peak)
      # Padding and attention across packed examples only add to the executed count.
      assert figures["executed_flops_per_step"] >= figures["model_flops_per_step"] > 0
      assert figures["startup_sec"] > 0
    # The same examples on both sides: the same model FLOPs, and the model's own count.
    assert train["dsbs_jax"]["model_flops_per_step"] == train["paper_torch"]["model_flops_per_step"]
    assert train["dsbs_jax"]["segments_counted_by_model"] == 2 * train["examples_per_step"] * steps
    assert train["packed_rows_per_step"] % train["devices"] == 0

  for record in records[2:3 + variants]:
    assert record["ratio"] and all(
        value == pytest.approx(record["dsbs_jax"][key] / record["paper_torch"][key])
        for key, value in record["ratio"].items())
  assert 0.0 <= records[2]["same_greedy_ids"] <= 1.0
  assert records[-1]["paper_torch_collator"]["examples_per_sec"] > 0


@pytest.mark.slow
def test_quick_mode_writes_consistent_json_lines(tmp_path, capsys):
  out = tmp_path / "bench.jsonl"
  try:
    records = bench.main(["--quick", "--out", str(out), "--variants", ";scan_layers=True",
                          "--profile_steps", "1"])
  finally:
    gin.clear_config()  # the benchmark binds the paper's task prefixes
  assert [json.loads(line) for line in out.read_text().splitlines()] == records
  printed = capsys.readouterr().out
  assert "train examples/s" in printed and "layers scanned" in printed
  check_records(records, "tiny", steps=2, variants=2)
  assert records[2]["decode_length"] == 8
  assert [record["variant"] for record in records[3:5]] == [{}, {"scan_layers": True}]
  assert [record["dsbs_jax"]["scan_layers"] for record in records[3:5]] == [False, True]
  profile = records[3]["dsbs_jax"]["profile"]
  assert profile and all(op["ms_per_step"] > 0 for op in profile)
  assert sum(op["share"] for op in profile) <= 1.0 + 1e-6
  assert "profile" not in records[4]["dsbs_jax"]


@pytest.mark.slow
def test_saved_batches_replay_without_tensorflow(tmp_path):
  # The GPU machine has no TensorFlow: --write_batches packs batches where SeqIO runs,
  # --batches times them in a process that must never import it.
  batches = tmp_path / "cqa.npz"
  quick = ["--config", "tiny", "--batch_size", "8", "--steps", "1", "--warmup", "1"]
  try:
    assert bench.main(["--write_batches", str(batches), *quick]) == []
  finally:
    gin.clear_config()
  saved, setup = bench.load_batches(str(batches))
  assert len(saved) == 2 and setup["setup"]["mixture"] == bench.MIXTURE
  assert saved[0]["encoder_input_tokens"].shape[1] == 256
  out = tmp_path / "replay.jsonl"
  script = (f"import sys; sys.path.insert(0, {str(TOOLS)!r}); import bench; "
            f"bench.main(['--batches', {str(batches)!r}, '--out', {str(out)!r}, "
            "'--decode_length', '4', '--peak_size', '256', '--peak_repeats', '1', "
            "'--variants', ';dropout_rate=0.0,attention_implementation=cudnn', "
            f"*{quick!r}]); "
            "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules, "
            "'TensorFlow was imported'")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, GLIBC_TUNABLES=""))
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  # cuDNN's attention has no CPU kernel: that variant is recorded as failed, and the run
  # went on to write the rest.
  failed = records.pop(4)
  assert failed["measurement"] == "train" and "dsbs_jax" not in failed
  assert failed["variant"] == {"dropout_rate": 0.0, "attention_implementation": "cudnn"}
  assert failed["skipped"].startswith("failed: ")
  check_records(records, "tiny", steps=1, variants=1)
  assert records[0]["batches_from"]["mixture"] == bench.MIXTURE


def test_saved_batches_round_trip(tmp_path):
  steps = [{"encoder_input_tokens": np.arange(6).reshape(2, 3) + step,
            "decoder_task_ids": np.ones((2, 2), np.int32)} for step in range(3)]
  bench.write_batches(str(tmp_path / "b.npz"), steps, {"setup": {"seed": 4}})
  loaded, setup = bench.load_batches(str(tmp_path / "b.npz"))
  assert setup == {"setup": {"seed": 4}}
  for got, want in zip(loaded, steps, strict=True):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  np.savez(tmp_path / "other.npz", header=np.array("{}"))
  with pytest.raises(ValueError, match="not a batches file"):
    bench.load_batches(str(tmp_path / "other.npz"))


def test_variants_are_t5config_overrides():
  assert bench.parse_variants("") == [{}]
  assert bench.parse_variants(";scan_layers=True,remat_policy=full;dropout_rate=0.0") == [
      {}, {"scan_layers": True, "remat_policy": "full"}, {"dropout_rate": 0.0}]
  assert bench.parse_variants("scan_layers=None") == [{"scan_layers": None}]
  with pytest.raises(ValueError, match="'scan=True' is not T5CONFIG_FIELD=VALUE"):
    bench.parse_variants("scan=True")


def test_cpu_description_names_the_model_and_the_matmul_instruction_sets(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  processor = ("processor\t: {}\nmodel name\t: AMD EPYC 9B14\n"
               "flags\t\t: fpu sse avx avx2 avx512f avx512_bf16 avx512vl\n\n")
  cpuinfo.write_text(processor.format(0) + processor.format(1))
  description = bench.cpu_description(str(cpuinfo))
  assert description.startswith("AMD EPYC 9B14 x")
  assert description.endswith("(avx2, avx512f, avx512_bf16)")
  assert "(" not in bench.cpu_description(str(tmp_path / "missing"))


def test_bfloat16_runs_also_measure_bfloat16_matmul_peaks():
  peaks = bench.matmul_peaks("bfloat16", size=64, repeats=1)
  assert set(peaks) == {"float32", "bfloat16"}
  assert set(peaks["bfloat16"]) == {"torch", "jax"} and min(peaks["bfloat16"].values()) > 0
  reference, name = bench.mfu_reference("bfloat16", peaks)
  assert reference == max(peaks["bfloat16"].values()) and name == "max bfloat16"
