"""How one request is decoded (``Sampling``) and how the next token of every row of a batch is chosen.

One implementation for every command that generates (``generate``, ``chat``, ``serve``, the evaluation engine), so
the same request and seed give the same tokens whichever command runs it.

Design decisions:

- Settings a caller leaves unset come from the model's ``generation_config`` (``do_sample``, ``temperature``,
  ``top_p``, ``top_k``, ``repetition_penalty``), else the neutral value. A generation-config setting this module does
  not implement is an error (``check_generation_config``), never silently ignored.
- The processors run in Hugging Face's order: repetition penalty (over the prompt and the output), temperature,
  top-k, top-p. The repetition penalty applies to greedy decoding too, as in ``model.generate``.
- Each sampled row draws from its own ``torch.Generator`` seeded by its request, one uniform per token, by inverse
  CDF: a request's tokens do not depend on which requests share its batch.
- Values are checked against what float32 holds: a temperature or top-p that rounds to 0 in float32 would divide by
  zero or keep nothing, so it is refused, not decoded.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loramoe.errors import ConfigError
from loramoe.validation import check_fields, integer, is_int, is_number, optional

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# Generation-config settings that change the output and are not implemented here, with their neutral values.
UNIMPLEMENTED = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "penalty_alpha": (None,),
    "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None, []), "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []), "min_new_tokens": (None, 0), "min_length": (None, 0),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None, {}),
    "min_p": (None, 0, 0.0), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
    "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "diversity_penalty": (None, 0.0),
    "top_h": (None,),
}  # fmt: skip


def float32_positive(value: Any) -> bool:
    """A finite number that stays > 0 and finite in float32."""
    if not (is_number(value) and value > 0):
        return False
    with np.errstate(over="ignore"):
        return 0 < float(np.float32(value)) < math.inf


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded.

    Attributes:
        max_tokens: most tokens to generate (the end token included).
        temperature: 0 for greedy decoding, else the sampling temperature (> 0 in float32).
        top_p: nucleus sampling mass in (0, 1] (> 0 in float32).
        top_k: keep the k most probable tokens when sampling; 0 keeps all.
        repetition_penalty: > 1 lowers the logits of tokens already in the prompt or the output (CTRL's rule).
        stop: strings that end the output (not included in it).
        seed: seed of this request's sampler; ``None`` draws one.

    Raises:
        ConfigError: a value out of range, naming the field.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "max_tokens": integer(1),
                "temperature": (
                    lambda v: v == 0 or float32_positive(v),
                    "0 (greedy) or a positive number that float32 holds (>= 1.4e-45)",
                ),
                "top_p": (lambda v: float32_positive(v) and v <= 1, "a number in (0, 1] that float32 holds"),
                "top_k": integer(0),
                "repetition_penalty": (float32_positive, "a positive number that float32 holds"),
                "stop": (
                    lambda v: isinstance(v, tuple) and all(isinstance(s, str) and s for s in v),
                    "a tuple of non-empty strings",
                ),
                "seed": optional(
                    (
                        lambda v: is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1],
                        f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
                    )
                ),
            },
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This request's random stream (None when greedy): seeded by ``seed``, or by a fresh random seed."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device).manual_seed(seed)


def check_generation_config(model: Any) -> None:
    """Raise ``ConfigError`` when the model's generation config sets something the token loop does not implement."""
    config = getattr(model, "generation_config", None)
    found = [
        f"{name}={getattr(config, name)!r}"
        for name, neutral in UNIMPLEMENTED.items()
        if getattr(config, name, None) not in neutral
    ]
    if found:
        raise ConfigError(
            f"the model's generation config sets {', '.join(found)}, which loramoe's decoding does not implement; "
            "set it back to its default in generation_config.json (or model.generation_config) to decode without it"
        )


