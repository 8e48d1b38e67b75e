"""The paper's PyTorch trainer, rebuilt for measurement only (google-research's
distilling-step-by-step, model_utils.py and train_utils.py, on transformers' T5):

- TaskPrefixDataCollator: the label-task (`predict: `) and rationale-task (`explain: `)
  features of a batch each padded by DataCollatorForSeq2Seq (to the longest in the batch,
  labels padded with -100, decoder inputs made from the labels);
- TaskPrefixTrainer's step: two forward passes, loss = alpha * label loss +
  (1 - alpha) * rationale loss (Seq2SeqTrainer's one pass for the standard runs), then what
  Hugging Face Trainer does with its defaults: gradient norm clipped at 1, AdamW
  (transformers 4.24's, the paper's, or torch's) at 5e-5 decaying linearly to 0,
  autocast for bf16;
- greedy `generate` for the label task.

The network is transformers' T5ForConditionalGeneration carrying a dsbs_jax model's weights,
so both sides start from the same parameters; it runs on the CPU or a CUDA GPU (`device`).
This module serves tools/bench.py and tools/paper_step_check.py: it must not train for real
(no checkpoints, evaluation or data reading of its own), and must not import TensorFlow
(GPU machines lack it).
"""
import contextlib
import math
from typing import Optional, Sequence

import numpy as np
import torch
import transformers

from dsbs_jax import convert
from dsbs_jax import flops
from dsbs_jax import resources
from dsbs_jax.models import t5

# (input ids, target ids) of one example of one task, EOS included, no padding.
Segment = tuple[np.ndarray, np.ndarray]
OUT_OF_MEMORY_ERRORS = (torch.OutOfMemoryError,)


def hf_model(config: t5.T5Config, params,
             device: str = "cpu") -> transformers.T5ForConditionalGeneration:
  """transformers' T5 with `params` (a dsbs_jax parameter tree), on `device`."""
  hf_config = transformers.T5Config(**convert.hf_config(config))
  model = transformers.T5ForConditionalGeneration(hf_config)
  if not config.logits_via_embedding:
    # transformers >= 5 ties lm_head to the embedding whatever the config says; T5 v1.1
    # has its own output layer.
    model.lm_head = torch.nn.Linear(config.emb_dim, config.vocab_size, bias=False)
  weights = {name: torch.from_numpy(array.copy())
             for name, array in convert.hf_weights(params).items()}
  missing, unexpected = model.load_state_dict(weights, strict=False)
  untied_copies = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
  if set(missing) - untied_copies or unexpected:
    raise ValueError(f"weights do not fit transformers' T5: missing {missing}, "
                     f"unexpected {unexpected}")
  return model.to(device)


def autocast(dtype: str, device: str = "cpu"):
  """What Hugging Face Trainer's `bf16=True` does: bf16 autocast on the device."""
  if dtype == "bfloat16":
    return torch.autocast(device, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def synchronize(device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def peak_memory_bytes(device: str) -> Optional[int]:
  return torch.cuda.max_memory_allocated() if device == "cuda" else None


def release(device: str) -> None:
  """Hands cached accelerator memory back, so that the JAX side can have it."""
  if device == "cuda":
    torch.cuda.empty_cache()


class TaskPrefixCollator:
  """The paper's TaskPrefixDataCollator over already tokenized segments."""

  def __init__(self, model: transformers.T5ForConditionalGeneration):
    # The tokenizer only pads here (pad id 0, as the vocabulary's); ids come tokenized.
    tokenizer = transformers.T5Tokenizer(vocab_file=str(resources.VOCABULARY_FILE))
    self._collate = transformers.DataCollatorForSeq2Seq(tokenizer=tokenizer, model=model)

  def __call__(self, label_segments: Sequence[Segment],
               rationale_segments: Sequence[Segment]) -> dict:
    """{'pred': label-task tensors, 'expl': rationale-task tensors}; a task without
    segments in this batch is left out."""
    batch = {}
    for key, segments in (("pred", label_segments), ("expl", rationale_segments)):
      if segments:
        batch[key] = self._collate([{"input_ids": inputs.tolist(), "labels": targets.tolist()}
                                    for inputs, targets in segments])
    return batch


class TransformersAdamW(torch.optim.Optimizer):
  """transformers.AdamW as of 4.24 (removed since), the optimizer of the paper's runs:
  Hugging Face Trainer's default up to transformers 4.35. Rebuilt from its documented
  update: epsilon is added to sqrt(nu) before bias correction, and both corrections fold
  into the step size; weight decay (0 in the paper) is applied after the update."""

  def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0):
    super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                              "weight_decay": weight_decay})

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      beta1, beta2 = group["betas"]
      for param in group["params"]:
        if param.grad is None:
          continue
        state = self.state[param]
        if not state:
          state.update(step=0, exp_avg=torch.zeros_like(param),
                       exp_avg_sq=torch.zeros_like(param))
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = (group["lr"] * math.sqrt(1.0 - beta2 ** state["step"])
                     / (1.0 - beta1 ** state["step"]))
        param.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if group["weight_decay"] > 0.0:
          param.add_(param, alpha=-group["lr"] * group["weight_decay"])


