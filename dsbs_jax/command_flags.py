"""The flags of `dsbs eval`, `predict`, `tasks`, `plot`, `convert`, `train`, `compile`,
`export` and `distill`, whose modules load JAX, TensorFlow, SeqIO or Flax: declared apart
from them so that --help and a bad flag answer in a fraction of a second, before they load
(importing one takes 5-20 s). The constants these parsers show (export formats, compile
steps, beam defaults) live here, and the heavy modules read them from here.

Each parser's `func` default is the name of the function, in the module cli.SUBCOMMANDS
names, that runs the command; cli imports that module once the flags are parsed. `dsbs
rationales` declares its flags in its own module, which is light.

This module must not import anything heavy, or run a command.
"""
import argparse
import ast
import importlib.util
import os

from dsbs_jax import distillation
from dsbs_jax import flags
from dsbs_jax import gin_utils
from dsbs_jax import records
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


def docstring_summary(module_name: str) -> str:
  """The first paragraph of a module's docstring, read from its source without importing it."""
  path = importlib.util.find_spec(module_name).origin
  with open(path, encoding="utf-8") as f:
    return ast.get_docstring(ast.parse(f.read())).split("\n\n")[0]


RUN_GIN_FILE = resources.GIN_DIR / "runs" / "train.gin"
TRAIN_DESCRIPTION = """\
Trains a student as the gin files say: a T5 (gin/models/*.gin) on a SeqIO mixture of the
label and rationale tasks, logging both losses, checkpointing and validating as it goes,
then scores the validation and test splits with the checkpoint best on validation. Outputs
go to MODEL_DIR. Rerunning the same command resumes from MODEL_DIR's latest checkpoint;
settings that do not fit that run are refused before anything is written."""
TRAIN_EXAMPLES = """\
examples:
  dsbs train --gin_file=quickstart.gin
  dsbs train --gin_file=quickstart.gin --gin.MODEL_DIR="'/tmp/run2'" --gin.TRAIN_STEPS=600
  dsbs train --gin_file=models/t5_1_1_small.gin --gin_file=runs/train.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'svamp_dsbs_teacher'" --gin.MODEL_DIR="'/tmp/svamp'" \\
      --gin.TRAIN_STEPS=2000
  dsbs train ... --gin.train.restore_step=400   # go back to step 400, dropping later ones"""


def macros_help() -> str:
  """The opening comment of gin/runs/train.gin, which lists its required and common macros."""
  if not os.path.isfile(RUN_GIN_FILE):
    return ""
  with open(RUN_GIN_FILE, encoding="utf-8") as f:
    header = f.read().split("\n\n")[0].splitlines()
  return "macros (gin/runs/train.gin, included by every run file):\n" + "\n".join(
      "  " + line.lstrip("#")[1:] for line in header if line.startswith("#"))


def _add_train(subparsers) -> None:
  parser = subparsers.add_parser("train", description=TRAIN_DESCRIPTION,
                                 epilog=macros_help() + "\n\n" + TRAIN_EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_arguments(parser)
  hosts = parser.add_argument_group(
      "several hosts (jax.distributed; start the same command on each; not needed on Cloud "
      "TPU VMs, where the slice's workers are found by JAX)")
  hosts.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                     help="address of process 0")
  hosts.add_argument("--num_processes", type=flags.positive_int, default=None,
                     help="number of processes (hosts) in the run")
  hosts.add_argument("--process_id", type=int, default=None,
                     help="this process's index, 0 to num_processes - 1")
  parser.set_defaults(func="run")


