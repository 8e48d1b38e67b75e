"""Converts the paper's released data into rationales/<dataset>/<split>.jsonl[.gz].

Usage: python tools/convert_release.py --release ../shared/data/dsbs-release --out rationales

Reads the release's inputs (<ds>/<ds>_<split>.json) and raw PaLM outputs
(<ds>/llm/<split>_CoT_<k>.json), parses every output with dsbs_jax.rationales, carves the
validation split of CQA and SVAMP as the paper does, and writes one record per example
plus rationales/README.md with the counts, parse failures and teacher accuracy measured
here. This is a one-off build step: nothing in the package reads the release at run time.
"""
import argparse
import collections
import glob
import json
import os
import sys

import numpy as np

from dsbs_jax import metrics
from dsbs_jax import rationales
from dsbs_jax import records

GZIP_ABOVE_BYTES = 1 << 20


def read_json_lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def read_teacher_outputs(release, dataset, split):
  """Concatenates <split>_CoT_0.json, _1, ... in batch order, as the paper does."""
  outputs = []
  for batch in range(len(glob.glob(os.path.join(release, dataset, "llm", f"{split}_CoT_*.json")))):
    with open(os.path.join(release, dataset, "llm", f"{split}_CoT_{batch}.json"), encoding="utf-8") as f:
      outputs.extend(json.load(f))
  return outputs


def carve_validation(train_records):
  """(train, valid) as the paper's `train_test_split(test_size=0.1, seed=0)`."""
  return records.split_records(train_records, records.VALID_FRACTION, records.VALID_SEED)


def cqa_input(example):
  choices = example["choices"]
  lettered = "\n".join(f"({letter}) {choice}" for letter, choice in zip("abcde", choices))
  return f"{example['question']}\nAnswer Choices:\n{lettered}"


def nli_input(example):
  return f"{example['premise']}{rationales.NLI_SEPARATOR}{example['hypothesis']}"


def join(dataset, examples, outputs, make_id, make_input, make_label):
  if len(examples) != len(outputs):
    raise ValueError(f"{dataset}: {len(examples)} inputs but {len(outputs)} teacher outputs")
  return [rationales.make_record(dataset, make_id(i, ex), make_input(ex), make_label(ex), out)
          for i, (ex, out) in enumerate(zip(examples, outputs))]


def outputs_only(dataset, split, outputs):
  """Records for a split whose inputs the release lacks: teacher output only."""
  width = len(str(len(outputs) - 1))
  return [rationales.make_record(dataset, f"{dataset}-{split}-{i:0{width}d}", None, None, out)
          for i, out in enumerate(outputs)]


def svamp_ids(release, inputs):
  """Recovers SVAMP's own IDs ('chal-N') by redoing the paper's split of SVAMP.json."""
  with open(os.path.join(release, "svamp", "SVAMP.json"), encoding="utf-8") as f:
    original = json.load(f)
  permutation = np.random.RandomState(seed=0).permutation(len(original))
  ids = {}
  for split, indices in (("train", permutation[:800]), ("test", permutation[800:])):
    expected = [f"{original[i]['Body']}\n{original[i]['Question']}" for i in indices]
    if expected != [ex["input"] for ex in inputs[split]]:
      raise ValueError(f"svamp/{split}: inputs differ from the paper's split of SVAMP.json")
    ids[split] = [original[i]["ID"] for i in indices]
  return ids


def convert(release):
  """Returns {dataset: {split: [records]}} built from the release."""
  def inputs(dataset, split):
    return read_json_lines(os.path.join(release, dataset, f"{dataset}_{split}.json"))

  nli_label = lambda ex: rationales.NLI_LABELS[ex["label"]]
  converted = {}

  cqa = {split: join("cqa", inputs("cqa", split), read_teacher_outputs(release, "cqa", split),
                     lambda i, ex: ex["id"], cqa_input, lambda ex: ex["answer"])
         for split in ("train", "test")}
  cqa["train"], cqa["valid"] = carve_validation(cqa["train"])
  converted["cqa"] = cqa

  svamp_inputs = {split: inputs("svamp", split) for split in ("train", "test")}
  ids = svamp_ids(release, svamp_inputs)
  svamp = {split: join("svamp", svamp_inputs[split], read_teacher_outputs(release, "svamp", split),
                       lambda i, ex, split=split: ids[split][i],
                       lambda ex: ex["input"], lambda ex: ex["label"])
           for split in ("train", "test")}
  svamp["train"], svamp["valid"] = carve_validation(svamp["train"])
  converted["svamp"] = svamp

  for dataset, id_field in (("esnli", None), ("anli1", "uid")):
    splits = {}
    for split in ("valid", "test"):
      width = 6 if dataset == "esnli" else 5
      make_id = ((lambda i, ex: ex[id_field]) if id_field else
                 (lambda i, ex, split=split: f"{dataset}-{split}-{i:0{width}d}"))
      splits[split] = join(dataset, inputs(dataset, split), read_teacher_outputs(release, dataset, split),
                           make_id, nli_input, nli_label)
    splits["train"] = outputs_only(dataset, "train", read_teacher_outputs(release, dataset, "train"))
    converted[dataset] = splits
  return converted


