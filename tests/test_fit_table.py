"""tools/fit_table.py: the README's TPU fit table from `dsbs compile` reports."""
import pathlib
import sys

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import fit_table  # noqa: E402  pylint: disable=wrong-import-position
from dsbs_jax import targets  # noqa: E402  pylint: disable=wrong-import-position

GIB = 2 ** 30


ROOFLINE = {"seconds": 0.0123, "bound": "interconnect", "best_mfu": 0.614}


def report(row, hbm_gib, fits, knobs=(), out_of_memory=""):
  return {"row": fit_table.label(row), "chips": 8, "knobs": list(knobs),
          "steps": [{"hbm_bytes": hbm_gib * GIB, "hbm_capacity_bytes": 16 * GIB, "fits": fits,
                     "compile_seconds": 42.4, "out_of_memory": out_of_memory,
                     "roofline": ROOFLINE}]}


def test_rows_say_what_fits_what_would_and_what_broke():
  row = ("t5_1_1_base", "v5e:2x4", "data", (8, 1))
  table = fit_table.markdown([
      report(row, 9.5, True),
      report(row, 22, False, [{"change": "NUM_MICROBATCHES=8", "fits": False},
                              {"change": "REMAT_POLICY='full'", "fits": True,
                               "roofline": {**ROOFLINE, "bound": "compute", "best_mfu": 1.0}},
                              {"change": "--topology=v5e:4x4", "fits": True,
                               "roofline": {**ROOFLINE, "seconds": 0.05}}],
             "refused"),
      report(row, 40, False, [{"change": "PARALLELISM='fsdp'", "fits": False}]),
      {"row": fit_table.label(row), "error": "the compiler crashed (SIGSEGV) after 600 s"}])
  lines = table.splitlines()
  assert lines[2] == ("| t5_1_1_base | v5e:2x4 | 8 | data (8, 1) | 9.5 (16) | yes | "
                      "12.3 (interconnect) | 61% | 42 |")
  # A row that does not fit gives the lowest roofline of the knobs that did, named.
  assert lines[3] == ("| t5_1_1_base | v5e:2x4 | 8 | data (8, 1) | > 22.0 (16) | no; fits with "
                      "`REMAT_POLICY='full'` or `--topology=v5e:4x4` | 12.3 (compute) with "
                      "`REMAT_POLICY='full'` | 100% | 42 |")
  assert "no; none of `PARALLELISM='fsdp'`" in lines[4] and lines[4].endswith("|  |  | 42 |")
  assert "the compiler crashed (SIGSEGV) after 600 s" in lines[5]


def test_every_row_names_a_shipped_model_and_a_known_generation():
  models = {path.stem for path in (TOOLS.parent / "gin" / "models").glob("*.gin")}
  for model, topology, parallelism, mesh in fit_table.ROWS:
    assert model in models and targets.parse_target(topology).platform in ("tpu", "gpu")
    assert parallelism in ("data", "tensor", "fsdp") and len(mesh) == 2
