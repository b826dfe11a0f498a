"""The libraries people train with: PEFT LoRA, the Hugging Face Trainer, DDP and FSDP2 (gloo),
plan pictures and the CLI's PEFT flags."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wtacompile
from hf_models import build

AOT = {"inner": "aot_eager"}
HERE = Path(__file__).parent


def _lora(model, targets=("q_proj", "v_proj", "up_proj")):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                            lora_dropout=0.0))


def test_peft_lora_trains_with_real_names_and_exclude():
    model, batch = build("llama")
    peft_model = _lora(model)
    names = {name for name, _ in peft_model.named_parameters()}
    exclude = ["base_model.model.model.layers.0.*"]
    compiled = torch.compile(peft_model, backend="wtacrs", options=dict(AOT, exclude=exclude))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    wtacompile.clear_reports()
    for _ in range(3):
        optimizer.zero_grad()
        loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    sites = [s for r in wtacompile.compile_reports() if r.training for s in r.sites]
    assert {s.weight for s in sites} <= names  # the names model.named_parameters() gives
    layer0 = [s for s in sites if s.weight.startswith("base_model.model.model.layers.0.")]
    layer1_a = [s for s in sites if ".layers.1." in s.weight and ".lora_A." in s.weight]
    assert layer0 and all(not s.sampled for s in layer0)
    assert all(s.reason.startswith(("excluded", "frozen")) for s in layer0)
    assert layer1_a and all(s.sampled for s in layer1_a)
    bases = [s for s in sites if ".base_layer." in s.weight]
    assert bases and all(not s.sampled and s.freed_bytes == 0 for s in bases)  # frozen: saves nothing
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".layers.1." in n and "lora_B" in n for n in changed)


def test_lora_adapters_beside_q_and_v_share_one_draw_in_bf16():
    """PEFT keeps a bf16 model's adapters in fp32 and casts their input once per adapter; the two
    casts are one value, so q's and v's lora_A share one draw (and the plan traces, where it
    once found two draws whose row norms the trace had merged)."""
    model, batch = build("llama")
    peft_model = _lora(model.to(torch.bfloat16), targets=("q_proj", "v_proj"))
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float32
    compiled = torch.compile(peft_model, backend="wtacrs", options=dict(AOT, keep_ratio=0.5))
    wtacompile.clear_reports()
    compiled(**batch).loss.float().backward()
    sampled = [s for r in wtacompile.compile_reports() if r.training for s in r.sites if s.sampled]
    adapters = [s for s in sampled if ".lora_A." in s.weight]
    assert len(adapters) == 4 and all("input shared by 2 linears" in s.reason for s in adapters)
    assert len({s.input_root for s in adapters}) == 2  # one per layer
    with torch.device("meta"):
        meta_model, _ = build("llama")
    planned = wtacompile.plan(_lora(meta_model.to(torch.bfloat16), targets=("q_proj", "v_proj")),
                              24, batch_size=2, seq_len=16)
    rows = {layer.weight: layer for layer in planned.layers if ".layers.0." in layer.weight and ".lora_A." in layer.weight}
    assert len(rows) == 2 and len({layer.keep_ratio for layer in rows.values()}) == 1  # one input, one ratio


def test_trainer_with_model_compiled_in_place(tmp_path):
    """``model.compile(backend="wtacrs")`` compiles in place: the Trainer still sees the model's
    class and ``forward`` signature (it drops dataset columns the signature lacks, which an
    ``OptimizedModule``'s ``*args, **kwargs`` would make all of them). accelerate's
    ``DynamoBackend`` enum has no place for third-party backends, so ``torch_compile_backend=
    "wtacrs"`` in TrainingArguments cannot work; README says so."""
    from transformers import Trainer, TrainingArguments

    model, batch = build("bert")
    data = [{k: v[i] for k, v in batch.items()} for i in range(2)] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    wtacompile.clear_reports()
    model.compile(backend="wtacrs", options=dict(AOT, keep_ratio=0.3))
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(r.sampled_sites for r in wtacompile.compile_reports())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(wrapper: str, tmp_path) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), str(rank), "2", str(port),
                               wrapper, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_ranks_agree(wrapper, tmp_path):
    """Each rank samples its own rows (its own seed) from its own batch; the all-reduced
    gradients are identical on both ranks."""
    ranks = _run_two_ranks(wrapper, tmp_path)
    assert all(r["sampled"] > 0 for r in ranks)
    for name, grad in ranks[0]["grads"].items():
        assert torch.equal(grad, ranks[1]["grads"][name]), name


def test_plan_plot_and_cli_flags(tmp_path, capsys):
    from wtacompile.cli import main

    model, batch = build("bert")
    result = wtacompile.plan(model, 1.0, example_inputs=batch, inner="aot_eager")
    picture = tmp_path / "plan.png"
    result.plot(picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "cli.png"
    code = main(["plan", "llama", "--mem-gb", "0.05", "--seq-len", "32", "--dtype", "fp32",
                 "--set", "hidden_size=64", "--set", "intermediate_size=128",
                 "--set", "num_hidden_layers=2", "--set", "num_attention_heads=4",
                 "--set", "num_key_value_heads=4", "--set", "vocab_size=256",
                 "--lora-rank", "4", "--lora-targets", "q_proj,v_proj", "--plot", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"[-48:] in printed


def test_world_size_shards_parameter_state():
    model, _ = build("llama")
    one = wtacompile.plan(model, 1.0, batch_size=2, seq_len=16, inner="aot_eager")
    four = wtacompile.plan(model, 1.0, batch_size=2, seq_len=16, inner="aot_eager", world_size=4)
    for part in ("parameters", "gradients", "optimizer"):
        assert four.breakdown[part] == -(-one.breakdown[part] // 4)
    assert four.breakdown["activations"] == one.breakdown["activations"]  # per rank, unsharded


def test_plan_too_big_for_one_device_names_the_fsdp_world_size():
    import re

    model, _ = build("llama")
    one = wtacompile.plan(model, 1.0, batch_size=1, seq_len=4, inner="aot_eager")
    budget = one.peak_bytes * 0.5 / 1e9  # the parameter state is most of this tiny model's peak
    small = wtacompile.plan(model, budget, batch_size=1, seq_len=4, inner="aot_eager")
    assert not small.fits and "0.0 GB" not in small.advice and "kB" in small.advice
    world_size = int(re.search(r"world_size=(\d+)", small.advice).group(1))
    assert wtacompile.plan(model, budget, batch_size=1, seq_len=4, inner="aot_eager",
                           world_size=world_size).fits
    assert not wtacompile.plan(model, budget, batch_size=1, seq_len=4, inner="aot_eager",
                               world_size=world_size // 2).fits  # the smallest that fits
