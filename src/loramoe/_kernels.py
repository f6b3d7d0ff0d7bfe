"""Private fast paths of ``LoRAMoELinear``; tests/unit/test_kernels.py checks each against plain dense masks and loops.

Shape names (M, D, O, N, R, H, k, S, P) as defined once in layer.py's legend.

Design decisions:
- Nothing here reads a tensor's value on the host: every shape is fixed by the input shapes, so the training step
  runs without host-device syncs and compiles with ``fullgraph=True``. The one exception, ``grouped_top_k``, is
  chosen only on the CPU outside ``torch.compile`` (``use_cpu_kernels``), where reading a count is a memory load.
- Dropout never materialises a mask: the dropped entries are drawn directly, as the geometric gaps between them
  (about p of the draws of a dense mask). A fixed number of gaps is drawn, 8 standard deviations above the
  expected count; positions past the end point at a sentinel that contributes nothing. The law differs from
  Bernoulli(p) only when more entries than that are dropped (probability below 1e-15 per call), in which case the
  last ones are kept.
- Per-expert dropout subtracts the dropped entries' contribution from the dense ``A_n x`` as a sparse product, so
  the N masked copies of x are never built or kept for backward. On the CPU the forward is a CSR matrix product
  (MKL's is the fastest form measured there); elsewhere, and when compiling, it is an ``index_add``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F


def use_cpu_kernels(x: torch.Tensor) -> bool:
    """True for eager CPU tensors: the CSR sparse product and the grouped top-k (one count read) are used."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def stack_down(A_NRD: torch.Tensor, router_ND: torch.Tensor) -> torch.Tensor:
    """``[A; W_g; 0]`` as (H + N + pad, D), expert-major rows: the experts' and the router's GEMM in one.

    The zero rows pad the width to a multiple of 16: MKL runs a (M, 30) GEMM output at half the speed of (M, 32).
    """
    n, r, d = A_NRD.shape
    A_HD = A_NRD.reshape(n * r, d)
    return torch.cat([A_HD, router_ND, A_HD.new_zeros(-(n * r + n) % 16, d)])


def stack_up(B_NOR: torch.Tensor) -> torch.Tensor:
    """B as (H, O) row-major, the fast layout for the skinny up-projection GEMM (2x at O = 1536 on the CPU)."""
    n, o, r = B_NOR.shape
    return B_NOR.transpose(1, 2).reshape(n * r, o)


