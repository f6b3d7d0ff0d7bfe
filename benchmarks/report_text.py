"""The fixed prose of docs/benchmarks.md (method, findings, what was verified where); report.py adds the figures."""

METHOD = """## How it is measured

Reproduce with `python benchmarks/run.py` (about 40 minutes here; `--quick`: 4 layers, 3 rounds, about 15).

- Every figure is side by side: in each of {repeats} rounds every variant runs once, in an order that rotates
  from round to round, after one untimed warm-up each. Ratios (the `/ ...` and `throughput / ...` columns, and
  the targets) are the median of the per-round ratios: pairing cancels the drift of the machine's load between
  rounds. The absolute columns (s/step, tokens/s, ms) are each variant's own median and can disagree with the
  paired ratio when the load drifts; trust the ratio. Round-to-round scatter of a ratio is a few percent, so a
  ratio within about 0.03 of its threshold is a tie.
- Time is the CPU time of the benchmark process (`time.process_time`), with one torch thread. The machine's
  two cores are shared with other work (load average in the table above); wall time, also reported, moves with
  that load, and with two OpenMP threads small ops stalled for milliseconds whenever the other core was taken
  (measured 10x slower), so one thread gives the stable, comparable number. Absolute speeds are those of one core.
- The model is the SmolLM2-135M architecture (hidden 576, FFN 1536, 9 heads, 3 KV heads, vocab 49152, tied
  embeddings) built from a `LlamaConfig` with random weights, float32, {layers} decoder layers. The per-expert
  loop is measured at 8 layers, beside the fused layer and PEFT at the same depth: it keeps N masked copies of x
  and N (M, O) products per adapted linear for backward (2.6x PEFT's activation memory, see below), about 10 GB at
  30 layers, which was OOM-killed on this shared 24 GB machine. All variants share one copy of the base weights.
- The train step is forward, cross-entropy, backward, AdamW step; the balancing loss (LBC) is not included, so
  the numbers compare the adapters alone. The floor is the frozen base with backward to `inputs_embeds` and no
  optimizer (its backward also runs through layer 0's attention, which the adapters' does not need: 1/30 of the
  attention backward, so the floor is, if anything, slightly slow).
- Adapters: PEFT LoRA r = 24 (= N * R) with `lora_dropout`, unmerged; loramoe N = 6, R = 4, alpha 32 (fused: the
  library; loop: `benchmarks/reference.py`, the reference code's structure with the same parameters). B is random
  (std 1e-3), not the zero init. Dropout 0.05 as in training: `per_expert` (N masks, the reference) and `shared`
  (one mask, like PEFT's), plus a no-dropout pair (`p=0`). Generation runs in eval mode, so dropout is off there.
- Peak memory: each variant in a fresh process; after one warm-up step the kernel's high-water mark is reset
  (`/proc/self/clear_refs`) and read after one more step. "Step peak delta" is that peak minus the resident size
  just before the step (activations, gradients, temporaries); "peak RSS" includes the weights and the runtime.
- Layer level: one frozen `nn.Linear` with 4 x 256 tokens; "adapter ms" is the median over rounds of (adapted
  fwd+bwd) - (bare fwd+bwd) of the same round. "previous" is the earlier fused forward
  (`reference.PreviousFusedLinear`: dense per-expert masks on N copies of x)."""

