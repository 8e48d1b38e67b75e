"""The flags of `dsbs eval`, `predict`, `tasks`, `plot` and `convert`, whose modules load
JAX, TensorFlow, SeqIO or Flax: declared apart from them so that a bad flag is refused in a
fraction of a second, before they load (importing one takes 5-20 s).

Each parser's `func` default is the name of the function, in the module cli.SUBCOMMANDS
names, that runs the command; cli imports that module once the flags are parsed. `dsbs
rationales` declares its flags in its own module, which is light; train, compile, export
and distill still declare theirs in their heavy modules (their parsers read constants
those modules own, such as the export formats), so their flags wait for the import.

This module must not import anything heavy, or run a command.
"""
import argparse

from dsbs_jax import distillation
from dsbs_jax import flags
from dsbs_jax import gin_utils
from dsbs_jax import resources


def _add_tasks(subparsers) -> None:
  parser = subparsers.add_parser(
      "tasks", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Lists every registered SeqIO task and mixture (the names MIXTURE_OR_TASK_NAME\n"
                  "takes) with its examples per split, as the gin flags given here set them;\n"
                  "custom datasets are those the gin flags register, as in training.",
      epilog="examples:\n  dsbs tasks --dataset cqa --examples 2\n"
             "  dsbs tasks --gin.TaskOptions.train_fraction=0.25")
  gin_utils.add_gin_arguments(parser)
  parser.add_argument("--examples", type=flags.positive_int, default=0, metavar="N",
                      help="print N preprocessed examples of each mixture")
  parser.add_argument("--dataset", action="append", default=[],
                      help="only this dataset (repeatable), e.g. cqa, svamp, esnli, anli1 or a "
                           "custom one the gin flags register")
  parser.set_defaults(func="run")


def _add_predict(subparsers) -> None:
  predict = subparsers.add_parser(
      "predict", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Labels raw inputs with a trained student, prefixed and tokenized as its\n"
                  "label task was in training, and writes one JSON line per input.",
      epilog="example:\n  dsbs predict --checkpoint /tmp/dsbs_quickstart --input questions.txt "
             "--output answers.jsonl --rationale")
  flags.add_checkpoint_arguments(predict)
  predict.add_argument("--input", required=True, metavar="FILE",
                       help="JSONL with 'input' (and 'id') per line, or plain text, one input "
                            "a line")
  predict.add_argument("--output", required=True, metavar="FILE.jsonl",
                       help="JSONL to write: id, input, prediction (and rationale)")
  predict.add_argument("--rationale", action="store_true",
                       help="also generate each input's rationale (the rationale task)")
  predict.add_argument("--method", default="greedy", choices=("greedy", "beam"),
                       help="decoding (default greedy; beam uses 4 beams)")
  predict.add_argument("--batch_size", type=flags.positive_int, default=32,
                       help="inputs decoded together (default 32)")
  predict.add_argument("--decode_length", type=flags.positive_int, default=None,
                       help="most tokens to generate (default: the run's target length)")
  predict.set_defaults(func="run_predict")


def _add_eval(subparsers) -> None:
  evaluate = subparsers.add_parser(
      "eval", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Decodes a split of a label task with a trained student and scores it with\n"
                  "the task's metrics; prints them as JSON and writes the predictions.",
      epilog="example:\n  dsbs eval --checkpoint /tmp/dsbs_quickstart --split validation "
             "--step latest")
  gin_utils.add_gin_arguments(evaluate)
  flags.add_checkpoint_arguments(evaluate)
  evaluate.add_argument("--task", default=None,
                        help="label task to score (default: the run's; `dsbs tasks` lists them)")
  evaluate.add_argument("--split", default="test", choices=distillation.SPLITS,
                        help="split to decode and score (default test)")
  evaluate.add_argument("--output", default=None, metavar="FILE.jsonl",
                        help="predictions JSONL (default: MODEL_DIR/predictions_SPLIT_stepN.jsonl)")
  evaluate.add_argument("--batch_size", type=flags.positive_int, default=32,
                        help="examples decoded together (default 32)")
  evaluate.set_defaults(func="run_eval")


def _add_plot(subparsers) -> None:
  parser = subparsers.add_parser(
      "plot", description="Draws the paper's data-efficiency figure (test accuracy against "
      "training-data fraction, per method) and every run's learning curves, as PNG files, "
      "from a folder of runs written by dsbs train. Example: dsbs plot runs/ --out figures/")
  parser.add_argument("runs_dir", help="folder of MODEL_DIRs written by dsbs train")
  parser.add_argument("--out", required=True, help="folder for the PNG files (created if needed)")
  parser.set_defaults(func="run")


CONVERT_DESCRIPTION = """\
Imports a pretrained T5 checkpoint (Hugging Face or T5X) into this project's model format.

    dsbs convert --from hf  SRC_DIR --out DIR
    dsbs convert --from t5x SRC     --out DIR \\
        (--gin_file FILE [--gin_search_path DIR] | --config NAME)

The output is what INITIAL_CHECKPOINT_PATH takes."""


def _add_convert(subparsers) -> None:
  parser = subparsers.add_parser(
      "convert", description=CONVERT_DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source_format", choices=("hf", "t5x"), required=True,
                      help="format of SOURCE: hf (a folder with config.json and weights, e.g. "
                           "from `hf download`) or t5x (a T5X checkpoint_N folder)")
  parser.add_argument("source", help="Hugging Face directory, or T5X checkpoint directory")
  parser.add_argument("--out", required=True, help="output model directory")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a model already at --out")
  model = parser.add_mutually_exclusive_group()
  model.add_argument("--gin_file", help="T5X only: gin file binding the model config: T5X's "
                     "(network.T5Config, e.g. t5x/examples/t5/t5_1_1/base.gin or the run's "
                     "config.gin) or one of this project's gin/models files")
  model.add_argument("--config", help=f"T5X only: a model name from {resources.GIN_MODELS_DIR}, "
                     "e.g. t5_1_1_base")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="folder in which to look for the gin file's includes (repeatable), "
                      "e.g. the T5X repository for T5X's model files")
  parser.add_argument("--dtype", help="activation dtype to record in the config, e.g. "
                      "bfloat16 (default: float32 for hf, the gin file's for t5x)")
  parser.set_defaults(func="run")


# Command -> the function that adds its parser.
PARSERS = {"eval": _add_eval, "predict": _add_predict, "plot": _add_plot, "tasks": _add_tasks,
           "convert": _add_convert}
