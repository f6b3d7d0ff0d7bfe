"""Model-level measurements on the SmolLM2-135M architecture (random weights, float32).

Variants share the base weights (one copy in memory); each is a deep copy of the module tree around them:
- ``floor``: the frozen base alone, forward + backward to ``inputs_embeds`` (no adapter, no optimizer);
- ``peft``: PEFT LoRA of rank N*R = 24 on the same targets, unmerged;
- ``fused``: loramoe as the library computes it (N = 6, R = 4, gate/up/down);
- ``loop``: the same parameters computed one expert at a time (``reference.ExpertLoopLinear``).
The train step is forward, cross-entropy on next-token labels, backward, AdamW step, ``zero_grad``.

Run as a script (``--peak-rss SPEC``) it measures one variant's peak memory in a fresh process; ``peak_rss``
starts that process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.reference import ExpertLoopLinear, convert
from loramoe import LoRAMoEConfig, inject
from loramoe.layer import cached_stacking

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)
TINY = dict(
    SMOLLM2_135M,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERTS, RANK, ALPHA = 6, 4, 32.0


@dataclass(frozen=True)
class Variant:
    kind: str  # floor | peft | fused | loop
    dropout: float = 0.05
    mode: str = "per_expert"  # loramoe dropout mode; PEFT always draws one mask

    @property
    def name(self) -> str:
        if self.kind == "floor":
            return "floor"
        drop = "p=0" if self.dropout == 0 else self.mode if self.kind != "peft" else f"p={self.dropout}"
        return f"{self.kind} {drop}"


def build_base(layers: int, *, tiny: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**dict(TINY if tiny else SMOLLM2_135M, num_hidden_layers=layers))
    model = LlamaForCausalLM(config).float()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def adapt(base: torch.nn.Module, variant: Variant) -> torch.nn.Module:
    """A model around ``base``'s own weight tensors (not copied), adapted as ``variant`` says."""
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    if variant.kind == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=EXPERTS * RANK, lora_alpha=ALPHA, lora_dropout=variant.dropout, target_modules=TARGETS
        )
        model = get_peft_model(model, cfg)
        names = ("lora_B",)
    elif variant.kind in ("fused", "loop"):
        cfg = LoRAMoEConfig(
            num_experts=EXPERTS,
            rank=RANK,
            alpha=ALPHA,
            dropout=variant.dropout,
            dropout_mode=variant.mode,
            target_modules=TARGETS,
        )
        inject(model, cfg)
        if variant.kind == "loop":
            convert(model, ExpertLoopLinear)
        names = ("loramoe_B",)
    else:
        names = ()
    with torch.no_grad():  # a trained-looking adapter rather than the zero init
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.normal_(std=1e-3)
    return model


def train_step(model: torch.nn.Module, variant: Variant, ids: torch.Tensor):
    """A closure running one training step; the floor's backward stops at ``inputs_embeds``."""
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(variant.kind == "floor")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        embeds.grad = None
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int):
    """A closure running greedy generation with the KV cache (unmerged adapters, eval mode)."""
    model.eval()
    mask = torch.ones_like(ids)

    def run() -> torch.Tensor:
        with cached_stacking(model):  # as loramoe.generate does (a no-op for PEFT and the floor)
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def token_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- peak memory: one variant per fresh process ----


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_rss_here(variant: Variant, *, layers: int, batch: int, seq: int, tiny: bool = False) -> dict:
    """In this process: build, one warm-up step (optimizer state), then the peak RSS of one more step."""
    base = build_base(layers, tiny=tiny)
    model = adapt(base, variant)
    step = train_step(model, variant, token_ids(batch, seq, base.config.vocab_size))
    step()
    try:  # reset the high-water mark (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, method = _rss_kib("VmRSS:"), "VmHWM after clear_refs"
    except OSError:
        before, method = _rss_kib("VmRSS:"), "ru_maxrss (not reset: an upper bound)"
    step()
    peak = (
        _rss_kib("VmHWM:")
        if method.startswith("VmHWM")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return {
        "variant": variant.name,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "step_peak_delta_mib": (peak - before) / 1024,
        "method": method,
    }


def peak_rss(
    variant: Variant, *, layers: int, batch: int, seq: int, threads: int, tiny: bool = False
) -> dict:
    """``peak_rss_here`` in a fresh Python process. glibc returns freed blocks of >= 64 KiB to the system there
    (MALLOC_MMAP_THRESHOLD_), so the high-water mark follows live tensors rather than allocator caching."""
    spec = dict(asdict(variant), layers=layers, batch=batch, seq=seq, tiny=tiny)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.model_bench", "--peak-rss", json.dumps(spec)]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak-rss", required=True)
    spec = json.loads(parser.parse_args(argv).peak_rss)
    variant = Variant(spec.pop("kind"), spec.pop("dropout"), spec.pop("mode"))
    print(json.dumps(peak_rss_here(variant, **spec)))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _child(sys.argv[1:])
