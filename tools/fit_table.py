"""The README's fit table: `dsbs compile` of the paper's recipe (runs/paper.gin: 64 inputs a
step with both tasks, sized at per-input batching's worst case of 128 rows of 1024 / 256
tokens; AdamW, bfloat16) for each model size on TPU slices (v4, v5e, v5p, two v5p slices)
and NVIDIA GPUs with a few meshes, one process per row (a compiler crash ends only its
row), printed as a Markdown table and written as JSON lines. Each row says what bounds its
step (the roofline of `dsbs compile`: compute, HBM or interconnect at data-sheet peaks) and
so the best MFU it allows; for a row that does not fit, those of the first knob that did.

  python tools/fit_table.py --out fit_table.jsonl              # every row (hours of CPU)
  python tools/fit_table.py --rows 'base|large' --out f.jsonl  # rows whose label matches

Each row compiles the train step (the largest); a row that does not fit is compiled again
with one knob changed at a time (`dsbs compile`'s search) and says which fit. A row that does
not fit is a finding, not a failure; a row whose compiler crashed or ran past
--timeout_minutes says so.
"""
import argparse
import json
import re
import time

from dsbs_jax import compile_report

# (model gin file, topology, parallelism, mesh (data, model)).
ROWS = (
    ("t5_1_1_small", "v5e:2x2", "data", (4, 1)),
    ("t5_1_1_base", "v5e:2x4", "data", (8, 1)),
    ("t5_1_1_base", "v5e:2x4", "tensor", (4, 2)),
    ("t5_1_1_large", "v5e:2x4", "fsdp", (8, 1)),
    ("t5_1_1_large", "v5p:2x2x2", "data", (8, 1)),
    ("t5_1_1_xl", "v5p:2x2x2", "fsdp", (8, 1)),
    ("t5_1_1_xl", "v4:2x2x4", "fsdp", (8, 2)),
    ("t5_1_1_xxl", "v5p:2x2x2", "fsdp", (8, 1)),
    ("t5_1_1_xxl", "v5p:4x4x4", "fsdp", (16, 4)),
    ("t5_1_1_xxl", "v5p:4x8x8", "fsdp", (64, 4)),
    ("t5_11B", "v5p:4x4x4", "fsdp", (16, 4)),
    ("t5_1_1_large", "v4:2x2x2", "fsdp", (8, 1)),
    ("t5_1_1_xxl", "2xv5p:4x4x4", "fsdp", (32, 4)),
    ("t5_1_1_base", "h100:8", "data", (8, 1)),
    ("t5_1_1_large", "h100:8", "fsdp", (8, 1)),
    ("t5_1_1_xl", "h200:8", "fsdp", (8, 1)),
    ("t5_1_1_xxl", "h100:2x8", "fsdp", (16, 1)),
)


def label(row) -> str:
  model, topology, parallelism, mesh = row
  return f"{model} {topology} {parallelism} {mesh}"


def compile_row(row, timeout_seconds: float, extra_flags) -> dict:
  """One `dsbs compile` process for `row`; its JSON report, or what stopped it."""
  model, topology, parallelism, mesh = row
  start = time.time()
  report, error = compile_report.compile_in_a_process(
      topology, [f"--gin_file=models/{model}.gin", "--gin_file=runs/paper.gin",
                 f"--gin.PARALLELISM='{parallelism}'", f"--gin.MESH_SHAPE={tuple(mesh)}",
                 "--steps", "train", *extra_flags], timeout_seconds)
  seconds = time.time() - start
  if report is None:
    if error.startswith("the compiler crashed"):
      error += f" after {seconds:.0f} s"
    return {"row": label(row), "seconds": seconds, "error": error}
  return {"row": label(row), "seconds": seconds, **report}


def knobs_that_fit(result) -> str:
  """'; fits with A or B' from the knobs `dsbs compile` tried, or what none of them did."""
  knobs = result.get("knobs", [])
  fitting = [knob["change"] for knob in knobs if knob.get("fits")]
  if fitting:
    return "; fits with " + " or ".join(f"`{change}`" for change in fitting)
  return "; none of " + ", ".join(f"`{knob['change']}`" for knob in knobs) if knobs else ""


def roofline_cells(result) -> str:
  """'step >= ms (bound) | MFU <= %' of the row as compiled, or of the knob that fit with
  the lowest bound (named), or blanks."""
  train, = result["steps"]
  roofline, knob = train.get("roofline") if train["fits"] else None, ""
  if roofline is None:
    fitting = [k for k in result.get("knobs", []) if k.get("fits") and k.get("roofline")]
    if fitting:
      best = min(fitting, key=lambda k: k["roofline"]["seconds"])
      roofline, knob = best["roofline"], f" with `{best['change']}`"
  if not roofline:
    return " | "
  return (f"{roofline['seconds'] * 1e3:.3g} ({roofline['bound']}){knob} | "
          f"{roofline['best_mfu']:.0%}")


def markdown(results) -> str:
  lines = ["| model | target | chips | mesh | GiB per chip (of HBM) | fits | step >= ms "
           "(bound) | MFU <= | compile s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for result in results:
    model, topology, parallelism, mesh = result["row"].split(" ", 3)
    mesh_text = f"{parallelism} {mesh}"
    if "error" in result:
      lines.append(f"| {model} | {topology} | | {mesh_text} | | {result['error']} | | | |")
      continue
    train, = result["steps"]
    needed = f"{train['hbm_bytes'] / 2**30:.1f}"
    if train["out_of_memory"]:  # the compiler stopped at the temporaries
      needed = f"> {needed}"
    fits = "yes" if train["fits"] else "no" + knobs_that_fit(result)
    lines.append(
        f"| {model} | {topology} | {result['chips']} | {mesh_text} | "
        f"{needed} ({train['hbm_capacity_bytes'] / 2**30:.0f}) | {fits} | "
        f"{roofline_cells(result)} | {train['compile_seconds']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> list:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default="", help="only rows whose label matches this regex")
  parser.add_argument("--render", metavar="FILE.jsonl",
                      help="print the table of reports written before (--out), compiling nothing")
  parser.add_argument("--out", help="append each row's report here as a JSON line")
  parser.add_argument("--timeout_minutes", type=float, default=60)
  parser.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE",
                      help="extra --gin.NAME=VALUE for every row (e.g. REMAT_POLICY=\"'full'\")")
  args = parser.parse_args(argv)
  if args.render:
    with open(args.render, encoding="utf-8") as f:
      results = [json.loads(line) for line in f if line.strip()]
    print(markdown([r for r in results if re.search(args.rows, r["row"])]))
    return results
  rows = [row for row in ROWS if re.search(args.rows, label(row))]
  results = []
  for row in rows:
    print(f"compiling {label(row)} ...", flush=True)
    result = compile_row(row, args.timeout_minutes * 60, [f"--gin.{g}" for g in args.gin])
    results.append(result)
    print(markdown([result]).splitlines()[-1], flush=True)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
  print(markdown(results))
  return results


if __name__ == "__main__":
  main()
