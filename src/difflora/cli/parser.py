"""The command-line grammar: one small function per command adds its subparser.

Each command's handler is given as ``"module:function"`` (``difflora.cli.commands.HANDLERS``) and
imported only when that command runs, so this module, and ``difflora --help``, stay light: they
know the flags and their help texts but nothing of what the commands do.
"""

from __future__ import annotations

import argparse
import math

from difflora import __version__
from difflora.errors import DiffloraError

__all__ = ["CLIError", "Parser", "build_parser", "count", "finite_float", "one_line"]

# Command name -> "module:function" of its handler.
Handlers = dict[str, str]


class CLIError(DiffloraError):
    """A bad command-line input: printed as `error: ...` with exit code 2."""


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that states each option's default: " (default: X)" is added unless the text already
    says what the default is, or there is none to state (None, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        quiet = quiet or not action.option_strings
        return text if quiet or "default" in text else f"{text} (default: %(default)s)"


def _given_once(parser: argparse.ArgumentParser, namespace: argparse.Namespace, key: str, flag: str) -> None:
    """Refuse a second ``key`` in one command line: argparse would let the last one win in silence."""
    given = namespace.__dict__.setdefault("_given", set())
    if key in given:
        parser.error(f"{flag} given twice; give it once")
    given.add(key)


class _StoreOnce(argparse._StoreAction):
    def __call__(self, parser, namespace, values, option_string=None):
        _given_once(parser, namespace, self.dest, option_string or self.dest)
        super().__call__(parser, namespace, values, option_string)


class _StoreTrueOnce(argparse._StoreTrueAction):
    def __call__(self, parser, namespace, values, option_string=None):
        _given_once(parser, namespace, self.dest, option_string or self.dest)
        super().__call__(parser, namespace, values, option_string)


class _AppendOnce(argparse._AppendAction):
    """A repeatable flag (``--set KEY=VALUE``, ``--condition NAME=VALUE``, ``--only ARM``): each KEY once."""

    def __call__(self, parser, namespace, values, option_string=None):
        key = str(values).partition("=")[0].strip()
        _given_once(parser, namespace, f"{self.dest}:{key}", f"{option_string} {key}")
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    # argparse prints its usage block and exits from inside parse_args; a CLIError instead gives
    # the one-line `error: ...` and exit code 2 of every other input error.
    def __init__(self, *args, **kwargs) -> None:
        # Every subparser is a Parser too (add_subparsers makes its own class's parsers).
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        # One rule for every flag of every command (subparsers are Parsers too): a flag given twice
        # is refused, never decided by position.
        for name, action in ((None, _StoreOnce), ("store", _StoreOnce), ("store_true", _StoreTrueOnce)):
            self.register("action", name, action)
        self.register("action", "append", _AppendOnce)

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def count(minimum: int):
    """argparse type: an integer of at least ``minimum`` (a negative count is refused, never read as 0)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer greater than or equal to {minimum}, got {text!r}")
        return value

    return parse


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused like any other non-number)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def one_line(message: str) -> str:
    """A message as one line: "head:\n  item\n  item" (several config keys, the paths a dataset
    was looked for at) becomes "head: item; item"; other line breaks become spaces."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    if lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return " ".join(lines)


_CKPT_HELP = "a step of the run (e.g. 1000) or a checkpoint directory (default: the newest intact one)"
_RUN_HELP = "a run directory written by `difflora train` (holds config.json and checkpoints/)"
_WEIGHTS_HELP = "ema: the EMA of the weights (what the run's grids show); model: the raw trained weights"
_DEVICE_HELP = "auto (cuda if available, else cpu), cpu, cuda or cuda:N"
_SAMPLER_HELP = "the sampler (default: the run's sample.sampler)"
_PROGRESS_HELP = "no progress bar"


def _with_config(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="a YAML config or a preset name under configs/ (e.g. digits, tiny-unet)")
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=2e-4 (repeatable)",
    )


def _add_train(sub, handlers: Handlers) -> None:
    t = sub.add_parser("train", help="train a model from a config")
    _with_config(t)
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact checkpoint")
    t.add_argument("--checkpoint", metavar="STEP|PATH", help="with --resume: the checkpoint to continue from")
    t.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    t.set_defaults(fn=handlers["train"])


