"""tools/bench.py: packed batches unpacked into the same examples, the JSON lines' schema and
the consistency of FLOP counts, MFU and ratios (no assertions on timings)."""
import json
import pathlib
import sys

import gin
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
bench = pytest.importorskip("bench")

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


@pytest.mark.slow
def test_quick_mode_writes_consistent_json_lines(tmp_path, capsys):
  out = tmp_path / "bench.jsonl"
  try:
    records = bench.main(["--quick", "--out", str(out)])
  finally:
    gin.clear_config()  # the benchmark binds the paper's task prefixes
  assert [json.loads(line) for line in out.read_text().splitlines()] == records
  assert "train examples/s" in capsys.readouterr().out
  by_name = {record["measurement"]: record for record in records}
  assert set(by_name) == {"matmul_peak", "train", "decode", "data"}

  peaks = by_name["matmul_peak"]["flops_per_sec"]
  assert list(peaks) == ["float32"] and by_name["matmul_peak"]["mfu_reference"] == "max float32"
  assert set(peaks["float32"]) == {"numpy", "torch", "jax"} and min(peaks["float32"].values()) > 0
  peak = max(peaks["float32"].values())

  train = by_name["train"]
  assert train["config"] == "tiny" and train["steps"] == 2
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
  # The same examples on both sides: the same model FLOPs, and the model's own count.
  assert train["dsbs_jax"]["model_flops_per_step"] == train["paper_torch"]["model_flops_per_step"]
  assert train["dsbs_jax"]["segments_counted_by_model"] == 2 * train["examples_per_step"] * 2
  assert train["packed_rows_per_step"] % train["devices"] == 0

  for name in ("train", "decode"):
    record = by_name[name]
    assert record["ratio"] and all(
        value == pytest.approx(record["dsbs_jax"][key] / record["paper_torch"][key])
        for key, value in record["ratio"].items())
  decode = by_name["decode"]
  assert 0.0 <= decode["same_greedy_ids"] <= 1.0 and decode["decode_length"] == 8
  data_record = by_name["data"]
  assert data_record["dsbs_jax_input_pipeline"]["examples_per_sec"] > 0
  assert data_record["paper_torch_collator"]["examples_per_sec"] > 0


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
