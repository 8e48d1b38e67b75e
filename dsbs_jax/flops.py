"""Model FLOPs of the T5 encoder-decoder, counted layer by layer.

Each weight matrix is charged 2 FLOPs per multiply-add on the tokens that pass through it
(encoder weights on encoder tokens, decoder weights on decoder tokens, cross-attention
keys and values on encoder tokens once per decoder layer), plus the attention score and
value products over the sequence lengths as computed. A training step costs three forward
passes (forward, and backward through activations and weights). The common shortcut
6 * parameters * tokens charges every weight on every token and overcounts an
encoder-decoder. Embedding lookups, norms and softmax are not counted (T5X and PaLM's MFU
convention). It also holds the devices' peak FLOP/s, to turn FLOPs into utilization:
data-sheet figures for known accelerators, and for other devices (CPUs) the best matmul
rate measured on the machine, kept in a cache file so that runs on a busy machine are
measured against the same peak. This module must not run the model.
"""
import functools
import json
import os
import pathlib
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dsbs_jax import storage
from dsbs_jax import targets
from dsbs_jax.models import t5


def _attention_projection_flops(config: t5.T5Config) -> int:
  """One projection (q, k, v or o) for one token: 2 * embed * heads * head_dim."""
  return 2 * config.emb_dim * config.num_heads * config.head_dim


def _mlp_flops(config: t5.T5Config) -> int:
  inputs = len(config.mlp_activations)  # gated GELU has two input projections
  return 2 * config.emb_dim * config.mlp_dim * (inputs + 1)


def _scores_flops(config: t5.T5Config, keys_length: int) -> int:
  """QK^T and attention-weighted values for one query token over keys_length keys."""
  return 2 * 2 * keys_length * config.num_heads * config.head_dim


def forward_flops(config: t5.T5Config, batch_size: int, input_length: int,
                  target_length: int) -> int:
  """FLOPs of one forward pass over [batch, input_length] -> [batch, target_length]."""
  projection = _attention_projection_flops(config)
  encoder_token = 4 * projection + _scores_flops(config, input_length) + _mlp_flops(config)
  decoder_token = (4 * projection + _scores_flops(config, target_length)  # self-attention
                   + 2 * projection + _scores_flops(config, input_length)  # cross q and o
                   + _mlp_flops(config))
  cross_keys_values = 2 * projection * input_length  # per decoder layer, per example
  logits = 2 * config.emb_dim * config.vocab_size * target_length
  per_example = (config.num_encoder_layers * encoder_token * input_length
                 + config.num_decoder_layers * (decoder_token * target_length + cross_keys_values)
                 + logits)
  return batch_size * per_example


def train_step_flops(config: t5.T5Config, batch_size: int, input_length: int,
                     target_length: int) -> int:
  """Forward plus backward: three forward passes' worth."""
  return 3 * forward_flops(config, batch_size, input_length, target_length)


def parameter_count(config: t5.T5Config) -> int:
  """Weights of the network as this module counts them, for cross-checking the layout."""
  projection = config.emb_dim * config.num_heads * config.head_dim
  mlp = config.emb_dim * config.mlp_dim * (len(config.mlp_activations) + 1)
  encoder = config.num_encoder_layers * (4 * projection + mlp + 2 * config.emb_dim)
  decoder = config.num_decoder_layers * (8 * projection + mlp + 3 * config.emb_dim)
  embeddings = config.vocab_size * config.emb_dim * (1 if config.logits_via_embedding else 2)
  relative_bias = 2 * config.relative_attention_num_buckets * config.num_heads
  return encoder + decoder + embeddings + relative_bias + 2 * config.emb_dim


# Dense bf16 matmul peaks per chip, from the vendors' data sheets.
KNOWN_PEAK_FLOPS = {kind: sheet.peak_flops for kind, sheet in targets.DATA_SHEETS.items()}


def best_matmul_flops(run_matmul: Callable[[], object], size: int, repeats: int) -> float:
  """FLOP/s of `run_matmul()`, one finished [size, size] @ [size, size] product, best of
  `repeats` after a warm-up call (any library: numpy, torch, jax)."""
  run_matmul()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    run_matmul()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def measured_matmul_peak(size: int = 1024, repeats: int = 10,
                         dtype: jnp.dtype = jnp.float32) -> float:
  """FLOP/s of a [size, size] matmul through jax on the default device.

  Operands of `dtype`, accumulated in float32, as the model's projections run.
  """
  x = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  return best_matmul_flops(lambda: matmul(x).block_until_ready(), size, repeats)


PEAK_MATMUL_SIZE = 1024
PEAK_REPEATS = 30


def peak_cache_path() -> pathlib.Path:
  """Where measured peaks are kept: $DSBS_CACHE_DIR, else the user's cache folder."""
  return storage.cache_dir() / "matmul_peaks.json"


@functools.lru_cache(maxsize=None)
def _measured_once(dtype_name: str) -> float:
  """This process's best of PEAK_REPEATS products, measured once and reused."""
  return measured_matmul_peak(PEAK_MATMUL_SIZE, PEAK_REPEATS, jnp.dtype(dtype_name))


def _read_peaks(path: pathlib.Path) -> dict:
  try:
    peaks = json.loads(path.read_text())
    return peaks if isinstance(peaks, dict) else {}
  except (OSError, ValueError):  # absent or unreadable: measure afresh
    return {}


def best_measured_peak(kind: str, dtype: jnp.dtype,
                       cache_path: Optional[pathlib.Path] = None) -> tuple[float, str]:
  """(the best matmul FLOP/s of `dtype` measured on this machine so far, what it is).

  Each process measures once (the best of repeated products); the cache keeps the best
  of every measurement for this device kind, dtype and CPU count, since a machine busy
  with other work can only make a product slower, never faster.
  """
  name = jnp.dtype(dtype).name
  key = f"{kind} | {name} | {os.cpu_count()} CPUs"
  path = cache_path or peak_cache_path()
  measured = _measured_once(name)
  peaks = _read_peaks(path)
  best = max(measured, float(peaks.get(key, 0.0)))
  if best > float(peaks.get(key, 0.0)):
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(f".{os.getpid()}.tmp")
      tmp.write_text(json.dumps({**peaks, key: best}, indent=2, sort_keys=True) + "\n")
      os.replace(tmp, path)
    except OSError:
      pass  # an unwritable cache only costs the next run its comparison
  size = f"{PEAK_MATMUL_SIZE}x{PEAK_MATMUL_SIZE}"
  return best, (f"the best {name} {size} matmul measured on this {kind} with {os.cpu_count()} "
                f"CPUs, kept in {path}; this run measured {measured:.3g}")


def peak_flops_per_device(dtype: jnp.dtype = jnp.float32,
                          cache_path: Optional[pathlib.Path] = None) -> tuple[float, str]:
  """(peak FLOP/s of one local device for products of `dtype`, where the figure comes from).

  Known accelerators: their data sheet's dense bfloat16 figure, whatever the dtype. Other
  devices (CPUs included): `best_measured_peak` of the model's dtype; a CPU with bfloat16
  instructions runs bfloat16 products ~2x faster than float32 ones.
  """
  kind = jax.local_devices()[0].device_kind
  if kind in KNOWN_PEAK_FLOPS:
    return KNOWN_PEAK_FLOPS[kind], f"{kind} data sheet, dense bfloat16"
  return best_measured_peak(kind, dtype, cache_path)