def teacher_accuracy(dataset, records):
  gold = [r.label for r in records if r.label is not None]
  if not gold:
    return None
  teacher = [r.teacher_label for r in records if r.label is not None]
  metric = metrics.equation_accuracy if dataset == "svamp" else metrics.exact_match_accuracy
  return metric(gold, teacher)["accuracy"]


def split_stats(dataset, records):
  errors = collections.Counter(r.parse_error for r in records if r.parse_error)
  return {
      "examples": len(records),
      "with_inputs": sum(r.input is not None for r in records),
      "parse_failures": sum(errors.values()),
      "failure_reasons": dict(errors.most_common()),
      "empty_rationales": sum(not r.rationale.strip() for r in records),
      "teacher_accuracy": teacher_accuracy(dataset, records),
  }


def write_all(converted, out_dir):
  stats = {}
  for dataset, splits in converted.items():
    os.makedirs(os.path.join(out_dir, dataset), exist_ok=True)
    for split, records in splits.items():
      for stale in glob.glob(os.path.join(out_dir, dataset, f"{split}.jsonl*")):
        os.remove(stale)
      size = sum(len(r.to_json()) + 1 for r in records)
      path = os.path.join(out_dir, dataset, f"{split}.jsonl" + (".gz" if size > GZIP_ABOVE_BYTES else ""))
      rationales.write_records(path, records)
      stats[(dataset, split)] = dict(split_stats(dataset, records), file=os.path.relpath(path, out_dir))
  return stats


README_HEAD = """\
# Teacher rationales shipped with dsbs-jax

Written by `tools/convert_release.py` from the paper's released data (Hsieh et al., ACL 2023,
google-research/distilling-step-by-step, Apache-2.0): the benchmark inputs and the raw PaLM
540B few-shot chain-of-thought outputs. Every figure below comes from that tool's own run;
re-run it rather than editing this file.

## Record format
One JSON object per line (`<dataset>/<split>.jsonl`, gzip when over 1 MiB):

| field | meaning |
| --- | --- |
| `id` | stable id: CQA's own id, SVAMP's `chal-N`, ANLI's `uid`; `esnli-<split>-<index>` and `anli1-train-<index>` (position in the paper's order) otherwise |
| `input` | model input as the paper's code builds it (see below); `null` where the release lacks it |
| `label` | gold label as text; `null` where the release lacks it |
| `teacher_label`, `rationale` | parsed from `teacher_output` exactly as the paper's code parses it |
| `teacher_output` | the raw PaLM completion |
| `parse_error` | `null`, or why the paper's parsing fell back to a blank label/rationale (kept, not dropped) |

Inputs: CQA is `question\\nAnswer Choices:\\n(a) ...\\n(e) ...`; SVAMP is `Body\\nQuestion`;
e-SNLI and ANLI are `premise</s>hypothesis`, since the paper joins the two with the T5
tokenizer's EOS token; the data pipeline tokenizes the two sides apart and puts the EOS id
between them, which gives the paper's token ids.

Validation splits: CQA and SVAMP have none, so, as the paper does, 10% of train is carved
with Hugging Face's `train_test_split(test_size=0.1, seed=0)` permutation (reproduced with
numpy, no `datasets` dependency). The paper carves after subsampling the training data, so
at a training-data fraction below 1 the data pipeline puts the two back in their original
order, subsamples and carves again, as the paper does (both splits then differ from these
files).

Missing inputs: e-SNLI train (549,367) and ANLI R1 train (16,946) inputs are not in the
release. Their `train.jsonl.gz` holds the teacher outputs in the paper's order; the SeqIO
tasks join them with the inputs you name (see the main README).

## Licences
CommonsenseQA (MIT), CoS-E (BSD-3-Clause), SVAMP (MIT), e-SNLI (MIT), ANLI (CC BY-NC 4.0:
non-commercial); the PaLM outputs come with the paper's release (Apache-2.0).

## Counts, parse failures and teacher accuracy
Teacher accuracy: the parsed teacher label against the gold label, exact match (SVAMP:
equation value, as the paper scores it); blank where gold labels are missing.

| dataset | split | file | examples | with inputs | parse failures | empty rationales | teacher accuracy |
| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |
"""


def render_readme(stats):
  rows = []
  reasons = []
  for (dataset, split), s in stats.items():
    accuracy = "" if s["teacher_accuracy"] is None else f"{100 * s['teacher_accuracy']:.2f}%"
    rows.append(f"| {dataset} | {split} | `{s['file']}` | {s['examples']:,} | {s['with_inputs']:,} | "
                f"{s['parse_failures']:,} | {s['empty_rationales']:,} | {accuracy} |")
    for reason, count in s["failure_reasons"].items():
      reasons.append(f"- {dataset}/{split}: {count:,} × {reason}")
  return README_HEAD + "\n".join(rows) + "\n\nParse failures by reason:\n" + "\n".join(reasons) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--release", required=True, help="folder of the paper's released data")
  parser.add_argument("--out", default="rationales", help="output folder (default: rationales)")
  args = parser.parse_args(argv)
  stats = write_all(convert(args.release), args.out)
  with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
    f.write(render_readme(stats))
  for (dataset, split), s in stats.items():
    print(json.dumps({"dataset": dataset, "split": split, **s}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
