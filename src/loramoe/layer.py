"""The expert-mixture linear: a frozen base linear plus N routed LoRA experts (LoRAMoE, arXiv 2312.09979, Sec. 3).

Shape legend (used here and in _kernels.py): M tokens (every leading dim of x flattened), D input features,
O output features, N experts, R rank, H = N * R stacked expert rows, k = ``top_k``, S = M * k (token, expert) pairs
of top-k routing, P drawn dropout positions. In formulas, ``m_n`` is expert n's Bernoulli(1 - p) keep mask and
``drop_n(x) = m_n * x / (1 - p)``.

Design decisions:
- It wraps the original module and calls its forward (nn.Linear, GPT-2's Conv1D, quantized linears alike); the
  base weights are never copied or re-created.
- Experts are stacked tensors: ``loramoe_A`` (N, R, D), ``loramoe_B`` (N, O, R), ``loramoe_router`` (N, D). The dense
  forward is one GEMM down through all experts and the router together, a per-token scale of each R-block by
  ``G_n * alpha / R``, and one GEMM up with the base output added in; the per-expert loop exists only in the tests,
  as the reference. docs/benchmarks.md measures each of these choices.
- Dropout (``_kernels``) never materialises N masks: per-expert dropout subtracts the dropped entries'
  contribution from ``A_n x`` as a sparse product.
- No host-device sync in training: the forward and backward, dropout included, compile with ``fullgraph=True``.
  Top-k routing computes only the chosen experts on the CPU (``_kernels.grouped_top_k``, which reads the
  experts' token counts); elsewhere, and when compiling, it runs every expert with the others' weights zeroed.
  The router is dense either way (the balancing loss reads all N probabilities).
- A tensor in, a tensor out. Router probabilities reach callers through ``register_router_hook``, which the
  recorder in ``routing.py`` opens and closes; task types never reach this layer.
- Adapter parameters are float32 by default whatever the base dtype (as PEFT does), and all their names start
  with ``loramoe_`` so freezing, counting and saving filter on one prefix.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

import loramoe._kernels as _kernels
from loramoe.config import FIELD_RULES
from loramoe.errors import ConfigError, TargetError
from loramoe.validation import check_value

ADAPTER_PREFIX = "loramoe_"

RouterHook = Callable[["LoRAMoELinear", torch.Tensor], None]


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module: nn.Linear, GPT-2 Conv1D, bitsandbytes and similar."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight is (in, out)
        return int(module.weight.shape[0]), int(module.nf)
    raise TypeError(f"{type(module).__name__} is not a linear layer LoRAMoE can wrap (needs in/out features)")


def is_linear_like(module: nn.Module) -> bool:
    try:
        linear_features(module)
    except TypeError:
        return False
    return hasattr(module, "weight")


class LoRAMoELinear(nn.Module):
    """``y = base(x) + sum_n G_n(x) * (alpha / R) * B_n A_n drop_n(x)`` with ``G = softmax(W_g x)`` in float32.

    There is deliberately no ``merge()``: the expert weights ``G(x)`` change with every token, so the mixture is not a
    fixed matrix that could be folded into the base weight (unlike plain LoRA).

    Args:
        base_layer: the module being adapted; its forward is called unchanged.
        num_experts: N.
        rank: R.
        alpha: LoRA alpha; each expert term is scaled by ``alpha / R``.
        dropout: dropout probability on the experts' input (the router sees ``x`` undropped).
        dropout_mode: ``"per_expert"`` (N independent masks, the reference) or ``"shared"`` (one mask).
        top_k: None for dense routing (the paper); k to mix only the k most probable experts per token, with their
            probabilities renormalised over the chosen k; only those k experts are computed for the token.
        dtype: dtype of the adapter parameters (float32 by default).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        dropout_mode: str = "per_expert",
        top_k: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Module) or not is_linear_like(base_layer):
            raise TargetError(
                f"LoRAMoELinear wraps a linear layer (in and out features), got {type(base_layer).__name__}"
            )
        args = dict(
            num_experts=num_experts, rank=rank, alpha=alpha, dropout=dropout, dropout_mode=dropout_mode
        )
        for name, value in {**args, "top_k": top_k}.items():
            check_value(name, value, FIELD_RULES[name])
        if top_k is not None and top_k > num_experts:
            raise ConfigError(f"top_k ({top_k}) cannot exceed num_experts ({num_experts})")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout, self.dropout_mode, self.top_k = dropout, dropout_mode, top_k
        self.disabled = False
        self.experts_off: torch.Tensor | None = None  # (N,) bool; see inject.disable_experts
        self._router_hooks: OrderedDict[int, RouterHook] = OrderedDict()
        self._caching, self._stacked_cache = False, None  # see cached_stacking()
        device = next(base_layer.parameters()).device
        n, r, d, o = num_experts, rank, self.in_features, self.out_features
        self.loramoe_A = nn.Parameter(torch.empty(n, r, d, device=device, dtype=dtype))  # (N, R, D)
        self.loramoe_B = nn.Parameter(torch.zeros(n, o, r, device=device, dtype=dtype))  # (N, O, R)
        self.loramoe_router = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))  # (N, D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A and the router as ``nn.Linear`` initialises its weight (kaiming-uniform, a=sqrt(5)); B zero."""
        for expert_A in self.loramoe_A:  # per expert: fan_in must be D, not R * D
            nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.loramoe_router, a=math.sqrt(5))
        self.loramoe_B.zero_()

    def register_router_hook(self, hook: RouterHook) -> RemovableHandle:
        """Call ``hook(layer, probs)`` with the float32 router probabilities ``(..., N)`` of every forward."""
        handle = RemovableHandle(self._router_hooks)
        self._router_hooks[handle.id] = hook
        return handle

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Router probabilities ``softmax(W_g x)`` in float32, shape ``(..., N)``."""
        logits = F.linear(x.to(self.loramoe_router.dtype), self.loramoe_router)
        return torch.softmax(self._logits(logits), dim=-1)

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits in float32; experts switched off get -inf, so the softmax renormalises over the rest."""
        if self.experts_off is None:
            return logits.float()
        return logits.float().masked_fill(self.experts_off.to(logits.device), float("-inf"))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., O)
        if self.disabled:
            return result
        n, r, d = self.loramoe_A.shape
        x_MD = x.to(self.loramoe_A.dtype).reshape(-1, d)
        dropout = self.dropout if self.training else 0.0
        if self.top_k is not None and _kernels.use_cpu_kernels(x_MD):
            return self._grouped_top_k(x_MD, result, dropout)
        down, B_HO = self._stacked()  # (H + N + pad, D), (H, O)
        # Rows A_n m_n x (not yet divided by 1 - p), and the router logits W_g x.
        h_MH, logits_MN = self._down_and_route(x_MD, down, dropout)
        probs_MN = torch.softmax(self._logits(logits_MN), dim=-1)  # G, float32
        self._call_router_hooks(probs_MN, result)
        weights_MN = probs_MN if self.top_k is None else _top_k_weights(probs_MN, self.top_k)
        # G_n * alpha / R and dropout's 1 / (1 - p) folded into one per-token scale of each R-block.
        scale_MN1 = (weights_MN.to(h_MH.dtype) * (self.scaling / (1.0 - dropout))).unsqueeze(-1)
        h_MH = (h_MH.view(-1, n, r) * scale_MN1).view(-1, n * r)
        result_MO = result.reshape(-1, self.out_features)
        if result_MO.dtype == h_MH.dtype:  # "+ result" fused into the GEMM
            return torch.addmm(result_MO, h_MH, B_HO).view(result.shape)
        return result + (h_MH @ B_HO).view(result.shape).to(result.dtype)

    def _down_and_route(
        self, x_MD: torch.Tensor, down: torch.Tensor, dropout: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_n m_n x`` for all experts as (M, H) and the router logits ``W_g x`` as (M, N); x is undropped."""
        n, r, _ = self.loramoe_A.shape
        if dropout > 0 and self.dropout_mode == "shared":
            x_drop_MD = _kernels.shared_dropout(x_MD, dropout)
            return F.linear(x_drop_MD, down[: n * r]), F.linear(x_MD, self.loramoe_router)
        # The experts and the router read the same x: one GEMM, one gradient GEMM back to x.
        h_MH, logits_MN, _ = F.linear(x_MD, down).split([n * r, n, down.shape[0] - n * r - n], dim=1)
        if dropout > 0:  # N masks: subtract what each expert's dropped entries contributed
            h_MH = h_MH - _kernels.per_expert_dropped(x_MD, self.loramoe_A, dropout)
        return h_MH, logits_MN

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[A; W_g; 0]`` as (H + N + pad, D) and B as (H, O); built once per ``cached_stacking`` block."""
        if self._stacked_cache is not None:
            return self._stacked_cache
        stacked = _kernels.stack_down(self.loramoe_A, self.loramoe_router), _kernels.stack_up(self.loramoe_B)
        if self._caching and not torch.is_grad_enabled():
            self._stacked_cache = stacked
        return stacked

    def _grouped_top_k(self, x_MD: torch.Tensor, result: torch.Tensor, dropout: float) -> torch.Tensor:
        """Top-k computing only each token's k chosen experts (the CPU form; see ``_kernels.grouped_top_k``)."""
        probs_MN = self.router_probs(x_MD)
        self._call_router_hooks(probs_MN, result)
        weights_Mk, experts_Mk = probs_MN.topk(self.top_k, dim=-1)
        weights_Mk = weights_Mk / weights_Mk.sum(dim=-1, keepdim=True) * self.scaling
        result_MO = result.reshape(-1, self.out_features)
        A, B = self.loramoe_A, self.loramoe_B
        out_MO = _kernels.grouped_top_k(
            result_MO, x_MD, weights_Mk, experts_Mk, A, B, dropout, self.dropout_mode
        )
        return out_MO.view(result.shape)

    def _call_router_hooks(self, probs_MN: torch.Tensor, result: torch.Tensor) -> None:
        probs = probs_MN.view(*result.shape[:-1], self.num_experts)  # (..., N)
        for hook in self._router_hooks.values():
            hook(self, probs)

    def extra_repr(self) -> str:
        routing = "dense" if self.top_k is None else f"top_k={self.top_k}"
        return (
            f"experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"
            f" ({self.dropout_mode}), {routing}"
        )


@contextmanager
def cached_stacking(model: nn.Module) -> Iterator[None]:
    """Inside the block every LoRAMoE layer of ``model`` stacks its expert weights once instead of every call.

    For generation, where the stacking costs as much as a decoding step's adapter GEMMs (docs/benchmarks.md). As
    with ``torch.nn.utils.parametrize.cached()``, the caller promises not to change the adapter parameters inside
    the block; the cache is dropped on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, LoRAMoELinear)]
    for layer in layers:
        layer._caching = True
    try:
        yield
    finally:
        for layer in layers:
            layer._caching, layer._stacked_cache = False, None


def _top_k_weights(probs_MN: torch.Tensor, k: int) -> torch.Tensor:
    """(M, N): the k largest probabilities of each row renormalised to sum to 1, the others zero."""
    top_Mk, experts_Mk = probs_MN.topk(k, dim=-1)
    return torch.zeros_like(probs_MN).scatter(-1, experts_Mk, top_Mk / top_Mk.sum(dim=-1, keepdim=True))
