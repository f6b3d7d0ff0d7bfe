"""The expert-mixture linear: a frozen base linear plus N routed LoRA experts (LoRAMoE, arXiv 2312.09979, Sec. 3).

Dimension legend: M tokens (every leading dim flattened), D input features, O output features, N experts, R rank.

Design decisions:
- It wraps the original module and calls its forward (nn.Linear, GPT-2's Conv1D, quantized linears alike); the
  base weights are never copied or re-created.
- Experts are stacked tensors: ``loramoe_A`` (N, R, D), ``loramoe_B`` (N, O, R), ``loramoe_router`` (N, D). The dense
  forward is one GEMM down through all experts and the router together, a per-token scale of each R-block by
  ``G_n * alpha / R``, and one GEMM up with the base output added in; the per-expert loop exists only in the tests,
  as the reference. docs/benchmarks.md measures each of these choices.
- Dropout never materialises a mask: the dropped entries are drawn directly (``_dropped_positions``, about p of
  the draws of a dense mask). Per-expert dropout subtracts the dropped entries' contribution from ``A_n x`` as a
  sparse product, so the N masked copies of x are never built or kept for backward.
- Top-k routing computes only the chosen experts: the (token, expert) pairs are sorted by expert, x is gathered
  once in that order, each expert runs two GEMMs on its contiguous block, and one ``index_add`` mixes the results
  back (``_top_k_experts``). The router is dense (the balancing loss reads all N probabilities).
- A tensor in, a tensor out. Router probabilities reach callers through ``register_router_hook``, which the
  recorder in ``routing.py`` opens and closes; task types never reach this layer.
- Adapter parameters are float32 by default whatever the base dtype (as PEFT does), and all their names start
  with ``loramoe_`` so freezing, counting and saving filter on one prefix.
"""

from __future__ import annotations