COMPILE_STEPS = ("train", "eval", "decode")
COMPILE_DESCRIPTION = """\
Compiles a run's train, eval and decode steps ahead of time for a target you need not have
(a TPU slice, through libtpu, or NVIDIA GPUs, through JAX's CUDA plugin, on any machine; or
cpu:N) with the same gin flags as
`dsbs train`, and prints per chip: the HBM needed against the chip's capacity and whether
it fits, the collectives, the compiler's FLOP and byte counts, compile time, and a roofline
bound on step time and MFU from data-sheet peaks. A train step that does not fit is
compiled again with one change at a time (microbatches, rematerialization, FSDP, a larger
slice) to say which would fit."""
COMPILE_EXAMPLES = """\
examples:
  dsbs compile --topology=v5p:2x2x2 --gin_file=models/t5_1_1_base.gin --gin_file=runs/paper.gin \\
      --gin.PARALLELISM="'fsdp'" --gin.MESH_SHAPE="(-1, 1)"
  dsbs compile --topology=v5e:2x4 --gin_file=quickstart.gin --gin.PARALLELISM="'fsdp'"
  dsbs compile --topology=h100:8 --gin_file=models/t5_1_1_base.gin --gin_file=runs/paper.gin
  dsbs compile --topology=cpu:8 --gin_file=quickstart.gin --steps train"""


def _step_list(text: str) -> tuple:
  steps = tuple(step.strip() for step in text.split(",") if step.strip())
  unknown = [step for step in steps if step not in COMPILE_STEPS]
  if unknown or not steps:
    raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of "
                                     f"{', '.join(COMPILE_STEPS)}")
  return steps


