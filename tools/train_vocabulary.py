"""Trains the SentencePiece model for from-scratch students on the shipped training text.

Usage: python tools/train_vocabulary.py [--rationales rationales] [--vocab_size 8000]

Reads every dataset's train split in rationales/ (inputs where shipped, labels and teacher
rationales) and the NLI validation inputs (e-SNLI and ANLI R1 train inputs are not shipped);
never test text. Writes rationales/vocab/dsbs_spm_<k>k.model with T5's id conventions
(pad 0, eos 1, unk 2, no bos), so it drops in wherever the T5 vocabulary does, and with
the default task prefixes as single pieces.
Pretrained students use the T5 vocabulary instead (TaskOptions.vocabulary_path).
"""
import argparse
import io
import os
import sys

import sentencepiece as spm

from dsbs_jax import distillation
from dsbs_jax import rationales
from dsbs_jax import records
from dsbs_jax import resources

DATASETS = ("cqa", "svamp", "esnli", "anli1")
DEFAULT_PREFIX_SYMBOLS = [distillation.TaskOptions.label_prefix.strip(),
                          distillation.TaskOptions.rationale_prefix.strip()]


def training_text(rationales_dir):
  """Yields the lines the vocabulary is trained on."""
  for dataset in DATASETS:
    for split in ("train", "validation"):
      for record in records.read_split(rationales_dir, dataset, split):
        texts = [record.input, record.label] if record.input is not None else []
        if split == "train":
          texts += [record.rationale, record.teacher_label]
        for text in texts:
          for line in (text or "").replace(rationales.NLI_SEPARATOR, "\n").splitlines():
            if line.strip():
              yield line


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rationales", default=str(resources.RATIONALES_DIR))
  parser.add_argument("--vocab_size", type=int, default=8000)
  args = parser.parse_args(argv)
  out_dir = os.path.join(args.rationales, "vocab")
  os.makedirs(out_dir, exist_ok=True)
  prefix = os.path.join(out_dir, f"dsbs_spm_{args.vocab_size // 1000}k")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=training_text(args.rationales), model_writer=model,
      vocab_size=args.vocab_size, model_type="unigram", character_coverage=0.9999,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, input_sentence_size=2_000_000,
      shuffle_input_sentence=True, user_defined_symbols=DEFAULT_PREFIX_SYMBOLS, num_threads=os.cpu_count())
  with open(prefix + ".model", "wb") as f:
    f.write(model.getvalue())
  print(f"wrote {prefix}.model ({args.vocab_size} pieces)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
