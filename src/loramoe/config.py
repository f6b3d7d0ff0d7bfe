"""LoRAMoEConfig: what to adapt, how many experts, and the localized balancing constraint (LBC).

Design decisions:
- One frozen dataclass, validated in ``__post_init__``; every error says which field and what to do.
- It round-trips through JSON (``to_dict`` / ``from_dict``) and is saved next to the adapter weights.
- The reference LoRAMoE code is the default wherever it and the paper differ (METHOD.md, "Parity"); each
  difference is an explicit option here. One exception: the LBC counts only real tokens by default
  (``lbc_positions="non_padding"``). The reference trained one sample per device, where no padding exists; in
  batches that mix lengths its all-positions importance mostly balances padding and the router does not localize
  (docs/results.md). ``"all"`` keeps the reference's numerics bit for bit.
- ``FFN_TARGETS`` is the explicit map from ``model_type`` to the feed-forward linears LoRAMoE adapts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from loramoe.errors import ConfigError
from loramoe.strict_json import JSONRefused, StrictDecoder
from loramoe.validation import check_fields, from_mapping, integer, list_of, number, one_of, optional, text

# model_type -> names of the feed-forward linears of one decoder layer (LoRAMoE adapts exactly these).
FFN_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("gate_proj", "up_proj", "down_proj"),
    "mistral": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
    "qwen2": ("gate_proj", "up_proj", "down_proj"),
    "qwen3": ("gate_proj", "up_proj", "down_proj"),
    "gemma": ("gate_proj", "up_proj", "down_proj"),
    "gemma2": ("gate_proj", "up_proj", "down_proj"),
    "gemma3": ("gate_proj", "up_proj", "down_proj"),
    "gemma3_text": ("gate_proj", "up_proj", "down_proj"),
    "phi3": ("gate_up_proj", "down_proj"),
    "olmo": ("gate_proj", "up_proj", "down_proj"),
    "olmo2": ("gate_proj", "up_proj", "down_proj"),
    "granite": ("gate_proj", "up_proj", "down_proj"),
    "smollm3": ("gate_proj", "up_proj", "down_proj"),
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
}

# The reference's two task types: 0 = every other task, 1 = world knowledge.
BINARY_TASK_NAMES: tuple[str, ...] = ("downstream", "knowledge")

NORMALIZATIONS = ("cv2", "var_over_mean")
REDUCTIONS = ("sum", "mean")
POSITIONS = ("all", "non_padding")
DROPOUT_MODES = ("per_expert", "shared")

# The rule of each field; the layer checks its own arguments with the same ones.
FIELD_RULES = {
    "num_experts": integer(1),
    "rank": integer(1),
    "alpha": number(0, low_open=True),
    "dropout": number(0, 1, high_open=True),
    "dropout_mode": one_of(DROPOUT_MODES),
    "top_k": optional(integer(1)),
    "lbc_delta": number(0, 1, high_open=True),
    "lbc_weight": (number(0)[0], "a number >= 0 (0 disables the LBC)"),
    "lbc_normalization": one_of(NORMALIZATIONS),
    "lbc_reduction": one_of(REDUCTIONS),
    "lbc_positions": one_of(POSITIONS),
    "group_mass_weight": (number(0)[0], "a number >= 0 (0: the paper's LBC alone)"),
    "target_modules": optional(list_of(text())),
    "task_names": list_of(text(), at_least=2, distinct=True),
    "expert_groups": optional(list_of(integer(1))),
}


@dataclass(frozen=True)
class LoRAMoEConfig:
    """Configuration of the LoRAMoE adapter and its balancing loss.

    Attributes:
        num_experts: N, LoRA experts per adapted linear (reference 8).
        rank: r, rank of each expert (reference 4).
        alpha: LoRA alpha; each expert's update is scaled by ``alpha / rank`` (reference 32).
        dropout: dropout on the experts' input (the router sees the input without dropout; reference 0.05).
        dropout_mode: ``"per_expert"`` draws one mask per expert (reference); ``"shared"`` one mask for all (cheaper).
        target_modules: module names to adapt, matched exactly or as a dotted suffix of the full module name
            (``"down_proj"``, ``"mlp.c_proj"``); None uses ``FFN_TARGETS[model_type]``.
        top_k: None routes densely to every expert (the paper). An int mixes only the k most probable experts per
            token, with their weights renormalised to sum to 1: a departure from the paper, asked for by users. Only
            the chosen experts are computed; that saves time once experts are large (rank 32: top-2 of 16 trains in
            0.6x dense's adapter time on CPU) but costs more than dense at rank 4 (docs/benchmarks.md).
        lbc_delta: delta in [0, 1) of the localized balancing constraint.
        lbc_weight: beta, the LBC's weight; 0 trains "LoRAMoE without LBC".
        lbc_normalization: ``"cv2"`` = Var / Mean^2 (reference) or ``"var_over_mean"`` = Var / Mean (paper text).
        lbc_reduction: ``"sum"`` over adapted linears (reference) or ``"mean"``.
        lbc_positions: ``"non_padding"`` (default): only real tokens count in a sample's importance, which is
            divided by its length; ``"all"``: every position counts, padding included (the reference's numerics,
            exact when there is no padding). With padding counted the LBC mostly balances padding positions when
            batches mix short and long samples (docs/results.md: the router did not localize; with
            ``"non_padding"`` it reached its targets). Adapters saved without this field load as ``"all"``.
        group_mass_weight: beyond the paper, 0 (default) turns it off. The weight of a second constraint on each
            adapted linear: the mean over samples of ``-log`` (the share of the sample's router mass on its own
            group), which drives each sample's mass onto its group. The LBC alone settles at a mass ratio of
            ``(1 - delta) / (1 + delta)`` between the groups (55 % on the own group at delta 0.1), so every expert
            keeps learning from every task type; this term separates the groups in training while the router stays
            soft at inference (docs/method.md, "Beyond the paper").
        task_names: names of the task types, index = the integer type. Binary mode (the reference) is
            ``("downstream", "knowledge")``: 0 = every other task, 1 = world-knowledge (closed-book QA).
        expert_groups: sizes of the contiguous expert groups, one per task type, summing to ``num_experts``;
            None = binary mode with two equal halves (N must be even). Samples of type k are pushed toward group k.
    """

    num_experts: int = 8
    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.05
    dropout_mode: str = "per_expert"
    target_modules: tuple[str, ...] | None = None
    top_k: int | None = None
    lbc_delta: float = 0.1
    lbc_weight: float = 0.1
    lbc_normalization: str = "cv2"
    lbc_reduction: str = "sum"
    lbc_positions: str = "non_padding"
    group_mass_weight: float = 0.0
    task_names: tuple[str, ...] = BINARY_TASK_NAMES
    expert_groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Lists from JSON/YAML (and a lone name) become tuples so the config stays hashable and immutable.
        for name in ("target_modules", "task_names", "expert_groups"):
            value = getattr(self, name)
            if isinstance(value, (str, list)):
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        check_fields(self, FIELD_RULES)
        # Checks across fields.
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        self._check_expert_groups()

    def _check_expert_groups(self) -> None:
        if self.expert_groups is None:
            if len(self.task_names) != 2:
                raise ConfigError(
                    f"{len(self.task_names)} task_names need expert_groups (one group size per task type, "
                    f"summing to num_experts={self.num_experts})"
                )
            if self.num_experts % 2:
                raise ConfigError(
                    f"num_experts={self.num_experts} is odd: binary LBC mode splits the experts into two equal "
                    "halves; use an even num_experts or give expert_groups explicitly (e.g. [3, 4])"
                )
            return
        groups = self.expert_groups
        if len(groups) != len(self.task_names):
            raise ConfigError(
                f"expert_groups has {len(groups)} sizes but task_names has {len(self.task_names)} names; give one "
                "group size per task type"
            )
        if sum(groups) != self.num_experts:
            raise ConfigError(
                f"expert_groups {list(groups)} must be positive integers summing to num_experts={self.num_experts}"
            )

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied inside each expert term."""
        return self.alpha / self.rank

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Expert group sizes, one per task type (binary mode: two equal halves)."""
        if self.expert_groups is not None:
            return self.expert_groups
        half = self.num_experts // 2
        return (half, half)

    def group_of_expert(self) -> list[int]:
        """Task type served by each expert: ``[0]*N0 + [1]*N1 + ...`` (binary: first half downstream)."""
        return [k for k, size in enumerate(self.group_sizes) for _ in range(size)]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAMoEConfig:
        return from_mapping(cls, data, where="LoRAMoE config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoRAMoEConfig:
        """The config of ``to_json``'s text; JSON as strict as a file's (``strict_json.StrictDecoder``).

        Raises:
            ConfigError: not a JSON string, or a value the config refuses.
        """
        if not isinstance(text, str):
            raise ConfigError(
                f"LoRAMoEConfig.from_json needs the JSON text (a str), got {type(text).__name__}"
            )
        try:
            data = StrictDecoder().decode(text)
        except JSONRefused as err:  # a key twice, an integer too long
            raise ConfigError(f"LoRAMoE config{err.where()}: {err.problem}") from None
        except (ValueError, RecursionError) as err:  # malformed, or NaN
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
            raise ConfigError(f"LoRAMoE config: not valid JSON ({reason})") from None
        return cls.from_dict(data)


def field_docs(cls: type = LoRAMoEConfig) -> dict[str, str]:
    """Field name -> its description from a dataclass's Google-style ``Attributes:`` docstring (for CLI help)."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        if sep and head in names:
            current = head
            docs[current] = rest.strip()
        elif current and stripped:
            docs[current] += " " + stripped
        elif not stripped:
            current = None
    return docs
