"""The paper's recipe, step for step: dsbs_jax's per-input training (runs/paper.gin's
batching, loss, optimizer, schedule and clipping) against the release's trainer rebuilt on
transformers and torch (tools/bench_torch.py), on the same batches of shipped records.

  python tools/paper_step_check.py [--steps 20] [--batch_size 4] [--case NAME ...]

Both sides start from the same randomly initialized T5 (our initialization, loaded into
transformers' T5ForConditionalGeneration) in float32 without dropout (dropout masks cannot
be drawn alike by two libraries); the batches are ours (per_input_batches), handed to the
release's collator as token ids. Each case prints one table row and one JSON line: the
largest relative difference of the step loss over all steps, and the largest absolute
difference of any parameter after the last step, each beside the float32 noise floor
measured the same way: the reference in float64 against itself in float32. A difference
within a small multiple of that floor is float32 rounding in another order; a different
loss, batch, optimizer or schedule shows orders of magnitude above it (`--optimizer
adamw`, torch's AdamW, on our side against the release's transformers AdamW shows how far:
the control columns, each case's run again with `--control`).

This tool trains nothing for real and keeps no files.
"""
import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Optional, Sequence

if __name__ == "__main__":  # the CPU devices of the 4-device case, before JAX starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4").strip()

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_torch  # noqa: E402  (a sibling file; tools/ is not a package)

from dsbs_jax import convert  # noqa: E402
from dsbs_jax import distillation  # noqa: E402
from dsbs_jax import partitioning  # noqa: E402
from dsbs_jax import per_input_batches  # noqa: E402
from dsbs_jax import seqio_tasks  # noqa: E402
import tasks  # noqa: E402,F401  (registers the shipped datasets' tasks)
from dsbs_jax import trainer as trainer_lib  # noqa: E402
from dsbs_jax.models import t5  # noqa: E402

# The paper's lengths and prefixes (runs/paper.gin); its learning rate is raised so that 20
# steps move the weights far enough for a wrong update to show.
LENGTHS = {"inputs": 1024, "targets": 256}
LEARNING_RATE = 1e-3
ALPHA = 0.5
RELEASE_OPTIMIZERS = {"adamw_hf": "adamw_hf", "adamw": "adamw_torch"}


@dataclasses.dataclass(frozen=True)
class Case:
  """One comparison: a mixture (the paper's method on a dataset) and how ours runs it."""
  mixture: str
  train_fraction: float = 1.0
  parallelism: str = "data"
  mesh_shape: tuple = (1, 1)
  num_microbatches: int = 1
  scan_layers: bool = False


CASES = {
    "dsbs_teacher": Case("cqa_dsbs_teacher"),
    # A sixteenth of SVAMP's inputs: 45, so that 20 steps of 4 cross an epoch's last batch,
    # its twelfth, of 1 input.
    "dsbs_gold": Case("svamp_dsbs_gold", train_fraction=0.0625),
    "finetune": Case("cqa_finetune"),
    "distill": Case("svamp_distill", train_fraction=0.0625),
    "dsbs_teacher_fsdp4_micro2_scan": Case("cqa_dsbs_teacher", parallelism="fsdp",
                                           mesh_shape=(4, 1), num_microbatches=2,
                                           scan_layers=True),
}


def student_config() -> t5.T5Config:
  """A tiny T5 v1.1 (gated GELU, separate output layer) over the shipped vocabulary."""
  vocab_size = seqio_tasks.OptionsVocabulary().vocab_size
  return t5.T5Config(vocab_size=vocab_size, emb_dim=32, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2, head_dim=8, mlp_dim=64,
                     mlp_activations=("gelu", "linear"), dropout_rate=0.0, dtype="float32",
                     scan_layers=False)


def paper_options(case: Case) -> distillation.TaskOptions:
  label_prefix, rationale_prefix = distillation.PAPER_PREFIXES
  return distillation.TaskOptions(
      alpha=ALPHA, train_fraction=case.train_fraction, label_prefix=label_prefix,
      rationale_prefix=rationale_prefix, label_only_prefix="").for_run(case.mixture)


@functools.lru_cache(maxsize=None)
def case_batches(case: Case, batch_size: int) -> per_input_batches.PerInputBatches:
  with distillation.options_in_use(paper_options(case)):
    return per_input_batches.batches_of(case.mixture, LENGTHS, batch_size, seed=0)


def train_ours(case: Case, config: t5.T5Config, params, batches, steps: int,
               optimizer_name: str) -> tuple[list[float], dict]:
  """(loss of each step, {Hugging Face name: parameter} after the last) of dsbs_jax."""
  devices = jax.devices()[:int(np.prod(case.mesh_shape))]
  partitioner = partitioning.make_partitioner(case.parallelism, case.mesh_shape, devices)
  optimizer, schedule = trainer_lib.make_optimizer(optimizer_name, LEARNING_RATE,
                                                   total_steps=steps)
  config = dataclasses.replace(config, scan_layers=case.scan_layers)
  trainer = trainer_lib.Trainer(config, partitioner, optimizer, schedule,
                                num_microbatches=case.num_microbatches, z_loss=0.0)
  state = trainer.state_from_params(params)
  rng, losses = jax.random.key(0), []
  for index in range(steps):
    state, metrics = trainer.train_step(state, trainer.shard_batch(batches.batch(index)), rng)
    losses.append(float(metrics["loss_sum"]))
  return losses, convert.hf_weights(jax.device_get(state.params))