def _add_guidance_fraction(parser) -> None:
    parser.add_argument(
        "--guidance-fraction",
        type=finite_float,
        default=None,
        metavar="F",
        help="selective guidance: CFG on the first (noisiest) fraction F of the steps only, conditional on the rest "
        "(default: the run's sample.guidance_fraction)",
    )


def _add_sample(sub, handlers: Handlers) -> None:
    s = sub.add_parser("sample", help="draw a sample grid from a trained run")
    s.add_argument("run_dir", help=_RUN_HELP)
    s.add_argument("--num", type=int, default=64, help="how many images to sample")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help=_SAMPLER_HELP)
    s.add_argument(
        "--eta", type=finite_float, default=None, help="DDIM eta (0 = deterministic; default: the run's sample.eta)"
    )
    s.add_argument(
        "--guidance",
        type=finite_float,
        default=None,
        help="classifier-free guidance scale (1 = none; default: the run's sample.guidance)",
    )
    _add_guidance_fraction(s)
    s.add_argument(
        "--teacher",
        action="store_true",
        help="a distilled run: sample its guided teacher (the LoRA off, CFG at --guidance) instead of the student",
    )
    s.add_argument(
        "--class",
        dest="cls",
        type=int,
        default=None,
        help="sample only this class (default: every class in turn, one per column)",
    )
    s.add_argument(
        "--condition",
        action="append",
        metavar="NAME=VALUE[,VALUE...]",
        help="a condition the run's adapters read, e.g. task=2: one value for all samples or one per sample (repeatable)",
    )
    s.add_argument(
        "--condition-images",
        metavar="FILE.safetensors",
        help="spatial tasks: clean images (tensor 'images') to compute the condition images from "
        "(default: the held-out split of the run's dataset)",
    )
    s.add_argument(
        "--prompt", action="append", help="a text pipeline's run: a prompt, cycled over the samples (repeatable)"
    )
    s.add_argument("--prompts", metavar="FILE", help="a text pipeline's run: a file of prompts, one per line")
    s.add_argument("--seed", type=count(0), default=0, help="the seed of the initial noise and of every sampler draw")
    s.add_argument("--weights", choices=["ema", "model"], default="ema", help=_WEIGHTS_HELP)
    s.add_argument("--checkpoint", metavar="STEP|PATH", help=_CKPT_HELP)
    s.add_argument("--device", default="auto", help=_DEVICE_HELP)
    s.add_argument("--out", metavar="FILE.png", help="write the samples as one PNG grid")
    s.add_argument(
        "--out-dir", metavar="DIR", help="write one PNG per image, DIR/000000.png, ... (the layout FID tools read)"
    )
    s.add_argument("--npz", metavar="FILE.npz", help="write the images as uint8 [N,H,W,C] under arr_0 (labels: arr_1)")
    s.add_argument("--overwrite", action="store_true", help="with --out-dir: replace a non-empty DIR")
    s.add_argument("--save-tensor", metavar="FILE.safetensors", help="also save the raw samples")
    s.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    s.set_defaults(fn=handlers["sample"])


def _add_distill(sub, handlers: Handlers) -> None:
    di = sub.add_parser(
        "distill", help="distil a class-conditional run's classifier-free guidance into a LoRA student (003)"
    )
    di.add_argument("teacher_run", help="the run directory of a trained class-conditional model (the teacher)")
    di.add_argument(
        "--guidance",
        type=finite_float,
        default=None,
        metavar="W",
        help="the teacher's guidance scale (default: the distill config's)",
    )
    di.add_argument(
        "--guidance-range",
        type=finite_float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="distil a guidance-scale LoRA serving every w in [LO, HI] (w drawn per sample)",
    )
    di.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="e.g. --set distill.rank=4 --set train.steps=500"
    )
    di.add_argument("--out", help="run directory (default runs/<teacher name>-distill)")
    di.add_argument("--resume", action="store_true", help="continue the distillation run in --out")
    di.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    di.set_defaults(fn=handlers["distill"])


def _add_params(sub, handlers: Handlers) -> None:
    pr = sub.add_parser("params", help="count a config's parameters (total, trainable, by group and module)")
    _with_config(pr)
    pr.add_argument("--json", action="store_true", help="print the counts as JSON")
    pr.set_defaults(fn=handlers["params"])


