"""How long ``wtacompile.plan`` takes on full-size meta models (nothing allocated), each in a
fresh process (the first compile in a process pays for imports and warm-up; so does a user),
then in that process the same plan traced afresh (``reuse_traces=False``: what a warm process
pays to trace) and a plan at another budget (40 GB), which reuses the first plan's traced graphs
(what each further plan of a ``mem_gb`` sweep costs).

    python benchmarks/bench_planner_speed.py            # three blocks per run (the default)
    python benchmarks/bench_planner_speed.py --full     # and every block traced, for comparison
    python benchmarks/bench_planner_speed.py --below    # and plans below partitioner budget 1 (minutes)
    python benchmarks/bench_planner_speed.py --serial   # and each case with parallel_traces=False

Shapes: Llama-2-7B (32 layers, 4096/11008, bf16, seq 2048) at batch 1 and with the max-batch
search, the same with LoRA (PEFT, r=16 on q/v), and a 70B shape (80 layers, 8192/28672, GQA with 8
kv heads) with the search, with and without LoRA; budget 80 GB.

``--below``: the 7B's largest batch at partitioner budget 0.9 (``activation_budgets=(0.9,)``),
where the model is traced whole: the first plan, the same traced again, and a plan at budget
0.8, which splits the joint graphs the first traced instead of tracing again (what each further
budget of a search below 1 costs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}
CASES = [("7b", "batch 1", False), ("7b", "search", False), ("7b", "search", True), ("70b", "search", False),
         ("70b", "search", True)]

CHILD = r"""
import json, sys, time, torch, transformers as tf
from wtacompile import plan
shape, search, lora, compose, parallel = json.loads(sys.argv[1])
cfg = tf.LlamaConfig(vocab_size=32000, **shape)
with torch.device("meta"):
    model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
if lora:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
start = time.perf_counter()
p = plan(model, 80, batch_size=None if search else 1, seq_len=2048, compose_blocks=compose,
         parallel_traces=parallel)
first = time.perf_counter() - start
start = time.perf_counter()
plan(model, 80, batch_size=None if search else 1, seq_len=2048, compose_blocks=compose, reuse_traces=False,
     parallel_traces=parallel)
again = time.perf_counter() - start
start = time.perf_counter()
plan(model, 40, batch_size=None if search else 1, seq_len=2048, compose_blocks=compose)
reused = time.perf_counter() - start
print(json.dumps([first, again, reused, p.batch_size, p.max_batch_size, p.baseline_max_batch_size, p.peak_bytes]))
"""

BELOW = r"""
import json, sys, time, torch, transformers as tf
from wtacompile import plan
shape = json.loads(sys.argv[1])
with torch.device("meta"):
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32000, **shape)).to(torch.bfloat16)
times, plans = [], []
for budget, reuse in ((0.9, True), (0.9, False), (0.8, True)):
    start = time.perf_counter()
    plans.append(plan(model, 80, seq_len=2048, activation_budgets=(budget,), reuse_traces=reuse))
    times.append(time.perf_counter() - start)
print(json.dumps(times + [[p.batch_size, len(p.keep_ratios)] for p in (plans[0], plans[2])]))
"""


def run(shape: str, search: bool, lora: bool, compose: bool, parallel: bool = True) -> list:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([SHAPES[shape], search, lora, compose, parallel])],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also time the full trace (minutes)")
    parser.add_argument("--below", action="store_true", help="also time plans below partitioner budget 1 (minutes)")
    parser.add_argument("--serial", action="store_true",
                        help="also time each case with parallel_traces=False (the traces one after another)")
    args = parser.parse_args()
    print(f"{'shape':<6} {'case':<8} {'lora':<5} {'3 blocks/run':>14} {'again':>7} {'40 GB':>7} "
          f"{'serial':>7} {'again s':>7} {'every block':>12} {'batch':>6} {'max':>5} {'max dense':>9} {'same plan':>9}")
    for shape, case, lora in CASES:
        search = case == "search"
        fast = run(shape, search, lora, True)
        serial = run(shape, search, lora, True, parallel=False) if args.serial else None
        slow = run(shape, search, lora, False) if args.full else None
        same = "" if slow is None and serial is None else (
            "yes" if all(other[3:] == fast[3:] for other in (slow, serial) if other) else "NO")
        print(f"{shape:<6} {case:<8} {'yes' if lora else 'no':<5} {fast[0]:>13.1f}s {fast[1]:>6.1f}s {fast[2]:>6.2f}s "
              f"{(f'{serial[0]:.1f}s' if serial else '-'):>7} {(f'{serial[1]:.1f}s' if serial else '-'):>7} "
              f"{(f'{slow[0]:.1f}s' if slow else '-'):>12} {fast[3]:>6} {fast[4]:>5} {fast[5]:>9} {same:>9}",
              flush=True)
    if args.below:
        out = subprocess.run([sys.executable, "-c", BELOW, json.dumps(SHAPES["7b"])], capture_output=True,
                             text=True, check=True).stdout
        first, again, other, (batch_09, sampled_09), (batch_08, sampled_08) = json.loads(out.strip().splitlines()[-1])
        print(f"\n7b largest batch below partitioner budget 1 (the whole model traced)\n"
              f"{'budget 0.9 first':>17} {'again':>7} {'then 0.8':>9}   batch (sampled linears) at 0.9 / 0.8\n"
              f"{first:>16.1f}s {again:>6.1f}s {other:>8.1f}s   {batch_09} ({sampled_09}) / {batch_08} ({sampled_08})")


if __name__ == "__main__":
    main()
