"""The train state, optimizers and learning-rate schedules, and the jitted, sharded train and
eval steps (with gradient accumulation over microbatches and a non-finite loss guard).

Optimizers see each parameter array of each layer apart (`per_parameter`), whichever
layout (per layer, or stacked for scanned layers) the parameters are kept in.

This module holds no training loop, data pipeline, checkpoint or logging code (see train.py).
"""
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dsbs_jax import encoder_decoder
from dsbs_jax import partitioning
from dsbs_jax.models import t5

# Per optimizer: T5X's finetuning default (Adafactor, constant 1e-3, no gradient clipping
# beyond Adafactor's own update clipping), and Hugging Face Trainer's defaults (5e-5 decaying
# linearly to 0, gradient norm clipped at 1) for its two AdamWs: 'adamw_hf' is
# transformers.AdamW, the Trainer's default up to transformers 4.35 and so the paper's
# (its code pins 4.24); 'adamw' is torch.optim.AdamW, the default since.
OPTIMIZER_DEFAULTS = {
    "adafactor": {"learning_rate": 1e-3, "schedule": "constant", "grad_clip_norm": None},
    "adamw": {"learning_rate": 5e-5, "schedule": "linear_decay", "grad_clip_norm": 1.0},
    "adamw_hf": {"learning_rate": 5e-5, "schedule": "linear_decay", "grad_clip_norm": 1.0},
}
# Where each AdamW adds epsilon: torch's (and optax's) to the bias-corrected sqrt(nu),
# transformers' to the raw one, with both bias corrections folded into the step size.
ADAM_EPSILON_PLACEMENT = {"adamw": "torch", "adamw_hf": "transformers"}
SCHEDULES = ("constant", "linear_decay", "rsqrt", "cosine")


class NonFiniteLossError(FloatingPointError):
  """A training step produced a NaN or infinite loss or metric."""


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates applied
  params: Any
  opt_state: Any