def _add_pretrain(sub, handlers: Handlers) -> None:
    pt = sub.add_parser("pretrain", help="train a shared base (configs/pretrain/NAME) into the cache, or reuse it")
    pt.add_argument("name", help="a preset under configs/pretrain/, e.g. fmnist16-unet or fmnist16-dit")
    pt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    pt.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    pt.set_defaults(fn=handlers["pretrain"])


def _add_plot_weights(sub, handlers: Handlers) -> None:
    pw = sub.add_parser("plot-weights", help="heatmap of a run's trained TimeLoRA composition weights (000 Figure 3)")
    pw.add_argument("run_dir", help=_RUN_HELP)
    pw.add_argument(
        "--layer",
        default=None,
        help="a wrapped layer's path or suffix, or 'all' to average every layer "
        "(default: middle_block.1.qkv in the U-Net, the median block's attn.qkv in a DiT)",
    )
    pw.add_argument("--adapter", default=None, help="adapter name (default: the run's only trainable one)")
    pw.add_argument("--weights", choices=["ema", "model"], default="ema", help=_WEIGHTS_HELP)
    pw.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/weights.png)")
    pw.set_defaults(fn=handlers["plot_weights"])


def _add_train_features(sub, handlers: Handlers) -> None:
    tf = sub.add_parser("train-features", help="train (or load the cached) feature network of a dataset for eval")
    tf.add_argument("dataset", help="a data name: digits, fashion-mnist, mnist, mnist-5k, cifar10, image-folder")
    tf.add_argument("--set", action="append", metavar="data.KEY=VALUE", help="e.g. --set data.image_size=16")
    tf.add_argument("--cache-dir", default=None, help="default $DIFFLORA_CACHE/features or ~/.cache/difflora/features")
    tf.add_argument("--feature-steps", type=int, default=None, help="optimizer steps of the feature net (default 600)")
    tf.add_argument("--device", default="auto", help=_DEVICE_HELP)
    tf.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    tf.set_defaults(fn=handlers["train_features"])


def _add_eval(sub, handlers: Handlers) -> None:
    ev = sub.add_parser("eval", help="sample from a run and score it against the held-out split (FD, KID, P/R)")
    ev.add_argument("run_dir", help=_RUN_HELP)
    ev.add_argument("--num-samples", type=int, default=1000, help="samples drawn and scored (per guidance scale)")
    ev.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    ev.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help=_SAMPLER_HELP)
    ev.add_argument(
        "--eta", type=finite_float, default=None, help="DDIM eta (0 = deterministic; default: the run's sample.eta)"
    )
    ev.add_argument(
        "--guidance",
        type=finite_float,
        nargs="+",
        default=None,
        help="one or more CFG scales: one result each (default: the run's sample.guidance)",
    )
    _add_guidance_fraction(ev)
    ev.add_argument(
        "--seed", type=count(0), default=0, help="the seed of the samples' noise and of the metrics' subsets"
    )
    ev.add_argument("--weights", choices=["ema", "model"], default="ema", help=_WEIGHTS_HELP)
    ev.add_argument("--checkpoint", metavar="STEP|PATH", help=_CKPT_HELP)
    ev.add_argument(
        "--out",
        default=None,
        help="output directory (default: kept by its settings in RUN_DIR/eval/<key>/, listed in RUN_DIR/eval/index.json, "
        "the newest also in RUN_DIR/eval or eval-teacher, eval-taskK, eval-vs-NAME)",
    )
    ev.add_argument(
        "--teacher",
        action="store_true",
        help="a distilled run: score its guided teacher (the LoRA off, CFG at each --guidance) instead of the student",
    )
    ev.add_argument(
        "--task",
        type=count(0),
        default=None,
        help="a multi-task run (data.tasks): score task K against its own dataset (default: data.name's task)",
    )
    ev.add_argument(
        "--against",
        metavar="DATASET",
        default=None,
        help="score the run's unconditional samples against another dataset's held-out split "
        "(e.g. an unadapted base against the dataset an adaptation targets; default: the run's own dataset)",
    )
    ev.add_argument("--feature-net", default=None, help="a saved feature network (default: the cached one)")
    ev.add_argument(
        "--cache-dir",
        default=None,
        help="feature network cache directory (default $DIFFLORA_CACHE/features or ~/.cache/difflora/features)",
    )
    ev.add_argument(
        "--feature-steps", type=int, default=None, help="feature net training steps if it must be trained (default 600)"
    )
    ev.add_argument("--device", default="auto", help=_DEVICE_HELP)
    ev.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    ev.set_defaults(fn=handlers["eval"])