def _add_compile(subparsers) -> None:
  parser = subparsers.add_parser("compile", description=COMPILE_DESCRIPTION,
                                 epilog=COMPILE_EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_arguments(parser)
  parser.add_argument("--topology", required=True,
                      help="target: a TPU slice as <generation>:<chips per axis> (v4, v5e, "
                           "v5p, v6e; e.g. v5p:4x4x4), N slices as <N>x<slice> (2xv5e:16x16), "
                           "NVIDIA GPUs as <gpu>:<per host> or <gpu>:<hosts>x<per host> (h100, "
                           "h200, a100, a100-40gb; e.g. h100:8, h200:2x8), or cpu:N")
  parser.add_argument("--steps", type=_step_list, default=COMPILE_STEPS, metavar="LIST",
                      help="which steps to compile, comma-separated (default: train,eval,decode)")
  parser.add_argument("--no_knobs", action="store_true",
                      help="when the train step does not fit, do not try other settings")
  parser.add_argument("--hbm_gib", type=float, default=None, metavar="GIB",
                      help="memory per chip to fit in, instead of the chip's data-sheet HBM "
                           "(e.g. what other work on the chips leaves free)")
  parser.add_argument("--json", metavar="FILE",
                      help="also append the report to FILE as one JSON line")
  parser.add_argument("--write_gin", metavar="FILE",
                      help="write a gin file that `dsbs train --gin_file=FILE` runs: these "
                           "gin flags, plus the first knob that fit when the run did not")
  parser.set_defaults(func="run")


# The formats of `dsbs export`, and its beam search's defaults (export.DecodeOptions).
EXPORT_FORMATS = ("hf", "saved_model")
DEFAULT_NUM_BEAMS = 4
DEFAULT_LENGTH_PENALTY = 0.6  # T5X's `alpha`


def _add_export(subparsers) -> None:
  parser = subparsers.add_parser(
      "export", description=docstring_summary("dsbs_jax.export"),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  flags.add_checkpoint_arguments(parser)
  parser.add_argument("--format", dest="export_format", required=True, choices=EXPORT_FORMATS,
                      help="hf: a Hugging Face T5 folder; saved_model: a TF SavedModel that "
                           "decodes raw strings")
  parser.add_argument("--out", required=True, help="directory to write (must not exist)")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  parser.add_argument("--decode", default="greedy", choices=("greedy", "beam"),
                      help="saved_model: decoding inside the graph")
  parser.add_argument("--num_beams", type=flags.positive_int, default=DEFAULT_NUM_BEAMS,
                      help=f"beams for --decode beam (default {DEFAULT_NUM_BEAMS})")
  parser.add_argument("--length_penalty", type=float, default=DEFAULT_LENGTH_PENALTY,
                      help="beam search's length penalty: finished beams score log P / "
                           f"((5 + length) / 6) ** it (default {DEFAULT_LENGTH_PENALTY})")
  parser.add_argument("--alpha", dest="length_penalty", type=float, action=flags.DeprecatedAlias,
                      help="deprecated name of --length_penalty, removed in the next release")
  parser.add_argument("--decode_length", type=flags.positive_int, default=None,
                      help="most tokens to generate (default: the run's target length)")
  parser.add_argument("--with_rationales", action="store_true",
                      help="saved_model: also return a generated rationale per input")
  parser.set_defaults(func="run")


# dsbs distill's name for --max_tokens_total: the teacher's tokens, not the student's.
DISTILL_TOKEN_CAP_FLAG = "--max_teacher_tokens"
# After the first paragraph of distill.py's docstring, read when distill's parser is built
# (not on every command's start: it parses that module's source).
DISTILL_STAGES = """

Stage 1 asks the teacher for a rationale and a label per input (resumable per example),
then the student trains on the custom dataset this makes (resumable per checkpoint), is
scored on validation and test, and exported; DIR/report.md sums it up. Rerun the same
command to resume; a complete stage is skipped."""


def _add_distill(subparsers) -> None:
  # Light, but no other command's flags need it: imported for this one only.
  from dsbs_jax import teacher_command  # pylint: disable=import-outside-toplevel
  parser = subparsers.add_parser(
      "distill", description=docstring_summary("dsbs_jax.distill") + DISTILL_STAGES,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="example (README, 'Your own data, end to end'):\n"
             "  python -m dsbs_jax.replay_teacher --dataset cqa --port 8000 &\n"
             "  dsbs distill --inputs rationales/examples/distill/questions.jsonl \\\n"
             "    --test rationales/examples/distill/test.jsonl --prompt rationales/prompts/cqa.json \\\n"
             "    --teacher http://127.0.0.1:8000/v1 --teacher_model palm-replay \\\n"
             "    --student t5_1_1_tiny --gin_file=distill_cpu.gin --steps 200 \\\n"
             "    --out /tmp/dsbs_distill --export hf")
  parser.add_argument("--inputs", required=True, metavar="FILE.jsonl",
                      help='examples, one {"id", "input", "label"?} per line; labels all or none')
  parser.add_argument("--prompt", required=True, metavar="FILE",
                      help="few-shot prompt file (rationales/prompts/README.md); its parser "
                           "reads the teacher's outputs and picks the metric")
  parser.add_argument("--student", required=True,
                      help="gin model (e.g. t5_1_1_small), a .gin file, or a converted checkpoint "
                           "folder (dsbs convert) to fine-tune")
  parser.add_argument("--out", required=True, metavar="DIR", help="the run folder; rerun to resume")
  parser.add_argument("--test", default=None, metavar="FILE.jsonl",
                      help="test examples (gold labels give true accuracy); default: "
                           f"{records.VALID_FRACTION:.0%}% of the inputs held out")
  parser.add_argument("--name", default=None,
                      help="dataset name for the tasks and mixtures (default: from --inputs)")
  parser.add_argument("--steps", type=flags.positive_int, default=1000,
                      help="training steps of the student (default 1000)")
  parser.add_argument("--alpha", type=float, default=0.5,
                      help="label-task weight, 0 < alpha < 1 (default 0.5)")
  parser.add_argument("--use_gold", action="store_true",
                      help="train on the inputs' gold labels (<name>_dsbs_gold) instead of the "
                           "teacher's")
  parser.add_argument("--drop_unparsed", action="store_true",
                      help="leave out inputs whose teacher output did not parse (reported either way)")
  parser.add_argument("--export", default="", metavar="FORMATS",
                      help=f"comma-separated export formats: {', '.join(EXPORT_FORMATS)}")
  parser.add_argument("--vocabulary", default=None, metavar="FILE.model",
                      help="SentencePiece model (default: the shipped 8k one; T5's for a "
                           "pretrained --student, with --gin.VOCABULARY_EXTRA_IDS=100)")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the requests stage 1 would send and a token estimate; send none")
  teacher_command.add_client_arguments(parser, model_flag="--teacher_model",
                                       token_cap_flag=DISTILL_TOKEN_CAP_FLAG)
  gin_utils.add_gin_arguments(parser)
  parser.set_defaults(func="run")


# Command -> the function that adds its parser.
PARSERS = {"eval": _add_eval, "predict": _add_predict, "plot": _add_plot, "tasks": _add_tasks,
           "convert": _add_convert, "train": _add_train, "compile": _add_compile,
           "export": _add_export, "distill": _add_distill}