def train_release(config: t5.T5Config, params, batches, steps: int, optimizer_name: str,
                  dtype: torch.dtype = torch.float32) -> tuple[list[float], dict]:
  """(loss of each step, {name: parameter} after the last) of the rebuilt release trainer."""
  model = bench_torch.hf_model(config, params).to(dtype)
  collate = bench_torch.TaskPrefixCollator(model)
  step = bench_torch.TaskPrefixStep(model, ALPHA, steps, "float32", learning_rate=LEARNING_RATE,
                                    optimizer=RELEASE_OPTIMIZERS[optimizer_name])
  losses = []
  for index in range(steps):
    chosen = batches.batch_inputs(index)
    label = [(item.label.inputs, item.label.targets) for item in chosen]
    rationale = [(item.rationale.inputs, item.rationale.targets) for item in chosen
                 if item.rationale is not None]
    losses.append(step(collate(label, rationale)))
  names = set(convert.hf_weights(params))
  return losses, {name: tensor.detach().double().numpy()
                  for name, tensor in model.state_dict().items() if name in names}


def differences(losses, weights, reference_losses, reference_weights) -> dict:
  """Largest relative loss difference over the steps, largest parameter difference."""
  losses, reference_losses = np.asarray(losses, np.float64), np.asarray(reference_losses)
  return {"loss_rel": float(np.max(np.abs(losses - reference_losses) / np.abs(reference_losses))),
          "param_abs": max(float(np.max(np.abs(np.asarray(weights[name], np.float64)
                                               - reference_weights[name])))
                           for name in reference_weights)}


def check(name: str, steps: int = 20, batch_size: int = 4, optimizer: str = "adamw_hf",
          control_optimizer: Optional[str] = None, seed: int = 0) -> dict:
  """One case's measured agreement (see the module docstring), as the JSON line prints it;
  with control_optimizer, also ours with that optimizer against the same reference."""
  case = CASES[name]
  config = student_config()
  # Per-layer parameters, which both sides load; a scanned run stacks them itself.
  params = jax.device_get(jax.jit(t5.init_params, static_argnums=0)(config, jax.random.key(seed)))
  batches = case_batches(case, batch_size)
  release_optimizer = "adamw_hf"
  reference = train_release(config, params, batches, steps, release_optimizer)
  reference64 = train_release(config, params, batches, steps, release_optimizer, torch.float64)
  ours = train_ours(case, config, params, batches, steps, optimizer)
  control = {} if control_optimizer is None else {
      "control_optimizer": control_optimizer,
      "control_vs_release": differences(*train_ours(case, config, params, batches, steps,
                                                    control_optimizer), *reference)}
  return {"case": name, "mixture": case.mixture, "parallelism": case.parallelism,
          "devices": int(np.prod(case.mesh_shape)), "microbatches": case.num_microbatches,
          "scan_layers": case.scan_layers,
          "steps": steps, "inputs_per_batch": batch_size, "optimizer": optimizer,
          "first_loss": reference[0][0], "last_loss": reference[0][-1],
          "ours_vs_release": differences(*ours, *reference),
          "float32_floor": differences(*reference, *reference64), **control}


def print_table(rows: Sequence[dict]) -> None:
  """Markdown: per case, ours and the control against the release, over the float32 floor."""
  ratio = lambda value, floor: f"{value:.2e} ({value / max(floor, 1e-30):.3g}x)"
  print("| case | mixture | devices, microbatches | loss rel. diff (x floor) | "
        "param diff (x floor) | control: loss | control: params |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for row in rows:
    ours, floor = row["ours_vs_release"], row["float32_floor"]
    control = row.get("control_vs_release")
    controls = (["-", "-"] if control is None else
                [ratio(control[key], floor[key]) for key in ("loss_rel", "param_abs")])
    print(f"| {row['case']} | {row['mixture']} | {row['devices']}, {row['microbatches']} | "
          f"{ratio(ours['loss_rel'], floor['loss_rel'])} | "
          f"{ratio(ours['param_abs'], floor['param_abs'])} | {' | '.join(controls)} |")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--case", action="append", choices=sorted(CASES))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=4, help="inputs per batch")
  parser.add_argument("--optimizer", default="adamw_hf", choices=sorted(RELEASE_OPTIMIZERS),
                      help="ours; the release's is always transformers 4.24's AdamW")
  parser.add_argument("--control", default="adamw", choices=sorted(RELEASE_OPTIMIZERS),
                      help="also run ours with this optimizer against the same reference")
  args = parser.parse_args(argv)
  rows = [check(name, args.steps, args.batch_size, args.optimizer, args.control)
          for name in (args.case or CASES)]
  print_table(rows)
  for row in rows:
    print(json.dumps(row))
  return 0


if __name__ == "__main__":
  sys.exit(main())