def dropped_positions(numel: int, p: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sorted flat indices that a Bernoulli(p) dropout mask over ``numel`` entries zeroes, drawn without the mask.

    The gaps between successive dropped entries of i.i.d. Bernoulli(p) trials are i.i.d. Geometric(p), sampled by
    inversion (``1 + floor(log(1 - u) / log(1 - p))``, float64, so positions are exact integers). The number of
    draws depends only on ``numel`` and ``p``; draws that land past the end are set to ``numel`` (a sentinel the
    callers ignore), so the result has a fixed length P.
    """
    expected = numel * p
    draws = int(expected + 8 * math.sqrt(expected) + 64)
    u = torch.rand(draws, dtype=torch.float64, device=device)
    pos = u.neg_().log1p_().div_(math.log1p(-p)).floor_().add_(1).cumsum_(0).sub_(1)  # (P,) increasing
    return pos.clamp_max_(numel).to(dtype)


def shared_dropout(x_MD: torch.Tensor, p: float) -> torch.Tensor:
    """x with one Bernoulli(p) mask applied, not rescaled by 1 / (1 - p) (the layer folds that into its scale)."""
    pos = dropped_positions(x_MD.numel(), p, x_MD.device, torch.int64)
    # One slot past the end absorbs the sentinel positions; the copy is the one index_fill would make anyway.
    x_padded = torch.cat([x_MD.reshape(-1), x_MD.new_zeros(1)])
    return x_padded.index_fill_(0, pos, 0.0)[:-1].view_as(x_MD)


def per_expert_dropped(x_MD: torch.Tensor, A_NRD: torch.Tensor, p: float) -> torch.Tensor:
    """(M, H): ``sum_d (1 - m_n[t, d]) x[t, d] A[n, :, d]`` for N independent Bernoulli(p) masks ``m_n``.

    ``A_n (m_n * x) = A_n x - this``: only the p * N * M * D dropped entries are drawn and touched, and autograd
    keeps their index lists rather than N copies of x and N masks.
    """
    n, r, d = A_NRD.shape
    m = x_MD.shape[0]
    numel = m * n * d
    index_dtype = torch.int32 if numel < 2**31 else torch.int64  # int32 index arithmetic is ~3x faster on CPU
    pos_P = dropped_positions(
        numel, p, x_MD.device, index_dtype
    )  # flat over (M, N, D), sorted, sentinel numel
    # The sentinel maps to row M*N - 1 (keeping rows sorted) and to the zero row appended to the table.
    row_P = (pos_P // d).clamp_max_(m * n - 1)  # t * N + n: a row of the (M*N, R) output
    token_P = pos_P // (n * d)
    col_P = (pos_P - token_P * (n * d)).masked_fill_(
        pos_P == numel, n * d
    )  # n * D + d: a row of A^T (N*D, R)
    xi_P = (token_P * d + col_P % d).clamp_max_(m * d - 1)  # t * D + d: an entry of x
    table = torch.cat([A_NRD.transpose(1, 2).reshape(n * d, r), A_NRD.new_zeros(1, r)])  # (N*D + 1, R)
    out = _SparseExpertInput.apply(x_MD.reshape(-1), table, row_P, col_P, xi_P, m * n, use_cpu_kernels(x_MD))
    return out.view(m, n * r)


class _SparseExpertInput(torch.autograd.Function):
    """``out[row[i]] += x[xi[i]] * table[col[i]]`` over P entries sorted by row: a sparse (rows, N*D+1) @ (N*D+1, R)
    product.

    Forward is one CSR matrix product on the CPU (in float32 for half types, which the CPU kernel lacks) and an
    ``index_add`` elsewhere; backward gathers per rank column (1-D gathers and scatters vectorise where (P, R) row
    gathers do not). Saved: x (already kept by the dense GEMM), the small table, three index lists.
    """

    @staticmethod
    def forward(ctx, x, table, row, col, xi, rows, csr):
        ctx.save_for_backward(x, table, row, col, xi)
        values = x.index_select(0, xi)
        if not csr:
            gathered = values.unsqueeze(-1).to(table.dtype) * table.index_select(0, col)  # (P, R)
            return table.new_zeros(rows, table.shape[1]).index_add_(0, row, gathered)
        boundaries = torch.arange(rows + 1, device=row.device, dtype=row.dtype)
        crow = torch.searchsorted(row, boundaries, out_int32=row.dtype == torch.int32)
        dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
            warnings.simplefilter("ignore")
            sparse = torch.sparse_csr_tensor(
                crow, col, values.to(dtype), (rows, table.shape[0]), check_invariants=False
            )
        return torch.sparse.mm(sparse, table.to(dtype)).to(table.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, table, row, col, xi = ctx.saved_tensors
        grad_t, table_t = grad.t().contiguous(), table.t().contiguous()  # one row per rank
        values = x.index_select(0, xi)
        grad_values = torch.zeros_like(values)
        grad_table_t = torch.zeros_like(table_t)
        for grad_r, table_r, grad_table_r in zip(grad_t, table_t, grad_table_t):
            grad_P = grad_r.index_select(0, row)
            if ctx.needs_input_grad[0]:
                grad_values.addcmul_(grad_P, table_r.index_select(0, col))
            if ctx.needs_input_grad[1]:
                grad_table_r.index_add_(0, col, grad_P.mul_(values))
        grad_x = torch.zeros_like(x).index_add_(0, xi, grad_values) if ctx.needs_input_grad[0] else None
        grad_table = grad_table_t.t() if ctx.needs_input_grad[1] else None
        return grad_x, grad_table, None, None, None, None, None


def grouped_top_k(
    result_MO: torch.Tensor,
    x_MD: torch.Tensor,
    weights_Mk: torch.Tensor,
    experts_Mk: torch.Tensor,
    A_NRD: torch.Tensor,
    B_NOR: torch.Tensor,
    dropout: float,
    dropout_mode: str,
) -> torch.Tensor:
    """``result + sum_j weights[t, j] * B_e A_e drop(x_t)`` with ``e = experts[t, j]``: only the chosen experts run.

    The (token, expert) pairs are sorted by expert, x is gathered once in that order, each expert runs two GEMMs on
    its contiguous block, and one ``index_add`` mixes the results back. The block sizes are read on the host (one
    sync), so this form is used on the CPU only. Dropout here is already rescaled (``F.dropout``).
    """
    n, k = A_NRD.shape[0], experts_Mk.shape[1]
    expert_S = experts_Mk.reshape(-1)
    order_S = torch.argsort(expert_S, stable=True)  # (token, slot) pairs grouped by expert
    token_S = order_S.div(k, rounding_mode="floor")
    counts = torch.bincount(expert_S, minlength=n).tolist()
    if dropout > 0 and dropout_mode == "shared":  # one mask on x, before the gather
        x_MD = F.dropout(x_MD, dropout)
    x_SD = x_MD.index_select(0, token_S)
    if dropout > 0 and dropout_mode == "per_expert":  # each row is one (token, expert) pair
        x_SD = F.dropout(x_SD, dropout)
    scale_S1 = weights_Mk.reshape(-1).index_select(0, order_S).to(x_SD.dtype).unsqueeze(-1)
    h_SR = torch.cat([x_e @ A.t() for x_e, A in zip(x_SD.split(counts), A_NRD)]) * scale_S1
    y_SO = torch.cat([h_e @ B.t() for h_e, B in zip(h_SR.split(counts), B_NOR)])
    if result_MO.dtype == y_SO.dtype:
        return result_MO.index_add(0, token_S, y_SO)
    return result_MO + y_SO.new_zeros(result_MO.shape).index_add_(0, token_S, y_SO).to(result_MO.dtype)
