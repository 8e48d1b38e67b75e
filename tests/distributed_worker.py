"""Trains a few steps as one process of a jax.distributed run, or as the single-process
reference, and prints the losses and a parameter checksum as JSON (for test_distributed.py).

Usage: distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID   (multi-process)
       distributed_worker.py reference NUM_SHARDS                     (one process)
"""
import json
import sys

import jax
import numpy as np
import seqio

LENGTHS = {"inputs": 64, "targets": 32}
GLOBAL_BATCH = 4
STEPS = 3


def main(argv):
  if argv[1] == "reference":
    num_shards = int(argv[2])
  else:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(argv[1], int(argv[2]), int(argv[3]))
    num_shards = jax.process_count()

  from dsbs_jax import datasets, encoder_decoder, input_pipeline, partitioning
  from dsbs_jax import trainer as trainer_lib
  from dsbs_jax.models import t5
  datasets.register_all()

  config = t5.T5Config(vocab_size=8000, emb_dim=32, num_heads=4, num_encoder_layers=2,
                       num_decoder_layers=2, head_dim=8, mlp_dim=64,
                       mlp_activations=("gelu", "linear"), dropout_rate=0.0)
  partitioner = partitioning.make_partitioner("data", (-1, 1))
  optimizer, schedule = trainer_lib.make_optimizer("adafactor")
  trainer = trainer_lib.Trainer(config, partitioner, optimizer, schedule)
  state = trainer.init_state(jax.random.key(0))

  def shard_batches(index):
    return input_pipeline.train_batches("cqa_dsbs_teacher", LENGTHS, GLOBAL_BATCH, seed=0,
                                        shard_info=seqio.ShardInfo(index, num_shards))
  if argv[1] == "reference":
    shards = [shard_batches(i) for i in range(num_shards)]
    next_batch = lambda: {k: np.concatenate([b[k] for b in parts]) for parts in
                          [[next(s) for s in shards]] for k in parts[0]}
  else:
    own = input_pipeline.train_batches("cqa_dsbs_teacher", LENGTHS, GLOBAL_BATCH, seed=0)
    next_batch = lambda: next(own)

  losses = []
  for _ in range(STEPS):
    state, metrics = trainer.train_step(state, trainer.shard_batch(next_batch()),
                                        jax.random.key(1))
    losses.append(encoder_decoder.summarize_metrics(metrics)["loss"])
  params = jax.tree.leaves(state.params)
  checksum = [float(np.abs(np.asarray(jax.device_get(
      leaf.addressable_shards[0].data if hasattr(leaf, "addressable_shards") else leaf))).sum())
              for leaf in params]
  if jax.process_index() == 0:
    print("RESULT " + json.dumps({"losses": losses, "checksum": checksum,
                                      "processes": jax.process_count(),
                                      "devices": jax.device_count()}), flush=True)


if __name__ == "__main__":
  main(sys.argv)
