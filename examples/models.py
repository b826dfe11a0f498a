"""Random-init Hugging Face models of a few families, built from configs (no hub access)."""

from __future__ import annotations

import torch

FAMILIES = ("bert", "gpt2", "llama", "t5", "vit")


def build_model(family: str, batch_size: int, seq_len: int, *, scale: str = "small"):
    """(model, batch) with dropout off, sized for a CPU demo (``scale="small"``)."""
    import transformers as tf

    vocab = 8192
    hidden, layers, heads, ffn = 256, 4, 4, 1024
    ids = torch.randint(5, vocab, (batch_size, seq_len))
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ffn,
                            max_position_embeddings=max(512, seq_len),
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
        labels = torch.randint(0, 2, (batch_size,))
        return tf.BertForSequenceClassification(cfg), dict(input_ids=ids, labels=labels)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                            n_positions=max(512, seq_len), resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg), dict(input_ids=ids, labels=ids)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=heads, max_position_embeddings=max(512, seq_len),
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return tf.LlamaForCausalLM(cfg), dict(input_ids=ids, labels=ids)
    if family == "t5":
        cfg = tf.T5Config(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=ffn,
                          num_layers=layers, num_heads=heads, dropout_rate=0.0,
                          decoder_start_token_id=0, pad_token_id=0)
        labels = torch.randint(5, vocab, (batch_size, max(8, seq_len // 4)))
        return tf.T5ForConditionalGeneration(cfg), dict(input_ids=ids, labels=labels)
    if family == "vit":
        cfg = tf.ViTConfig(image_size=224, patch_size=16, hidden_size=hidden,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=ffn, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, num_labels=10)
        pixels = torch.randn(batch_size, 3, 224, 224)
        return tf.ViTForImageClassification(cfg), dict(pixel_values=pixels,
                                                        labels=torch.randint(0, 10, (batch_size,)))
    raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
