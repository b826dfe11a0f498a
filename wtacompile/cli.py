"""``wtacompile plan CONFIG --mem-gb 24 --seq-len 2048``: plan a model from its config alone.

CONFIG is a Hugging Face ``config.json`` (or a folder holding one) or a model type such as
``llama``, with ``--set key=value`` overrides. The model is built on the meta device: nothing is
downloaded and no memory is allocated.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from pathlib import Path

import torch

from wtacompile.config import OPTIMIZER_STATES
from wtacompile.solver import DEFAULT_BUDGET_MENU

TASKS = ("causal-lm", "seq-cls", "seq2seq", "image-cls")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """A command-line mistake: reported as ``wtacompile plan: error: ...`` with exit status 2."""


def build_config(spec: str, overrides: list[str]):
    """A Hugging Face config from a file, folder or model type, with ``--set`` overrides applied.

    Raises:
        UsageError: malformed ``--set``, a key the config class does not have, or no such config.
    """
    from transformers import AutoConfig

    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set takes key=value, got {item!r}")
        try:
            values[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[key] = raw
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    data = {}
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise UsageError(f"no such config file: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not valid JSON: {err}") from None
        spec = data.pop("model_type", None)
        if spec is None:
            raise UsageError(f"{path} has no model_type")
    try:
        defaults = AutoConfig.for_model(spec)
    except ValueError:
        raise UsageError(f"unknown model type {spec!r} (e.g. llama, bert, gpt2, t5)") from None
    unknown = sorted(key for key in values if not hasattr(defaults, key))
    if unknown:
        raise UsageError(f"--set: {type(defaults).__name__} has no field {', '.join(map(repr, unknown))}; "
                         "check the spelling against the model's config.json")
    try:
        return AutoConfig.for_model(spec, **{**data, **values})
    except Exception as err:  # noqa: BLE001 - the config's own checks (huggingface_hub's are no ValueError)
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise UsageError(f"{type(defaults).__name__} rejects these values: {reason}") from None


def _positive(kind):
    """An argparse type: a finite number > 0 of ``kind``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def build_model(config, task: str, dtype: torch.dtype):
    """The ``task``'s model for ``config`` on the meta device.

    Raises:
        UsageError: transformers cannot build the task's model from this config (none for this
            model type, or a value the model rejects).
    """
    import transformers as tf

    auto = {
        "causal-lm": tf.AutoModelForCausalLM, "seq-cls": tf.AutoModelForSequenceClassification,
        "seq2seq": tf.AutoModelForSeq2SeqLM, "image-cls": tf.AutoModelForImageClassification,
    }[task]
    try:
        with torch.device("meta"):
            return auto.from_config(config, torch_dtype=dtype)
    except ValueError as err:  # e.g. no model class of this task for this model type
        raise UsageError(f"--task {task}: transformers cannot build this model from a "
                         f"{type(config).__name__}: {str(err).splitlines()[0]}") from None


PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