FINDINGS = """## What was changed in `src/loramoe/layer.py`, and why

Profiled with `torch.profiler` at the layer level; each change was measured side by side against the previous
forward (layer-level adapter cost, 1536 -> 576 and 576 -> 1536, 1024 tokens):

1. **Per-expert dropout without N copies of x.** The old forward expanded x to (N, M, D) and ran `F.dropout` on it:
   N * M * D Bernoulli draws (about 10 ns each on this CPU), N masked copies of x and N float noise tensors kept
   for backward. Now `A_n (m_n * x) = A_n x - A_n ((1 - m_n) * x)`: one dense GEMM on the undropped x, minus a
   sparse product over the dropped entries only. Those are drawn directly: the gaps between dropped entries of
   i.i.d. Bernoulli(p) trials are Geometric(p), sampled by inversion in float64, so about p * N * M * D draws (5 %)
   instead of N * M * D; the correction is one CSR sparse-dense product forward and per-rank gathers/scatters
   backward (`_kernels._SparseExpertInput`); autograd keeps int32 index lists, not masks. A fixed number of gaps is
   drawn (8 standard deviations above the expected count, the overshoot pointing at a sentinel), so no count is
   read on the host. Same distribution (except with probability below 1e-15 per call), and values and gradients
   equal to explicit masks (both checked in `tests/unit/test_kernels.py`).
2. **Shared dropout** draws the dropped positions the same way and zeroes them in one copy of x (`index_fill`, on
   a copy one slot longer that absorbs the sentinel);
   backward zeroes the same positions of the gradient. No dense Bernoulli pass and no noise tensor (PEFT keeps both).
3. **Router and experts in one GEMM** (no dropout, or per-expert dropout): x @ [A; W_g]^T, so one gradient GEMM
   back to x instead of two plus an add; its width is padded to a multiple of 16 rows because MKL ran a 30-wide
   output at half the speed of a 32-wide one.
4. **Fast layout for the up-projection**: B is used as (N*R, O) row-major (`h @ B_KO`) instead of `F.linear` with an
   (O, N*R) weight; MKL runs this skinny GEMM 2x faster at O = 1536. The `+ result` is fused into it (`addmm`).
5. **No per-call rebuild in generation**: `[A; W_g; 0]` and B's (N*R, O) layout are rebuilt on every call, except
   inside a `cached_stacking(model)` block (which `loramoe.generate` opens: the caller promises not to change the
   adapter inside, as with `torch.nn.utils.parametrize.cached()`): three fewer ops per adapted linear per decoding
   step. The earlier cache keyed on torch's private version counter; the before / after table above measures the
   change.
6. **Scaling folded**: `alpha / R`, the router weight and dropout's `1 / (1 - p)` are one (M, N) scale of the
   (M, N, R) hidden, never an (M, O) multiply.
7. **Top-k computes only the chosen experts**: the M * k (token, expert) pairs are sorted by expert (one stable
   argsort), x is gathered once in that order, each expert runs its two GEMMs on one contiguous block, and one
   `index_add` mixes the results back; the router stays dense for the balancing loss. Two earlier forms are kept
   in `benchmarks/reference.py` and measured beside it: a Python loop that finds and gathers each expert's tokens
   (`GatherTopKLinear`, what other implementations do) and every expert computed with the others' weights zeroed
   (`DenseTopKLinear`, no FLOP saving). The FLOP saving turns into time once the experts are large enough to
   outweigh the gather and scatter of (M * k) rows: at R = 32 the library's top-2 of 16 costs well under dense;
   at the default R = 4 the expert GEMMs are so cheap and memory-bound that moving the rows costs more than
   computing every expert (the two top-k tables above). Per-expert dropout is natural here: each gathered row is
   one (token, expert) pair, so one dropout call draws an independent mask per expert. The grouped form reads the
   experts' token counts on the host (one sync per linear), so it runs on the CPU only; on an accelerator and
   under `torch.compile` top-k takes the dense-masked form, which has no sync and, at R = 4, is the faster one.
8. **No host-device sync in a training step**: nothing in the layer, the LBC or the router recorder reads a tensor's
   value on the host (proved by running a whole step on the `meta` device, where any such read raises), and the
   layer compiles with `fullgraph=True` to the eager values and gradients (`tests/unit/test_compile.py`). On the CPU the
   per-expert dropout keeps MKL's CSR product (the fastest measured there); compiled or on an accelerator it is an
   `index_add` with the same draws.
"""

SCALING_OUT = """## Scaling out: what was verified where

| what | where | how |
|---|---|---|
| training step without host syncs (dense, per-expert / shared dropout, top-k) | CPU-tested | `meta`-device step and `fullgraph=True` compile (`aot_eager`), `tests/unit/test_compile.py` |
| same on a GPU (`torch.cuda.set_sync_debug_mode("error")`), inductor speed | GPU-ready, not run | `scripts/gpu_check.sh` (`benchmarks/device_bench.py`); no GPU is lent to this project |
| FSDP2 (`fully_shard`), 2 ranks against 1 process, adapter saved whole from shards | CPU-tested (gloo) | `tests/unit/test_distributed.py`, `tests/scripts/fsdp_train.py`: losses and adapters bit-identical |
| FSDP through `accelerate launch` (shipped config) | GPU-ready, not run; refused on the CPU | accelerate 1.16 enables FSDP only on accelerators and would run DDP; loramoe stops with that reason |
| DeepSpeed ZeRO-2/3 | not runnable here; configs validated | DeepSpeed's schema (`DeepSpeedConfig`) in `tests/unit/test_recipe.py`; accelerate refuses it on the CPU and its CPU backend JIT-compiles a C++ op |
| bfloat16 base with float32 adapters, bfloat16 autocast | CPU-tested (tiny model) | `tests/unit/test_half_precision.py`, tolerances stated there |
| the paper-scale recipe (LLaMA-2-7B, 8 x rank 4, bf16) | dry run on a tiny LLaMA | `tests/unit/test_recipe.py`; the run itself needs 8 GPUs |
"""

PER_EXPERT_WHY = """Why per-expert dropout misses: it is N = 6 independent masks per adapted linear (the reference's
choice) against PEFT's one. The fused layer no longer builds N masked copies of x (the loop and the previous
forward did, and pay several times more), but each dropped entry of each expert's mask is still drawn, gathered
and scattered back in backward: 6 x 0.05 = 0.3 entries per element of x, in index passes torch cannot fuse on a CPU,
against PEFT's one streaming multiply. The dropout alone costs about twice PEFT's per linear (summary above), a few
percent of the step. Like for like, one shared mask against PEFT's one mask, the fused step is {shared} PEFT's.
The floor target is stricter than PEFT parity here: PEFT LoRA itself takes {peft_floor}x the floor at 4 x 256.
`dropout_mode="shared"` (or no dropout) is the fast choice; `per_expert` stays the default because it is the
reference's method."""
