"""Batched decoding for the server: one forward per step for every sequence in the batch, each with its own settings.

Design decisions:

- ``model.generate`` applies one set of sampling settings and one stopping rule to a whole batch; a server batch
  mixes requests with different temperatures, seeds, stop strings and lengths, so the step loop is written out here:
  a left-padded prefill, then one token per step with the KV cache, exactly the inputs ``generate`` builds
  (positions from the attention mask, the mask dropped when nothing is padded, logits of the last position only),
  so greedy output equals ``loramoe generate``'s.
- Each sequence stops on its own (an end token, a stop string, ``max_tokens``, or its request gone); finished rows
  leave the batch and the KV cache at once, so the rest run on a smaller batch and the finished request is answered
  without waiting for the others.
- Text is streamed by decoding the whole generated sequence each step and sending what grew: simple, and always
  consistent with the final text, which is cut at the first stop string and stripped like ``generate``'s output.
  Text that a later token could still change (a partial UTF-8 character, the start of a stop string, trailing
  whitespace) is held back until it is settled.
- Router statistics (``RouterRecorder``) are recorded only for batches in which some request asked for them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loramoe.inference.generate import left_pad, model_device
from loramoe.inject import adapted_modules, get_config
from loramoe.layer import cached_stacking
from loramoe.routing import RouterRecorder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for the first bytes of a character still being generated
# Generation-config settings that change greedy output under ``model.generate`` but are not applied here.
UNAPPLIED_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                      "begin_suppress_tokens", "min_new_tokens", "min_length", "forced_bos_token_id",
                      "forced_eos_token_id", "sequence_bias")  # fmt: skip


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded.

    Attributes:
        max_tokens: most tokens to generate.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling mass in (0, 1].
        stop: strings that end the output (not included in it).
        seed: seed of this request's sampler; ``None`` draws one.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Finish:
    """How a sequence ended: its final text, why it stopped, token counts, and router statistics if asked for."""

    text: str
    reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    router_stats: dict | None = None


@dataclass
class Generation:
    """One request inside a batch: its prompt and settings, the callbacks that answer it, and its decoding state.

    ``on_text`` and ``on_finish`` are called on the decoding thread; ``cancelled`` is read there once per step.
    """

    prompt_ids: list[int]
    sampling: Sampling
    on_text: Callable[[str], None]
    on_finish: Callable[[Finish], None]
    router_stats: bool = False
    cancelled: Callable[[], bool] = lambda: False
    ids: list[int] = field(default_factory=list)
    stream: TextStream | None = None


class TextStream:
    """Turns a growing list of generated token ids into text deltas, cut at the first stop string.

    ``text`` is what has been sent so far; once ``final`` is set it is the whole output (stripped).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.text = ""
        self.stopped = False  # a stop string was found

    def update(self, ids: list[int], *, final: bool = False) -> str:
        """The new text since the last call; with ``final`` (or once a stop string appears) everything left."""
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = self._first_stop(full)
        if cut is not None:
            full, self.stopped, final = full[:cut], True, True
        visible = full.lstrip()
        if final:
            settled = visible.rstrip()
        else:
            settled = visible.rstrip(REPLACEMENT_CHAR)
            settled = settled[: len(settled) - self._stop_prefix_len(settled)].rstrip()
        if len(settled) <= len(self.text) or not settled.startswith(self.text):
            return ""
        delta, self.text = settled[len(self.text) :], settled
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string (it may complete it later)."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


