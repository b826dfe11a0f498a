"""Tiny random-init Hugging Face models (no hub) and a batch for each."""

from __future__ import annotations

import torch

VOCAB = 128


def _no_dropout(**overrides):
    return overrides


def build(family: str, seed: int = 0, layers: int = 2):
    """(model, batch kwargs) for a model family; dropout off so compiled == eager exactly.
    ``layers``: blocks in the stack (T5: in the encoder and in the decoder)."""
    import transformers as tf

    torch.manual_seed(seed)
    batch, seq = 2, 16
    ids = torch.randint(3, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        return tf.BertForSequenceClassification(cfg), dict(input_ids=ids, attention_mask=mask,
                                                            labels=torch.tensor([0, 2]))
    if family == "roberta":
        cfg = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               pad_token_id=1, num_labels=3)
        return tf.RobertaForSequenceClassification(cfg), dict(input_ids=ids, attention_mask=mask,
                                                               labels=torch.tensor([1, 2]))
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg), dict(input_ids=ids, labels=ids)
    if family == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=layers,
                          num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
        return tf.T5ForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=mask,
                                                         labels=torch.randint(3, VOCAB, (batch, 8)))
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                             pad_token_id=0)
        return tf.LlamaForCausalLM(cfg), dict(input_ids=ids, labels=ids)
    if family == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                             pad_token_id=0)
        return tf.Qwen2ForCausalLM(cfg), dict(input_ids=ids, labels=ids)
    if family == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                           num_attention_heads=2, max_position_embeddings=64, dropout=0.0,
                           attention_dropout=0.0, word_embed_proj_dim=32, bos_token_id=0,
                           eos_token_id=0, pad_token_id=1)
        return tf.OPTForCausalLM(cfg), dict(input_ids=ids, labels=ids)
    if family == "vit":
        cfg = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                           num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        return tf.ViTForImageClassification(cfg), dict(pixel_values=torch.randn(batch, 3, 32, 32),
                                                        labels=torch.tensor([0, 1]))
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("bert", "roberta", "gpt2", "t5", "llama", "qwen2", "opt", "vit")


class PreNormMLP(torch.nn.Module):
    """Not a Hugging Face model: a transformer's pre-norm GELU MLP block with its residual, the
    smallest graph on which a partitioner budget's knapsack has real choices."""

    def __init__(self, d: int = 64, h: int = 256):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(d), torch.nn.Linear(d, h), torch.nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, options: dict) -> int:
    """Bytes autograd saves for one ``wtacrs`` step of a copy of ``model`` on ``x`` (dynamo reset
    first, so each call compiles afresh)."""
    import copy

    from wtacompile import SavedTensorMeter

    torch._dynamo.reset()
    trained = copy.deepcopy(model)
    compiled = torch.compile(trained, backend="wtacrs", options=options)
    with SavedTensorMeter(trained.parameters()) as meter:
        y = compiled(x)
    y.sum().backward()
    return meter.activation_bytes
