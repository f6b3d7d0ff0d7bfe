"""The expert-mixture linear: a frozen base linear plus N routed LoRA experts (LoRAMoE, arXiv 2312.09979, Sec. 3).

Dimension legend: M tokens (every leading dim flattened), D input features, O output features, N experts, R rank.

Design decisions:
- It wraps the original module and calls its forward (nn.Linear, GPT-2's Conv1D, quantized linears alike); the
  base weights are never copied or re-created.
- Experts are stacked tensors: ``loramoe_A`` (N, R, D), ``loramoe_B`` (N, O, R), ``loramoe_router`` (N, D). The dense
  forward is one GEMM down through all experts, a per-token scale of each R-block by ``G_n * alpha / R``, and one
  GEMM up; the per-expert loop exists only in the tests, as the reference.
- A tensor in, a tensor out. Router probabilities reach callers through ``register_router_hook``, which the
  recorder in ``routing.py`` opens and closes; task types never reach this layer.
- Adapter parameters are float32 by default whatever the base dtype (as PEFT does), and all their names start
  with ``loramoe_`` so freezing, counting and saving filter on one prefix.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

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
        top_k: None for dense routing (the paper); k to compute only the k most probable experts per token with
            their probabilities renormalised over the chosen k.
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
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout, self.dropout_mode, self.top_k = dropout, dropout_mode, top_k
        self.disabled = False
        self._router_hooks: OrderedDict[int, RouterHook] = OrderedDict()
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
        return torch.softmax(F.linear(x.to(self.loramoe_router.dtype), self.loramoe_router).float(), dim=-1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        x = x.to(self.loramoe_A.dtype)
        probs = self.router_probs(x)  # (..., N) float32
        for hook in self._router_hooks.values():
            hook(self, probs)
        weights = probs.to(x.dtype)
        if self.top_k is None:
            delta = self._dense_experts(x, weights)
        else:
            delta = self._topk_experts(x, weights)
        return result + delta.to(result.dtype)

    def _dense_experts(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, r, d = self.loramoe_A.shape
        lead = x.shape[:-1]
        x_MD = x.reshape(-1, d)
        if self.training and self.dropout > 0 and self.dropout_mode == "per_expert":
            # N independent masks: each expert sees its own dropped copy of x (the reference's structure).
            x_NMD = F.dropout(x_MD.unsqueeze(0).expand(n, -1, -1), self.dropout, training=True)
            h_MNR = torch.bmm(x_NMD, self.loramoe_A.transpose(1, 2)).transpose(0, 1)  # (M, N, R)
        else:
            if self.training and self.dropout > 0:
                x_MD = F.dropout(x_MD, self.dropout, training=True)
            h_MNR = F.linear(x_MD, self.loramoe_A.reshape(n * r, d)).view(-1, n, r)  # (M, N, R)
        scale_MN = weights.reshape(-1, n) * self.scaling
        h_MK = (h_MNR * scale_MN.unsqueeze(-1)).reshape(-1, n * r)  # (M, N*R)
        B_OK = self.loramoe_B.permute(1, 0, 2).reshape(
            self.out_features, n * r
        )  # (O, N*R), expert-major blocks
        return F.linear(h_MK, B_OK).view(*lead, self.out_features)

    def _topk_experts(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, _, d = self.loramoe_A.shape
        lead = x.shape[:-1]
        x_MD = x.reshape(-1, d)
        top_w_MK, top_i_MK = weights.reshape(-1, n).topk(self.top_k, dim=-1)  # (M, k)
        top_w_MK = top_w_MK / top_w_MK.sum(dim=-1, keepdim=True)  # renormalise over the chosen experts
        out_MO = x_MD.new_zeros(x_MD.shape[0], self.out_features)
        for expert in range(n):  # grouped by expert: each expert only sees the tokens routed to it
            token_idx, slot = (top_i_MK == expert).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            x_sel = x_MD.index_select(0, token_idx)
            if self.training and self.dropout > 0:
                x_sel = F.dropout(x_sel, self.dropout, training=True)
            h = F.linear(x_sel, self.loramoe_A[expert]) * (
                top_w_MK[token_idx, slot] * self.scaling
            ).unsqueeze(-1)
            out_MO = out_MO.index_add(0, token_idx, F.linear(h, self.loramoe_B[expert]))
        return out_MO.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        routing = "dense" if self.top_k is None else f"top_k={self.top_k}"
        return (
            f"experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"
            f" ({self.dropout_mode}), {routing}"
        )