def _add_study(sub, handlers: Handlers) -> None:
    st = sub.add_parser("study", help="run a study YAML (arms x seeds: train, eval) and write its markdown report")
    st.add_argument("study", help="a study YAML, e.g. experiments/timelora/digits.yaml")
    st.add_argument(
        "--out", default=None, help="output directory of the runs (default: the study's out, or runs/<name>)"
    )
    st.add_argument(
        "--report-dir",
        default=None,
        help="where <name>.md and its records go (default: the study's report_dir at its home; with --set: --out)",
    )
    st.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a config key for every arm (train.steps=20) or a study key (seeds=[0]); repeatable",
    )
    st.add_argument("--only", action="append", metavar="ARM", help="run only these arms (repeatable)")
    st.add_argument("--report-only", action="store_true", help="train nothing: rewrite the report from stored runs")
    st.add_argument(
        "--plan", action="store_true", help="write nothing: list what each run would do (train, resume, reuse, skip)"
    )
    st.add_argument(
        "--allow-dirty", action="store_true", help="run from uncommitted code; the report is marked NOT REPRODUCIBLE"
    )
    st.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    st.set_defaults(fn=handlers["study"])


def _add_sweep(sub, handlers: Handlers) -> None:
    sw = sub.add_parser("sweep", help="run a factorial sweep YAML (cells x seeds: train, eval) into one results table")
    sw.add_argument("sweep", help="a sweep YAML, e.g. experiments/design-space/sweep.yaml")
    sw.add_argument("--out", default=None, help="output directory (default: the sweep's out, or runs/<name>)")
    sw.add_argument("--plan", action="store_true", help="list the cells (and skipped ones) and run nothing")
    sw.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    sw.set_defaults(fn=handlers["sweep"])


def _add_anova(sub, handlers: Handlers) -> None:
    an = sub.add_parser("anova", help="ANOVA (type II) of a sweep's results: F, p, eta squared, effect plots")
    an.add_argument("results", help="a results table: <sweep out>/results.csv or results.jsonl")
    an.add_argument("--metric", action="append", help="the response column (repeatable; default fd)")
    an.add_argument(
        "--guidance", type=finite_float, default=None, help="rows of this guidance scale only (default: every row)"
    )
    an.add_argument("--interactions", action="store_true", help="also fit every two-factor interaction")
    an.add_argument("--out", default=None, help="output directory (default: <results dir>/anova)")
    an.set_defaults(fn=handlers["anova"])


def _add_config(sub, handlers: Handlers) -> None:
    c = sub.add_parser(
        "config", help="print a config resolved (every key, its default), explain a key, or the JSON schema"
    )
    c.add_argument("config", nargs="?", help="a YAML config or a preset name (e.g. digits); omit with --schema")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    c.add_argument(
        "--explain",
        metavar="KEY",
        help="a key's type, default and description, e.g. train.lr or model.adapters.0.rank ('' lists the sections)",
    )
    c.add_argument(
        "--schema", action="store_true", help="the JSON schema of a config file, with every key's description"
    )
    c.add_argument("--out", metavar="FILE", help="write to FILE instead of printing (default: print)")
    c.set_defaults(fn=handlers["config"])


def _add_runs(sub, handlers: Handlers) -> None:
    r = sub.add_parser("runs", help="a table of the runs under DIR: config differences, final loss, FD, speed")
    r.add_argument("dir", nargs="?", default="runs", help="a directory of runs (default runs/)")
    r.add_argument("--format", choices=["table", "csv"], default="table", help="print as aligned text or as CSV")
    r.add_argument("--csv", metavar="FILE", help="also write the table as CSV to FILE")
    r.add_argument("--sort", metavar="COLUMN", help="sort by a column, e.g. fd@w1 or loss (default: by run path)")
    r.add_argument(
        "--plot", metavar="OUT.png", help="also draw one score across the runs, with its 95%% intervals, into a PNG"
    )
    r.add_argument("--metric", metavar="COLUMN", help="the score --plot draws, e.g. fd@w2 (default: the first FD)")
    r.set_defaults(fn=handlers["runs"])