def sampling_for(
    model: Any,
    *,
    max_tokens: int,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    stop: tuple[str, ...] = (),
    seed: int | None = None,
) -> Sampling:
    """A ``Sampling`` whose unset (None) settings come from the model's generation config, else neutral values.

    ``do_sample`` False (or unset with a config that does not sample) is greedy whatever the temperature.
    """
    config = getattr(model, "generation_config", None)

    def default(name: str, value: Any, neutral: Any) -> Any:
        if value is not None:
            return value
        configured = getattr(config, name, None)
        return neutral if configured is None else configured

    sample = default("do_sample", do_sample, False)
    if not isinstance(sample, bool):
        raise ConfigError(f"do_sample must be true or false, got {sample!r}")
    if sample and temperature is not None and not float32_positive(temperature):
        raise ConfigError(
            f"temperature must be > 0 (in float32) when sampling, got {temperature!r}; use do_sample=False for "
            "greedy decoding"
        )
    return Sampling(
        max_tokens=max_tokens,
        temperature=default("temperature", temperature, 1.0) if sample else 0.0,
        top_p=default("top_p", top_p, 1.0) if sample else 1.0,
        top_k=default("top_k", top_k, 0) if sample else 0,
        repetition_penalty=default("repetition_penalty", repetition_penalty, 1.0),
        stop=tuple(stop),
        seed=seed,
    )


def next_tokens(
    logits_bV: torch.Tensor,
    settings: list[Sampling],
    generators: list[torch.Generator | None],
    seen_bV: torch.Tensor | None,
) -> torch.Tensor:
    """The next token of each row, ``(b,)``, from float32 logits ``(b, V)``.

    Args:
        logits_bV: the last position's logits of each row.
        settings: each row's ``Sampling``.
        generators: each row's random stream (None for greedy rows).
        seen_bV: True where a token is in the row's prompt or output; needed when a row has a repetition penalty.
    """
    penalties = [s.repetition_penalty for s in settings]
    if any(p != 1.0 for p in penalties):
        penalty_b1 = logits_bV.new_tensor(penalties)[:, None]
        penalised = torch.where(logits_bV < 0, logits_bV * penalty_b1, logits_bV / penalty_b1)
        logits_bV = torch.where(seen_bV, penalised, logits_bV)
    tokens_b = logits_bV.argmax(dim=-1)
    rows = [row for row, s in enumerate(settings) if not s.greedy]
    if rows:
        index = torch.tensor(rows, device=logits_bV.device)
        picked = [settings[row] for row in rows]
        probs_sV = _filtered_probs(logits_bV[index], picked)
        uniform_s1 = torch.stack([torch.rand((), generator=generators[row], device=logits_bV.device)
                                  for row in rows])[:, None]  # fmt: skip
        cdf_sV = probs_sV.cumsum(dim=-1)
        drawn_s = torch.searchsorted(cdf_sV, uniform_s1 * cdf_sV[:, -1:], right=True)[:, 0]
        tokens_b[index] = drawn_s.clamp_max(logits_bV.shape[-1] - 1)
    return tokens_b


def _filtered_probs(logits_sV: torch.Tensor, settings: list[Sampling]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as probabilities ``(s, V)``; filtered tokens get probability 0."""
    temperature_s1 = logits_sV.new_tensor([s.temperature for s in settings])[:, None]
    # The maximum is subtracted first so that a tiny temperature gives 0 and -inf, never inf - inf.
    scaled_sV = (logits_sV - logits_sV.max(dim=-1, keepdim=True).values) / temperature_s1
    vocab = scaled_sV.shape[-1]
    if any(0 < s.top_k < vocab for s in settings):
        k_s1 = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in settings])[:, None]
        kth_s1 = scaled_sV.sort(dim=-1, descending=True).values.gather(1, (k_s1 - 1).to(scaled_sV.device))
        scaled_sV = scaled_sV.masked_fill(scaled_sV < kth_s1, float("-inf"))
    probs_sV = torch.softmax(scaled_sV, dim=-1)
    if any(s.top_p < 1 for s in settings):
        top_p_s1 = probs_sV.new_tensor([s.top_p for s in settings])[:, None]
        sorted_sV, order_sV = probs_sV.sort(dim=-1, descending=True)
        drop_sV = (
            sorted_sV.cumsum(dim=-1) - sorted_sV >= top_p_s1
        )  # the mass before a token already reaches top_p
        probs_sV = probs_sV.scatter(1, order_sV, sorted_sV.masked_fill(drop_sV, 0.0))
    return probs_sV
