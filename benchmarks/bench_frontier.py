"""The memory–time frontier: Inductor's activation_memory_budget against wtacrs, side by side.

    python benchmarks/bench_frontier.py --families llama bert --budgets 1 0.5 --ratios 0.3 0.1 \
        --steps 8 --png frontier.png [--unmatched 0.3]

For each family and each partitioner budget B, Inductor alone and wtacrs at each keep ratio (its
inner compiler Inductor, under the same B as the user would set it: a sampled graph is compiled
at a larger budget where that saves no more than Inductor at B, ``match_budget_bytes``;
``--unmatched`` adds arms compiled at B itself) train the same model from the same weights with
AdamW.
The arms' steps are interleaved round-robin in one process, so machine noise hits all alike;
each arm's step time is the median over its timed steps. Saved bytes are counted by
SavedTensorMeter (distinct non-parameter storages autograd saves), independently of the
backend's own report; GPU peak memory is added where a GPU is present. Every ratio is to
Inductor at budget 1 on the same model, all from this one run; ``saved/B`` and ``time/B`` are to
Inductor alone at the arm's own budget B.

On Linux the benchmark re-runs itself with glibc's allocator told to keep freed memory
(``GLIBC_TUNABLES``, :data:`KEEP_FREED_MEMORY`; ``--system-malloc`` leaves it alone): by default
glibc returns each large freed block to the OS and the next step faults it back in, measured at
40–65 thousand page faults per training step here (the sampled arms more), which moved single
steps of one arm by ±25% on a quiet machine. Kept, ~200 per step. PyTorch's CPU tuning guide
recommends an allocator that reuses memory (jemalloc, TCMalloc) for the same reason.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import time

import torch

import wtacompile
from wtacompile.backend import wtacrs_backend

FAMILIES = ("llama", "bert", "t5", "gpt2")
#: glibc malloc settings that keep freed memory for reuse: blocks up to 32 MiB (glibc's largest
#: mmap threshold) come from the heap, which is trimmed only past 4 GiB of free top.
KEEP_FREED_MEMORY = ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296:"
                     "glibc.malloc.top_pad=268435456")


def keeps_freed_memory() -> bool:
    """Whether this process runs with :data:`KEEP_FREED_MEMORY`."""
    return KEEP_FREED_MEMORY in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> None:
    """Re-run this process with :data:`KEEP_FREED_MEMORY` (Linux with glibc; once)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or keeps_freed_memory():
        return
    tunables = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), KEEP_FREED_MEMORY)))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})