import math
import warnings
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
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout, self.dropout_mode, self.top_k = dropout, dropout_mode, top_k
        self.disabled = False
        self._router_hooks: OrderedDict[int, RouterHook] = OrderedDict()
        self._stacked_cache: tuple | None = None  # see _stacked()
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
        n, r, d = self.loramoe_A.shape
        x_MD = x.to(self.loramoe_A.dtype).reshape(-1, d)
        dropout = self.dropout if self.training else 0.0
        if self.top_k is not None:
            return self._top_k_experts(x_MD, result, dropout)
        down_KD, B_KO = self._stacked()
        h_MK, logits_MN = self._down_and_route(x_MD, down_KD, dropout)  # (M, N*R) rows A_n drop_n(x); (M, N)
        probs = torch.softmax(logits_MN.float(), dim=-1).view(*x.shape[:-1], n)  # (..., N) float32
        for hook in self._router_hooks.values():
            hook(self, probs)
        weights_MN = probs.view(-1, n).to(h_MK.dtype)
        # G_n * alpha / R and dropout's 1 / (1 - p) folded into one per-token scale of each R-block.
        scale_MN1 = (weights_MN * (self.scaling / (1.0 - dropout))).unsqueeze(-1)
        h_MK = (h_MK.view(-1, n, r) * scale_MN1).view(-1, n * r)
        if result.dtype == h_MK.dtype:  # "+ result" fused into the GEMM
            return torch.addmm(result.reshape(-1, self.out_features), h_MK, B_KO).view(result.shape)
        return result + (h_MK @ B_KO).view(result.shape).to(result.dtype)

    def _top_k_experts(self, x_MD: torch.Tensor, result: torch.Tensor, dropout: float) -> torch.Tensor:
        """Sparse top-k: each token through its k chosen experts only (S = M * k rows, grouped by expert)."""
        n, k = self.num_experts, self.top_k
        probs = self.router_probs(x_MD)  # (M, N) float32
        for hook in self._router_hooks.values():
            hook(self, probs.view(*result.shape[:-1], n))
        top_w_Mk, top_i_Mk = probs.topk(k, dim=-1)
        top_w_Mk = top_w_Mk / top_w_Mk.sum(dim=-1, keepdim=True)
        expert_S = top_i_Mk.reshape(-1)
        order_S = torch.argsort(expert_S, stable=True)  # (token, slot) pairs grouped by expert
        token_S = order_S.div(k, rounding_mode="floor")
        counts = torch.bincount(expert_S, minlength=n).tolist()
        if dropout > 0 and self.dropout_mode == "shared":  # one mask on x, before the gather
            x_MD = F.dropout(x_MD, dropout)
        x_SD = x_MD.index_select(0, token_S)
        if dropout > 0 and self.dropout_mode == "per_expert":  # each row is one (token, expert) pair
            x_SD = F.dropout(x_SD, dropout)
        scale_S1 = (top_w_Mk.reshape(-1).index_select(0, order_S).to(x_SD.dtype) * self.scaling).unsqueeze(-1)
        h_SR = torch.cat([x_e @ A.t() for x_e, A in zip(x_SD.split(counts), self.loramoe_A)]) * scale_S1
        y_SO = torch.cat([h_e @ B.t() for h_e, B in zip(h_SR.split(counts), self.loramoe_B)])
        out_MO = result.reshape(-1, self.out_features)
        if out_MO.dtype == y_SO.dtype:
            return out_MO.index_add(0, token_S, y_SO).view(result.shape)
        delta_MO = y_SO.new_zeros(out_MO.shape).index_add_(0, token_S, y_SO)
        return (out_MO + delta_MO.to(out_MO.dtype)).view(result.shape)

    def _down_and_route(
        self, x_MD: torch.Tensor, down_KD: torch.Tensor, dropout: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_n drop_n(x)`` for all experts as (M, N*R) (masks not yet divided by 1 - p) and router logits (M, N)."""
        n, r, d = self.loramoe_A.shape
        if dropout > 0 and self.dropout_mode == "shared":
            # One mask: zero the dropped entries of one copy of x; the router reads the undropped x.
            dropped = _dropped_positions(x_MD.numel(), dropout, x_MD.device, torch.int64)
            x_drop_MD = x_MD.reshape(-1).index_fill(0, dropped, 0.0).view_as(x_MD)
            return F.linear(x_drop_MD, self.loramoe_A.reshape(n * r, d)), F.linear(x_MD, self.loramoe_router)
        # The experts and the router read the same x: one GEMM, one gradient GEMM back to x.
        h_MK, logits_MN, _ = F.linear(x_MD, down_KD).split([n * r, n, down_KD.shape[0] - n * r - n], dim=1)
        if dropout > 0:  # N masks: subtract what each expert's dropped entries contributed
            h_MK = h_MK - _per_expert_dropped(x_MD, self.loramoe_A, dropout)
        return h_MK, logits_MN

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[A; W_g; 0]`` as (N*R + N + pad, D) and B as (N*R, O), expert-major rows.

        Rebuilt on every call while autograd needs them; otherwise (generation) cached per parameter version, so
        an optimizer step or ``load_state_dict`` invalidates the cache. The zero rows pad the width to a multiple
        of 16: MKL runs a (M, 30) GEMM output at half the speed of a (M, 32) one. B is used as (N*R, O)
        row-major, the fast layout for the skinny up-projection GEMM (2x at O = 1536).
        """
        params = (self.loramoe_A, self.loramoe_router, self.loramoe_B)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._build_stacked()
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            self._stacked_cache = (key, self._build_stacked())
        return self._stacked_cache[1]

    def _build_stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, r, d = self.loramoe_A.shape
        A_KD = self.loramoe_A.reshape(n * r, d)
        down_KD = torch.cat([A_KD, self.loramoe_router, A_KD.new_zeros(-(n * r + n) % 16, d)])
        return down_KD, self.loramoe_B.transpose(1, 2).reshape(n * r, self.out_features)

    def extra_repr(self) -> str:
        routing = "dense" if self.top_k is None else f"top_k={self.top_k}"
        return (
            f"experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"
            f" ({self.dropout_mode}), {routing}"
        )


def _dropped_positions(numel: int, p: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sorted flat indices that a Bernoulli(p) dropout mask over ``numel`` entries zeroes, drawn without the mask.

    The gaps between successive dropped entries of i.i.d. Bernoulli(p) trials are i.i.d. Geometric(p), sampled by
    inversion (``1 + floor(log(1 - u) / log(1 - p))``, float64, so positions are exact integers): about p * numel
    draws instead of numel. Rarely (a 6-sigma shortfall) a second round of draws is needed.
    """
    log_keep = math.log1p(-p)
    chunks, end = [], -1.0
    while end < numel:
        expected = (numel - end) * p
        u = torch.rand(int(expected + 6 * math.sqrt(expected) + 64), dtype=torch.float64, device=device)
        pos = u.neg_().log1p_().div_(log_keep).floor_().add_(1).cumsum_(0).add_(end)  # (draws,) increasing
        chunks.append(pos)
        end = pos[-1].item()
    pos = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return pos[: int(torch.searchsorted(pos, float(numel)))].to(dtype)


def _per_expert_dropped(x_MD: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
    """(M, N*R): ``sum_d (1 - m_n[t, d]) x[t, d] A[n, :, d]`` for N independent Bernoulli(p) dropout masks m_n.

    ``A_n (m_n * x) = A_n x - this``: the N masked copies of x are never built; only the p * N * M * D dropped
    entries are drawn and touched, and autograd keeps their index lists rather than N copies of x and N masks.
    """
    n, r, d = A.shape
    m = x_MD.shape[0]
    index_dtype = torch.int32 if m * n * d < 2**31 else torch.int64  # int32 index arithmetic is ~3x faster
    pos = _dropped_positions(m * n * d, p, x_MD.device, index_dtype)  # flat over (M, N, D), sorted
    row = pos // d  # t * N + n: a row of the (M*N, R) output
    token = row // n
    col = pos - token * (n * d)  # n * D + d: a row of A^T as (N*D, R)
    xi = pos - (row - token) * d  # t * D + d: an entry of x
    table_TR = A.transpose(1, 2).reshape(n * d, r)
    return _SparseExpertInput.apply(x_MD.reshape(-1), table_TR, row, col, xi, m * n).view(m, n * r)


class _SparseExpertInput(torch.autograd.Function):
    """``out[row[k]] += x[xi[k]] * table[col[k]]`` over K entries sorted by row: a sparse (rows, T) @ (T, R) product.

    Forward is one CSR matrix product (in float32 for half types, which the CPU kernel lacks); backward gathers
    per rank column (1-D gathers and scatters vectorise where (K, R) row gathers do not). Saved: x (already kept by
    the dense GEMM), the small table, three index lists.
    """

    @staticmethod
    def forward(ctx, x, table, row, col, xi, rows):
        ctx.save_for_backward(x, table, row, col, xi)
        boundaries = torch.arange(rows + 1, device=row.device, dtype=row.dtype)
        crow = torch.searchsorted(row, boundaries, out_int32=row.dtype == torch.int32)
        dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
            warnings.simplefilter("ignore")
            values = x.index_select(0, xi).to(dtype)
            sparse = torch.sparse_csr_tensor(
                crow, col, values, (rows, table.shape[0]), check_invariants=False
            )
        return torch.sparse.mm(sparse, table.to(dtype)).to(table.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, table, row, col, xi = ctx.saved_tensors
        grad_RT, table_RT = (
            grad.t().contiguous(),
            table.t().contiguous(),
        )  # (R, rows), (R, T): one row per rank
        values = x.index_select(0, xi)
        grad_values = torch.zeros_like(values)
        grad_table_RT = torch.zeros_like(table_RT)
        for grad_r, table_r, grad_table_r in zip(grad_RT, table_RT, grad_table_RT):
            grad_K = grad_r.index_select(0, row)
            if ctx.needs_input_grad[0]:
                grad_values.addcmul_(grad_K, table_r.index_select(0, col))
            if ctx.needs_input_grad[1]:
                grad_table_r.index_add_(0, col, grad_K.mul_(values))
        grad_x = torch.zeros_like(x).index_add_(0, xi, grad_values) if ctx.needs_input_grad[0] else None
        grad_table = grad_table_RT.t() if ctx.needs_input_grad[1] else None
        return grad_x, grad_table, None, None, None, None