def with_lora(model, rank: int, alpha: float | None, targets: str, task: str | None = None):
    """``model`` wrapped by PEFT with LoRA adapters (``peft.get_peft_model``): the base is frozen
    (a classifier head stays trainable for ``seq-cls``, as PEFT's task type keeps it)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("--lora-rank builds the adapters with PEFT: pip install peft") from None
    target_modules = targets if targets == "all-linear" else [t for t in targets.split(",") if t]
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                        target_modules=target_modules, lora_dropout=0.0, task_type=PEFT_TASKS.get(task))
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. no module matches the targets
        raise SystemExit(f"--lora-targets: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wtacompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan keep ratios for a memory budget")
    p.add_argument("config", help="config.json path, a folder with one, or a model type (llama, bert, ...)")
    p.add_argument("--mem-gb", type=_positive(float), required=True, nargs="+", metavar="GB",
                   help="memory budget in GB (1e9 bytes); several: one line each (the model is traced "
                        "once for all), exit status 0 only if every one fits")
    p.add_argument("--seq-len", type=_positive(int), default=2048)
    p.add_argument("--batch-size", type=_positive(int), default=None, help="default: the largest that fits")
    p.add_argument("--lora-rank", type=_positive(int), default=None,
                   help="plan PEFT LoRA adapters of this rank on a frozen base")
    p.add_argument("--lora-alpha", type=_positive(float), default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated module names to adapt (default: all-linear, PEFT's preset)")
    p.add_argument("--task", choices=TASKS, default="causal-lm")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="adamw")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--no-recompute", action="store_true",
                   help="plan sampling alone (partitioner budget 1) instead of choosing recompute too")
    p.add_argument("--json", type=Path, help="also write the plan as JSON here")
    p.add_argument("--plot", type=Path, help="also draw the plan here (PNG/SVG/PDF; needs matplotlib)")
    args = parser.parse_args(argv)
    if len(args.mem_gb) > 1 and (args.json or args.plot):
        p.error("--json and --plot describe one plan: give one --mem-gb with them")

    from wtacompile.planning import plan

    try:
        config = build_config(args.config, args.set)
        if args.task == "seq-cls" and args.batch_size != 1 and getattr(config, "pad_token_id", 0) is None:
            # The classifier finds each row's last token by it; batches above 1 fail without one.
            raise UsageError(f"--task seq-cls: {type(config).__name__} sets no pad_token_id, which the "
                             "classifier needs above batch 1; add --set pad_token_id=0")
        model = build_model(config, args.task, DTYPES[args.dtype])
    except UsageError as err:
        p.error(str(err))
    if args.lora_rank:
        model = with_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.task)
    elif args.lora_alpha is not None or args.lora_targets != "all-linear":
        p.error("--lora-alpha and --lora-targets need --lora-rank")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{type(model).__name__}: {n_params / 1e9:.2f}B parameters, {n_train / 1e6:.1f}M trainable; "
          f"planning for {', '.join(f'{gb:g}' for gb in args.mem_gb)} GB ...", file=sys.stderr, flush=True)
    budgets = (1.0,) if args.no_recompute else DEFAULT_BUDGET_MENU
    results = []
    for mem_gb in args.mem_gb:  # later budgets reuse the graphs the first one traced
        start = time.perf_counter()
        results.append(plan(model, mem_gb, batch_size=args.batch_size, seq_len=args.seq_len,
                            optimizer=args.optimizer, activation_budgets=budgets))
        print(f"({mem_gb:g} GB planned in {time.perf_counter() - start:.1f} s)", file=sys.stderr)
    if len(results) == 1:
        (result,) = results
        print(result)
        if args.json:
            args.json.write_text(result.to_json())
        if args.plot:
            result.plot(args.plot)
    else:
        print(sweep_table(results))
    return 0 if all(r.fits for r in results) else 1


def sweep_table(plans) -> str:
    """One line per plan: does it fit, at what batch and peak, with what recompute and sampling."""
    from wtacompile.memory_model import format_bytes

    header = (f"{'mem GB':>7}  {'fits':<4}  {'batch':>5}  {'largest batch (dense)':>21}  {'peak':>10}  "
              f"{'recompute budget':>16}  {'sampled':>7}  {'step time':>9}")
    lines = [header, "-" * len(header)]
    for r in plans:
        plus = "+" if r.largest_batch_capped else ""
        dense_plus = "+" if plus and r.baseline_max_batch_size >= r.max_batch else ""
        largest = f"{r.max_batch_size}{plus} ({r.baseline_max_batch_size}{dense_plus})"
        lines.append(f"{r.mem_gb:>7g}  {'yes' if r.fits else 'no':<4}  {r.batch_size:>5}  "
                     f"{largest:>21}  {format_bytes(r.peak_bytes):>10}  "
                     f"{r.activation_memory_budget:>16g}  {len(r.keep_ratios):>7}  {r.predicted_step_time:>9.3f}")
    capped = {r.max_batch for r in plans if r.largest_batch_capped}
    if capped:
        lines.append(f"+: the search stops at max_batch={', '.join(map(str, sorted(capped)))}; "
                     "larger batches may fit too")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
