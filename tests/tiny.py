"""Tiny real Hugging Face models and a tiny real tokenizer, built from configs: CPU, no network, milliseconds.

Import from tests as ``from tiny import tiny_model, tiny_tokenizer, ARCHITECTURES``.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VOCAB_SIZE = 320  # 256 byte symbols + specials, rounded up

# model_type -> config overrides that make a 2-layer model with hidden 32 and FFN 64.
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16},
    "phi3": {},
    "olmo2": {},
    "gpt2": {},
}


def tiny_config(model_type: str = "llama", **overrides):
    if model_type == "gpt2":
        kw = dict(
            vocab_size=VOCAB_SIZE,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            n_inner=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        kw = dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        kw.update(ARCHITECTURES.get(model_type, {}))
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised 2-layer causal LM of the given architecture, float32, eval mode."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float().eval()


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte) with ChatML special tokens and, optionally, a chat template."""
    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    assert len(fast) <= VOCAB_SIZE
    return fast


def adapted_llama(**cfg_kwargs) -> torch.nn.Module:
    """A tiny llama with LoRAMoE injected (dropout off) and random, non-zero B and router weights."""
    from loramoe import LoRAMoEConfig, adapted_modules, inject

    model = inject(tiny_model("llama"), LoRAMoEConfig(dropout=0.0, **cfg_kwargs))
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=0.3)
            layer.loramoe_router.normal_(std=1.0)
    return model