def trainer_optimizer(model: torch.nn.Module, name: str, learning_rate: float,
                      total_steps: int):
  """(optimizer, scheduler) as Seq2SeqTrainer builds them with the paper's arguments:
  `name` 'adamw_hf' (transformers 4.24's default) or 'adamw_torch' (torch.optim.AdamW,
  the default since 4.36), betas 0.9 / 0.999, epsilon 1e-8, no weight decay, and the
  linear decay to 0 over total_steps without warm-up."""
  if name == "adamw_hf":
    optimizer = TransformersAdamW(model.parameters(), lr=learning_rate)
  elif name == "adamw_torch":
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=0.0, foreach=False)
  else:
    raise ValueError(f"unknown optimizer {name!r}: expected adamw_hf or adamw_torch")
  return optimizer, transformers.get_linear_schedule_with_warmup(optimizer, 0, total_steps)


class TaskPrefixStep:
  """One update of the paper's trainer: TaskPrefixTrainer.compute_loss (alpha * label loss +
  (1 - alpha) * rationale loss, or Seq2SeqTrainer's plain loss for a batch of the label
  task only: the standard fine-tuning and distillation runs), backward, the gradient norm
  clipped at 1 by torch.nn.utils.clip_grad_norm_, the optimizer's step and the scheduler's,
  as Hugging Face Trainer orders them."""

  def __init__(self, model: transformers.T5ForConditionalGeneration, alpha: float,
               total_steps: int, dtype: str, device: str = "cpu", learning_rate: float = 5e-5,
               optimizer: str = "adamw_torch"):
    self.model, self.alpha, self.dtype, self.device = model.train(), alpha, dtype, device
    self.optimizer, self.schedule = trainer_optimizer(model, optimizer, learning_rate,
                                                      total_steps)

  def __call__(self, batch: dict) -> float:
    weights = {"pred": self.alpha, "expl": 1.0 - self.alpha} if "expl" in batch else {"pred": 1.0}
    with autocast(self.dtype, self.device):
      loss = sum(weights[key] * self.model(**{name: tensor.to(self.device, non_blocking=True)
                                              for name, tensor in features.items()}).loss
                 for key, features in batch.items())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.optimizer.step()
    self.schedule.step()
    self.optimizer.zero_grad()
    return float(loss.detach())


def pad_inputs(segments: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
  """(input_ids, attention_mask) padded to the longest input, as the collator pads."""
  length = max(len(inputs) for inputs, _ in segments)
  input_ids = torch.zeros((len(segments), length), dtype=torch.long)
  for row, (inputs, _) in enumerate(segments):
    input_ids[row, :len(inputs)] = torch.from_numpy(inputs.astype(np.int64))
  return input_ids, (input_ids != 0).long()


def generate(model: transformers.T5ForConditionalGeneration, segments: Sequence[Segment],
             max_decode_length: int, dtype: str, device: str = "cpu") -> np.ndarray:
  """Greedy ids [batch, max_decode_length] without the start token, 0 after EOS."""
  input_ids, attention_mask = pad_inputs(segments)
  model.eval()
  with torch.inference_mode(), autocast(dtype, device):
    output = model.generate(input_ids=input_ids.to(device),
                            attention_mask=attention_mask.to(device),
                            max_new_tokens=max_decode_length, min_new_tokens=0,
                            do_sample=False, num_beams=1)
  ids = np.zeros((len(segments), max_decode_length), np.int32)
  generated = output[:, 1:].cpu().numpy()
  ids[:, :generated.shape[1]] = generated
  return ids


def matmul_peak(size: int, repeats: int, dtype: str = "float32", device: str = "cpu") -> float:
  """FLOP/s of a [size, size] matmul of `dtype` through torch, best of `repeats`."""
  x = torch.ones((size, size), dtype=getattr(torch, dtype), device=device)
  return flops.best_matmul_flops(lambda: (x @ x, synchronize(device)), size, repeats)