def make_schedule(schedule: str, learning_rate: float, warmup_steps: int = 0,
                  total_steps: Optional[int] = None) -> optax.Schedule:
  """A learning rate per step: linear warmup from 0 to `learning_rate`, then the schedule.

  'constant'; 'linear_decay' and 'cosine' to 0 at total_steps; 'rsqrt':
  learning_rate * sqrt(w / step) with w = max(warmup_steps, 1) (T5's inverse square root
  with the peak rate as the parameter: T5's 1/sqrt(max(step, 10k)) is 0.01 with w = 10k).
  """
  decay_steps = None if total_steps is None else total_steps - warmup_steps
  if schedule == "constant":
    decay = optax.constant_schedule(learning_rate)
  elif schedule == "rsqrt":
    timescale = max(warmup_steps, 1)
    decay = lambda step: learning_rate * jnp.sqrt(timescale / (step + timescale))
  elif schedule in ("linear_decay", "cosine"):
    if decay_steps is None or decay_steps <= 0:
      raise ValueError(f"schedule {schedule!r} needs total_steps > warmup_steps "
                       f"(got total_steps={total_steps}, warmup_steps={warmup_steps})")
    decay = (optax.linear_schedule(learning_rate, 0.0, decay_steps) if schedule == "linear_decay"
             else optax.cosine_decay_schedule(learning_rate, decay_steps))
  else:
    raise ValueError(f"unknown schedule {schedule!r}: expected one of {SCHEDULES}")
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def bias_correction(decay: float, count: jax.Array) -> jax.Array:
  """1 - decay**count in float32 to within rounding, as PyTorch's optimizers get it in
  float64: 1 - float32(0.999)**count would be 1.3e-5 off in relative terms early on."""
  return -jnp.expm1(count.astype(jnp.float32) * math.log(decay))


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  epsilon_placement: str = "torch") -> optax.GradientTransformation:
  """Adam's scaling as PyTorch optimizers do it, in optax's state (ScaleByAdamState).

  epsilon_placement 'torch' (torch.optim.AdamW): mu_hat / (sqrt(nu_hat) + eps);
  'transformers' (transformers.AdamW, the paper's): sqrt(1 - b2^t) / (1 - b1^t) *
  mu / (sqrt(nu) + eps), where epsilon weighs more in the first steps.
  """
  if epsilon_placement not in ("torch", "transformers"):
    raise ValueError(f"unknown epsilon_placement {epsilon_placement!r}")

  def init(params):
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros(params),
                                  nu=zeros(params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: m * b1 + g * (1.0 - b1), state.mu, updates)
    nu = jax.tree.map(lambda v, g: v * b2 + (1.0 - b2) * g * g, state.nu, updates)
    count = state.count + 1
    correction1, correction2 = bias_correction(b1, count), bias_correction(b2, count)
    if epsilon_placement == "torch":
      scale = lambda m, v: m / (jnp.sqrt(v) / jnp.sqrt(correction2) + eps) / correction1
    else:
      scale = lambda m, v: m / (jnp.sqrt(v) + eps) * (jnp.sqrt(correction2) / correction1)
    return (jax.tree.map(scale, mu, nu),
            optax.ScaleByAdamState(count=count, mu=mu, nu=nu))

  return optax.GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_, which Hugging Face Trainer calls: every gradient
  times min(1, max_norm / (global norm + 1e-6))."""
  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.global_norm(updates) + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _under_stacked_layers(path) -> bool:
  return any(isinstance(key, jax.tree_util.DictKey) and key.key == t5.STACKED_KEY
             for key in path)


def per_parameter(transformation: optax.GradientTransformation) -> optax.GradientTransformation:
  """`transformation` applied to each parameter array apart, and to each layer of a
  stacked one (a leaf under a `layers` subtree, see t5.params_in_layout) apart.

  Adafactor's factored statistics, update clipping and parameter scaling, and AdamW's
  weight-decay mask (`ndim >= 2`) are defined per array; applied to a stacked [layers, ...]
  array they would mix the layers. Vmapped over the layer axis instead, a step updates
  stacked parameters exactly as it updates the same layers kept apart. The state mirrors
  the parameters: at each parameter's path, `transformation`'s state of that array (with
  a leading layer axis on every leaf under `layers`), so that it converts between layouts
  as the parameters do and takes their shardings (Partitioner.opt_state_shardings).
  Transformations over all parameters at once (global-norm clipping) must stay outside.
  """
  def for_leaf(path, function):
    return jax.vmap(function) if _under_stacked_layers(path) else function

  def init(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, param: for_leaf(path, transformation.init)(param), params)

  def update(updates, state, params=None):
    flat_updates, treedef = jax.tree_util.tree_flatten_with_path(updates)
    states = treedef.flatten_up_to(state)
    flat_params = [None] * len(states) if params is None else treedef.flatten_up_to(params)
    results = [for_leaf(path, transformation.update)(update, leaf_state, param)
               for (path, update), leaf_state, param in zip(flat_updates, states, flat_params)]
    return (treedef.unflatten([result[0] for result in results]),
            treedef.unflatten([result[1] for result in results]))

  return optax.GradientTransformation(init, update)


@gin.configurable
def make_optimizer(name: str = "adafactor", learning_rate: Optional[float] = None,
                   schedule: Optional[str] = None, warmup_steps: int = 0,
                   total_steps: Optional[int] = None, weight_decay: float = 0.0,
                   grad_clip_norm: Optional[float] = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule); None arguments take OPTIMIZER_DEFAULTS[name].

  Adafactor takes optax's T5 settings (factored second moments, decay 0.8, update
  clipping at 1, updates scaled by the parameters' scale, no momentum). The AdamWs
  ('adamw': torch's, 'adamw_hf': transformers', see ADAM_EPSILON_PLACEMENT) take Hugging
  Face Trainer's settings (betas 0.9 / 0.999, epsilon 1e-8) and decay only matrices (not
  layer-norm scales), as the Trainer does. Each sees each layer's arrays apart
  (`per_parameter`); gradient clipping is over all parameters, as torch clips.
  """
  if name not in OPTIMIZER_DEFAULTS:
    raise ValueError(f"unknown optimizer {name!r}: expected one of {sorted(OPTIMIZER_DEFAULTS)}")
  defaults = OPTIMIZER_DEFAULTS[name]
  learning_rate = defaults["learning_rate"] if learning_rate is None else learning_rate
  schedule = defaults["schedule"] if schedule is None else schedule
  grad_clip_norm = defaults["grad_clip_norm"] if grad_clip_norm is None else grad_clip_norm
  learning_rate_fn = make_schedule(schedule, learning_rate, warmup_steps, total_steps)
  if name == "adafactor":
    optimizer = optax.adafactor(learning_rate_fn, weight_decay_rate=weight_decay or None)
  else:
    # optax.adamw's chain and state, with the Adam scaling PyTorch's optimizers compute.
    optimizer = optax.chain(
        scale_by_adam(epsilon_placement=ADAM_EPSILON_PLACEMENT[name]),
        optax.add_decayed_weights(
            weight_decay, mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)),
        optax.scale_by_learning_rate(learning_rate_fn))
  optimizer = per_parameter(optimizer)
  if grad_clip_norm:
    optimizer = optax.chain(clip_by_global_norm(grad_clip_norm), optimizer)
  return optimizer, learning_rate_fn