def _add_presets(sub, handlers: Handlers) -> None:
    pr = sub.add_parser("presets", help="list the shipped configs and studies, or copy one out to edit")
    pr.add_argument(
        "action", nargs="?", choices=["list", "copy"], default="list", help="list them (default) or copy one"
    )
    pr.add_argument("name", nargs="?", help="copy: the preset, as listed (digits, experiments/timelora/digits.yaml)")
    pr.add_argument("dest", nargs="?", help="copy: the file or directory to write (default: ./<file name>)")
    pr.set_defaults(fn=handlers["presets"])


def _add_demo(sub, handlers: Handlers) -> None:
    d = sub.add_parser("demo", help="train the digits preset on the embedded data and write a sample grid")
    d.add_argument("--out", default="runs/demo", help="run directory")
    d.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the digits preset, e.g. --set train.steps=200 (repeatable)",
    )
    d.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact checkpoint")
    d.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    d.add_argument("--eval-samples", type=int, default=500, help="samples scored at the end (0 = skip eval)")
    d.set_defaults(fn=handlers["demo"])


def _add_export(sub, handlers: Handlers) -> None:
    e = sub.add_parser(
        "export", help="write a run's adapters at fixed conditions as a peft LoRA, a diffusers LoRA or a merged model"
    )
    e.add_argument("run_dir", help=_RUN_HELP)
    e.add_argument(
        "--to",
        required=True,
        choices=["peft", "diffusers-lora", "diffusers"],
        help="peft: adapter directory; diffusers-lora: pytorch_lora_weights.safetensors; diffusers: merged model",
    )
    e.add_argument("out_dir", help="the directory to write")
    e.add_argument(
        "--condition",
        action="append",
        metavar="NAME=VALUE",
        help="the fixed value of a condition the adapters read, e.g. t=500 or task=-1 (no update); repeatable",
    )
    e.add_argument("--weights", choices=["ema", "model"], default="ema", help=_WEIGHTS_HELP)
    e.add_argument("--checkpoint", metavar="STEP|PATH", default=None, help=_CKPT_HELP)
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty OUT whole (--to diffusers of a run on a pipeline folder, which writes the whole pipeline)",
    )
    e.set_defaults(fn=handlers["export"])


def _add_export_peft(sub, handlers: Handlers) -> None:
    e = sub.add_parser(
        "export-peft", help="deprecated: `difflora export RUN --to peft OUT --condition NAME=0` writes the same"
    )
    e.add_argument("run_dir", help=_RUN_HELP)
    e.add_argument("out_dir", help="the peft adapter directory to write")
    e.add_argument("--adapter", default=None, help="the plain LoRA to export (default: the run's only adapter)")
    e.add_argument("--weights", choices=["ema", "model"], default="ema", help=_WEIGHTS_HELP)
    e.add_argument("--checkpoint", metavar="STEP|PATH", default=None, help=_CKPT_HELP)
    e.set_defaults(fn=handlers["export_peft"])


def _add_combine_tasks(sub, handlers: Handlers) -> None:
    m = sub.add_parser(
        "combine-tasks", help="one run serving the tasks of several runs on one base (task ids in the runs' order)"
    )
    m.add_argument("runs", nargs="+", metavar="RUN", help="runs that adapt the same base with task banks only")
    m.add_argument("--out", required=True, help="the combined run directory to create (must not exist)")
    m.set_defaults(fn=handlers["combine_tasks"])


def build_parser(handlers: Handlers) -> argparse.ArgumentParser:
    """The ``difflora`` parser; ``handlers`` maps each command (``train``, ``sample``, ...) to its function."""
    p = Parser(prog="difflora", description="Low-rank conditioning, adaptation and distillation of diffusion models.")
    p.add_argument("--version", action="version", version=f"difflora {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_sample,
        _add_distill,
        _add_params,
        _add_config,
        _add_pretrain,
        _add_plot_weights,
        _add_train_features,
        _add_eval,
        _add_study,
        _add_sweep,
        _add_anova,
        _add_runs,
        _add_presets,
        _add_demo,
        _add_export,
        _add_export_peft,
        _add_combine_tasks,
    ):
        add(sub, handlers)
    return p