class Decoder:
    """Runs batches of sequences on one model. Not thread-safe: one thread decodes at a time.

    Args:
        model: a causal LM in eval mode (plain, LoRAMoE-adapted or PEFT).
        tokenizer: its tokenizer.
        stop_ids: token ids that end a sequence (``generate.stop_token_ids``).
        pad_id: the id left padding uses.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int], pad_id: int
    ):
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids, self.pad_id = frozenset(stop_ids), pad_id
        self.device = model_device(model)
        forward = getattr(model, "get_base_model", lambda: model)().forward
        params = inspect.signature(forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._last_logits_only = "logits_to_keep" in params
        self.has_router = bool(adapted_modules(model))
        _warn_unapplied(model)
        if self.has_router:
            cfg = get_config(model)
            self.group_names = tuple(cfg.task_names)
            self._onehot_NK = torch.nn.functional.one_hot(
                torch.tensor(cfg.group_of_expert(), device=self.device)
            ).float()  # (N, K)

    @torch.inference_mode()
    def run(self, seqs: list[Generation]) -> None:
        """Decode every sequence to its end, streaming text and finishing each as soon as it is done."""
        from transformers import DynamicCache

        for seq in seqs:
            seq.ids, seq.stream = [], TextStream(self.tokenizer, seq.sampling.stop)
        generators = [self._generator(seq.sampling) for seq in seqs]
        input_ids, attention_mask = left_pad([s.prompt_ids for s in seqs], self.pad_id, self.device)  # (B, T)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
        padded = len({len(s.prompt_ids) for s in seqs}) > 1
        cache = DynamicCache(config=self.model.config)
        record = self.has_router and any(s.router_stats for s in seqs)
        router = _RouterTotals(self, attention_mask) if record else None
        active = list(range(len(seqs)))  # batch row -> index into seqs
        recording = RouterRecorder(self.model, detach=True) if record else contextlib.nullcontext()
        with cached_stacking(self.model), recording as recorder:
            logits_bV = self._forward(input_ids, attention_mask if padded else None, position_ids, cache)
            if router is not None:
                router.add_prefill(recorder)
            while True:
                tokens_b = self._next_tokens(
                    logits_bV, [seqs[i] for i in active], [generators[i] for i in active]
                )
                keep = [
                    row
                    for row, token in enumerate(tokens_b.tolist())
                    if not self._step(seqs[active[row]], token, router, active[row])
                ]
                if not keep:
                    return
                if len(keep) < len(active):
                    rows = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(rows)
                    tokens_b, attention_mask, position_ids = (
                        tokens_b[rows],
                        attention_mask[rows],
                        position_ids[rows],
                    )
                    active = [active[row] for row in keep]
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
                position_ids = position_ids[:, -1:] + 1  # (b, 1)
                logits_bV = self._forward(
                    tokens_b[:, None], attention_mask if padded else None, position_ids, cache
                )
                if router is not None:
                    router.add_step(recorder, active)

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        kwargs = {self._cache_kwarg: cache}
        if self._last_logits_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -1, :].float()  # (b, V)

    def _step(self, seq: Generation, token: int, router: _RouterTotals | None, index: int) -> bool:
        """Take one generated token; returns whether the sequence is finished (and then answers it)."""
        if seq.cancelled():
            return True
        ended = token in self.stop_ids
        seq.ids.append(token)
        text_ids = seq.ids[:-1] if ended else seq.ids
        length = len(seq.ids) >= seq.sampling.max_tokens
        delta = seq.stream.update(text_ids, final=ended or length)
        if delta:
            seq.on_text(delta)
        if not (ended or length or seq.stream.stopped):
            return False
        reason = "stop" if ended or seq.stream.stopped else "length"
        stats = router.stats(index) if router is not None and seq.router_stats else None
        seq.on_finish(Finish(seq.stream.text, reason, len(seq.prompt_ids), len(seq.ids), stats))
        return True

    def _generator(self, sampling: Sampling) -> torch.Generator | None:
        if sampling.temperature == 0:
            return None
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        return torch.Generator(self.device).manual_seed(seed)

    @staticmethod
    def _next_tokens(logits_bV: torch.Tensor, seqs: list[Generation], generators: list) -> torch.Tensor:
        tokens_b = logits_bV.argmax(dim=-1)
        for row, (seq, generator) in enumerate(zip(seqs, generators)):
            if generator is not None:
                # The maximum is subtracted first so that a tiny temperature gives 0 and -inf, never inf - inf.
                scaled_V = (logits_bV[row] - logits_bV[row].max()) / seq.sampling.temperature
                probs_V = _top_p(torch.softmax(scaled_V, dim=-1), seq.sampling.top_p)
                tokens_b[row] = torch.multinomial(probs_V, 1, generator=generator)[0]
        return tokens_b


def _warn_unapplied(model: PreTrainedModel) -> None:
    config = getattr(model, "generation_config", None)
    changed = [n for n in UNAPPLIED_SETTINGS if getattr(config, n, None) not in (None, 0, 1.0, [], ())]
    if changed:
        logger.warning(
            "the model's generation config sets %s, which the server does not apply; its answers can differ "
            "from model.generate's",
            ", ".join(changed),
        )


def _top_p(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens whose mass reaches ``top_p`` (at least one); the rest get probability 0."""
    if top_p >= 1:
        return probs_V
    sorted_V, order_V = probs_V.sort(descending=True)
    drop_V = sorted_V.cumsum(0) - sorted_V >= top_p  # the mass before a token already reaches top_p
    return probs_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, 0.0))


class _RouterTotals:
    """Per sequence: router probabilities summed over layers and over the prompt's and the completion's positions.

    The completion's positions are the generated tokens the model read back (each step feeds the previous token).
    """

    def __init__(self, decoder: Decoder, attention_mask_BT: torch.Tensor):
        n = decoder._onehot_NK.shape[0]
        batch = attention_mask_BT.shape[0]
        self.decoder, self.mask_BT = decoder, attention_mask_BT.float()
        self.prompt_BN = torch.zeros(batch, n, device=decoder.device)
        self.completion_BN = torch.zeros(batch, n, device=decoder.device)
        self.completion_positions_B = torch.zeros(batch, device=decoder.device)
        self.layers = 0

    @staticmethod
    def _take(recorder: RouterRecorder) -> torch.Tensor:
        """The last forward's records, summed over layers ``(b, T, N)``, removed from the recorder."""
        return torch.stack([records.pop().float() for records in recorder.probs.values()]).sum(0)

    def add_prefill(self, recorder: RouterRecorder) -> None:
        self.layers = len(recorder.probs)
        self.prompt_BN += (self._take(recorder) * self.mask_BT.unsqueeze(-1)).sum(1)

    def add_step(self, recorder: RouterRecorder, active: list[int]) -> None:
        rows = torch.tensor(active, device=self.decoder.device)
        self.completion_BN.index_add_(0, rows, self._take(recorder)[:, 0])
        self.completion_positions_B[rows] += 1

    def stats(self, index: int) -> dict:
        """Mean router mass per expert and per expert group, over layers and positions, for the prompt and the output."""
        prompt_N = self.prompt_BN[index] / (self.layers * self.mask_BT[index].sum())
        completion_N = self.completion_BN[index] / (
            self.layers * self.completion_positions_B[index].clamp_min(1)
        )
        names = self.decoder.group_names
        out: dict = {"groups": list(names)}
        for part, mass_N, positions in (
            ("prompt", prompt_N, self.mask_BT[index].sum()),
            ("completion", completion_N, self.completion_positions_B[index]),
        ):
            group_K = mass_N @ self.decoder._onehot_NK
            out[part] = {
                "positions": int(positions),
                "group_mass": dict(zip(names, group_K.tolist())) if positions > 0 else None,
                "expert_mass": mass_N.tolist() if positions > 0 else None,
            }
        out["layers"] = self.layers
        return out