def check_finite(metrics: dict[str, Any], step: int) -> None:
  """Raises NonFiniteLossError naming the step and the metrics that are NaN or infinite."""
  values = jax.device_get(metrics)
  bad = sorted(key for key, value in values.items() if not np.all(np.isfinite(value)))
  if bad:
    shown = ", ".join(f"{key}={values[key]}" for key in bad)
    raise NonFiniteLossError(f"non-finite training metrics at step {step}: {shown}")


def _split_microbatches(batch: encoder_decoder.Batch,
                        num_microbatches: int) -> encoder_decoder.Batch:
  """[batch, ...] -> [num_microbatches, batch / num_microbatches, ...].

  Microbatch i takes rows i, i + m, i + 2m, ...: each device's block of rows feeds every
  microbatch, so a batch split over 'data' needs no reshuffling.
  """
  def split(feature):
    strided = feature.reshape((-1, num_microbatches) + feature.shape[1:])
    return jnp.swapaxes(strided, 0, 1)
  return jax.tree.map(split, batch)


@gin.configurable
class Trainer:
  """Jitted, sharded train and eval steps for one network config, optimizer and mesh.

  The state's parameters and optimizer state are in the layout the config runs with
  (stacked layers when scanned, see t5.params_in_layout); `optimizer` should see each
  layer apart (`per_parameter`, as `make_optimizer`'s do).

  Steps compile once per batch shape. Use `shard_batch` on each host's batch, then
  `train_step(state, batch, rng)` -> (state, metrics), `check_finite(metrics, step)` and
  `encoder_decoder.summarize_metrics(metrics)`. `rng` is a base key; each step folds in its
  step number, so a restarted run draws the same dropout masks.
  """

  def __init__(self, config: t5.T5Config, partitioner: partitioning.Partitioner,
               optimizer: optax.GradientTransformation,
               learning_rate_fn: Optional[optax.Schedule] = None, *,
               num_microbatches: int = 1, z_loss: float = 1e-4,
               loss_normalization: str = "per_example"):
    if num_microbatches < 1:
      raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if loss_normalization not in encoder_decoder.LOSS_NORMALIZATIONS:
      raise ValueError(f"unknown loss_normalization {loss_normalization!r}: expected one of "
                       f"{encoder_decoder.LOSS_NORMALIZATIONS}")
    self.config = config
    self.partitioner = partitioner
    self.optimizer = optimizer
    self.learning_rate_fn = learning_rate_fn
    self.num_microbatches = num_microbatches
    self.z_loss = z_loss
    self.loss_normalization = loss_normalization

    param_shapes = t5.param_shapes(config)
    self.param_shardings = partitioner.param_shardings(t5.param_partition_specs(config),
                                                       param_shapes)
    opt_state_shapes = jax.eval_shape(optimizer.init, param_shapes)
    replicated = partitioner.sharding()
    self.state_shardings = TrainState(
        step=replicated, params=self.param_shardings,
        opt_state=partitioner.opt_state_shardings(opt_state_shapes, param_shapes,
                                                  self.param_shardings))
    self._abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=param_shapes,
        opt_state=opt_state_shapes)

    batch_sharding = partitioner.batch_sharding
    self._jit_train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, batch_sharding, replicated),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    self._jit_eval_step = jax.jit(
        self._eval_step, in_shardings=(self.param_shardings, batch_sharding),
        out_shardings=replicated)
    self._jit_init_state = jax.jit(
        lambda rng: self._state_from_params(t5.init_params(config, rng)),
        in_shardings=replicated, out_shardings=self.state_shardings)
    self._jit_state_from_params = jax.jit(
        self._state_from_params, in_shardings=(self.param_shardings,),
        out_shardings=self.state_shardings)

  # ----------------------------------------------------------------------------
  # Public, host-side API: every call traces under the mesh and the rules.
  # ----------------------------------------------------------------------------
  def _in_mesh(self, jitted: Callable, *args):
    with jax.set_mesh(self.partitioner.mesh), nn.logical_axis_rules(self.partitioner.rules):
      return jitted(*args)

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state, each parameter created directly in its shards."""
    return self._in_mesh(self._jit_init_state, rng)

  def state_from_params(self, params) -> TrainState:
    """A step-0 state (fresh optimizer state) around given, e.g. pretrained, parameters,
    in either layout (per layer, as model folders hold them, or stacked).

    Host arrays must hold the whole parameters, the same on every host.
    """
    params = t5.params_in_layout(params, t5.scans_layers(self.config))
    params = jax.device_put(params, self.param_shardings)
    return self._in_mesh(self._jit_state_from_params, params)

  def abstract_state(self) -> TrainState:
    """The state as ShapeDtypeStructs carrying their shardings (for checkpoint restores)."""
    return jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(
        shape.shape, shape.dtype, sharding=sharding), self._abstract_state,
                        self.state_shardings)

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global batch arrays from this host's rows; checks microbatches split evenly."""
    sharded = self.partitioner.shard_batch(batch)
    self.partitioner.check_batch_size(
        next(iter(sharded.values())).shape[0], self.num_microbatches)
    return sharded

  def train_step(self, state: TrainState, batch: encoder_decoder.Batch,
                 rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update. `state` is donated: use only the returned one afterwards.

    metrics: the metric sums of encoder_decoder.loss_terms over the whole batch, plus
    grad_norm (of the mean gradient) and learning_rate when the trainer has a schedule.
    """
    return self._in_mesh(self._jit_train_step, state, batch, rng)

  def eval_step(self, params, batch: encoder_decoder.Batch) -> dict[str, jax.Array]:
    """Metric sums of encoder_decoder.loss_terms without dropout."""
    return self._in_mesh(self._jit_eval_step, params, batch)

  def lower_train_step(self, batch: encoder_decoder.Batch) -> jax.stages.Lowered:
    """The train step lowered for `batch` (ShapeDtypeStructs with the batch sharding), ready
    to compile ahead of time for the mesh's devices, which need not be attached."""
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype,
                               sharding=self.partitioner.sharding())
    return self._in_mesh(self._jit_train_step.lower, self.abstract_state(), batch, rng)

  def lower_eval_step(self, batch: encoder_decoder.Batch) -> jax.stages.Lowered:
    """The eval step lowered for `batch`, as `lower_train_step`."""
    return self._in_mesh(self._jit_eval_step.lower, self.abstract_state().params, batch)

  # ----------------------------------------------------------------------------
  # Traced functions.
  # ----------------------------------------------------------------------------
  def _state_from_params(self, params) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params))

  def _loss_terms(self, params, batch, dropout_rng):
    return encoder_decoder.loss_terms(params, batch, dropout_rng, self.config, z_loss=self.z_loss,
                                      loss_normalization=self.loss_normalization)

  def _eval_step(self, params, batch):
    return self._loss_terms(params, batch, None)[1]

  def _summed_gradients(self, params, batch, dropout_rng):
    """Gradients of the summed (unnormalized) loss in float32, and the metric sums."""
    grad_fn = jax.grad(self._loss_terms, has_aux=True)
    to_float32 = lambda tree: jax.tree.map(lambda g: g.astype(jnp.float32), tree)
    if self.num_microbatches == 1:
      grads, metrics = grad_fn(params, batch, dropout_rng)
      return to_float32(grads), metrics

    microbatches = _split_microbatches(batch, self.num_microbatches)

    def accumulate(carry, indexed_microbatch):
      index, microbatch = indexed_microbatch
      microbatch = jax.lax.with_sharding_constraint(microbatch,
                                                    self.partitioner.batch_sharding)
      grads, metrics = grad_fn(params, microbatch, jax.random.fold_in(dropout_rng, index))
      return jax.tree.map(jnp.add, carry, (to_float32(grads), metrics)), None

    first = jax.tree.map(lambda feature: feature[0], microbatches)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                         jax.eval_shape(grad_fn, params, first, dropout_rng))
    (grads, metrics), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(self.num_microbatches), microbatches))
    return grads, metrics

  def _train_step(self, state: TrainState, batch, rng):
    self.partitioner.check_batch_size(batch["decoder_target_tokens"].shape[0],
                                      self.num_microbatches)
    dropout_rng = jax.random.fold_in(rng, state.step)
    grads, metrics = self._summed_gradients(state.params, batch, dropout_rng)
    # Scaled batches' sums are the loss itself; their normalizer is 1 only to rounding.
    normalizer = (1.0 if "decoder_loss_scales" in batch
                  else encoder_decoder.nonzero(metrics["loss_normalizer"]))
    grads = jax.tree.map(lambda g, p: (g / normalizer).astype(p.dtype), grads, state.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    if self.learning_rate_fn is not None:
      metrics["learning_rate"] = jnp.asarray(self.learning_rate_fn(state.step), jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