def build(family: str):
    """(model, batch) at the benchmark sizes, random init, dropout off."""
    import transformers as tf

    torch.manual_seed(0)
    vocab = 8192
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
        model, (b, s) = tf.LlamaForCausalLM(cfg), (8, 256)
    elif family == "bert":  # all-MiniLM-L6-v2's shape
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                            num_attention_heads=12, max_position_embeddings=512, num_labels=4,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model, (b, s) = tf.BertForSequenceClassification(cfg), (32, 128)
    elif family == "t5":  # T5's ReLU feed-forward
        cfg = tf.T5Config(vocab_size=vocab, d_model=384, d_kv=64, d_ff=1536, num_layers=4, num_heads=6,
                          dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, feed_forward_proj="relu")
        model, (b, s) = tf.T5ForConditionalGeneration(cfg), (8, 128)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=384, n_layer=4, n_head=6, n_positions=512,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model, (b, s) = tf.GPT2LMHeadModel(cfg), (8, 256)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    ids = torch.randint(5, vocab, (b, s))
    if family == "bert":
        batch = dict(input_ids=ids, labels=torch.randint(0, 4, (b,)))
    elif family == "t5":
        batch = dict(input_ids=ids, labels=torch.randint(5, vocab, (b, s // 4)))
    else:
        batch = dict(input_ids=ids, labels=ids)
    return model.train(), batch


class Arm:
    """One configuration: its own copy of the model, optimizer and compiled function."""

    def __init__(self, name, base, batch, budget, keep_ratio, device, options=None):
        from torch._inductor.compile_fx import compile_fx

        self.name, self.budget, self.keep_ratio, self.batch = name, budget, keep_ratio, batch
        self.model = copy.deepcopy(base)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        # A distinct backend object per arm: dynamo must not reuse another arm's compiled code.
        if keep_ratio is None and options is None:
            backend = functools.partial(compile_fx)
        else:
            backend = functools.partial(wtacrs_backend, options=options or {"keep_ratio": keep_ratio})
        self.fn = torch.compile(self.model, backend=backend)
        self.times: list[float] = []
        self.device = device

    def _budget(self):
        return torch._functorch.config.patch(activation_memory_budget=self.budget)

    def step(self) -> float:
        with self._budget():
            if self.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.fn(**self.batch).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

    def measure_memory(self) -> tuple[int, int | None]:
        with self._budget():
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with wtacompile.SavedTensorMeter(self.model.parameters()) as meter:
                loss = self.fn(**self.batch).loss
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else None
        return meter.activation_bytes, peak


def run_family(family, budgets, ratios, steps, warmup, device, log, row_scores=("gradient",), unmatched=()):
    base, batch = build(family)
    base.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    arms = []
    for budget in budgets:
        arms.append(Arm(f"inductor @{budget:g}", base, batch, budget, None, device))
        for ratio in ratios:
            for scores in row_scores:
                tag = "" if len(row_scores) == 1 else f" {scores}"
                arms.append(Arm(f"wtacrs {ratio:g}{tag} @{budget:g}", base, batch, budget, ratio, device,
                                options={"keep_ratio": ratio, "row_scores": scores}))
        for ratio in unmatched if budget < 1 else ():
            arms.append(Arm(f"wtacrs {ratio:g} at B @{budget:g}", base, batch, budget, ratio, device,
                            options={"keep_ratio": ratio, "match_budget_bytes": False}))
    for arm in arms:
        start = time.perf_counter()
        for _ in range(warmup):
            arm.step()
        log(f"  {family}: compiled and warmed {arm.name} in {time.perf_counter() - start:.0f} s")
    memory = {arm.name: arm.measure_memory() for arm in arms}
    for _ in range(steps):
        for arm in arms:
            arm.times.append(arm.step())
    return [(arm, statistics.median(arm.times), *memory[arm.name]) for arm in arms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.7, 0.5, 0.3])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.1])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per arm (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--png", default=None, help="write the frontier picture here (needs matplotlib)")
    parser.add_argument("--row-scores", nargs="+", choices=("gradient", "norm"), default=["gradient"],
                        help="wtacrs arms per scoring: learned ‖dY‖ prediction (default) and/or ‖X‖ alone")
    parser.add_argument("--unmatched", nargs="*", type=float, default=[],
                        help="keep ratios also run with match_budget_bytes=False (the sampled graph "
                             "at the budget itself, not raised to the budget's bytes): before/after")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (it returns freed memory to the OS "
                             "and faults it back each step: slower and noisier CPU steps)")
    args = parser.parse_args()
    if not args.system_malloc:
        keep_freed_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    malloc = "glibc keeps freed memory" if keeps_freed_memory() else "system malloc"
    print(f"device: {where} ({malloc}); ratios to Inductor at budget 1; {args.steps} interleaved steps per arm")
    header = (f"{'family':<7} {'arm':<26} {'saved MiB':>10} {'x saved':>8} {'step ms':>9} {'x time':>7}"
              f" {'saved/B':>8} {'time/B':>7}"
              + (f" {'peak MiB':>9} {'x peak':>7}" if device == "cuda" else ""))
    results = {}
    for family in args.families:
        rows = run_family(family, args.budgets, args.ratios, args.steps, args.warmup, device,
                          lambda s: print(s, flush=True), tuple(args.row_scores), tuple(args.unmatched))
        results[family] = rows
        ref = next(r for r in rows if r[0].keep_ratio is None and r[0].budget == 1.0) \
            if 1.0 in args.budgets else rows[0]
        print(header)
        print("-" * len(header))
        for arm, median, saved, peak in rows:
            alone = next(r for r in rows if r[0].keep_ratio is None and r[0].budget == arm.budget)
            line = (f"{family:<7} {arm.name:<26} {saved / 2**20:>10.1f} {saved / ref[2]:>8.3f} "
                    f"{median * 1e3:>9.0f} {median / ref[1]:>7.3f} {saved / alone[2]:>8.3f} {median / alone[1]:>7.3f}")
            if peak is not None:
                line += f" {peak / 2**20:>9.0f} {peak / ref[3]:>7.3f}"
            print(line, flush=True)
        print()
    if args.png:
        plot(results, args.png)
        print(f"wrote {args.png}")


def plot(results, path: str) -> None:
    """One panel per family: saved-bytes ratio against step-time ratio, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (family, rows) in zip(axes[0], results.items()):
        ref = next((r for r in rows if r[0].keep_ratio is None and r[0].budget == 1.0), rows[0])
        methods = {}
        for arm, median, saved, _ in rows:
            label = "Inductor (budget)" if arm.keep_ratio is None else arm.name.rsplit(" @", 1)[0]
            methods.setdefault(label, []).append((arm.budget, median / ref[1], saved / ref[2]))
        for label, points in methods.items():
            points.sort(reverse=True)
            ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=label)
            for budget, x, y in points:
                ax.annotate(f"{budget:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(family)
        ax.set_xlabel("step time / Inductor")
        ax.set_ylabel("saved activations / Inductor")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Memory–time frontier (points: partitioner budget; lower left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
