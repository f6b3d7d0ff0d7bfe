"""The token loop: the one decoder of every command that generates (``generate``, ``chat``, ``serve``, the
evaluation engine). Requests join a running batch between steps and leave it the moment they are done.

Design decisions:

- ``model.generate`` applies one set of settings and one stopping rule to a whole batch, and a batch cannot grow;
  a server batch mixes requests with their own temperatures, seeds, stop strings and lengths that arrive at any
  time, so the loop is written out here: a left-padded prefill per join, then one token per step with the KV cache
  and the inputs ``generate`` builds (positions from the attention mask, logits of the last position only, in
  float32), so greedy output equals ``model.generate``'s.
- A request joins at the next step: its prompt is prefilled in a cache of its own and its rows are added to the
  running cache (``inference.cache``); it leaves (end token, stop string, ``max_tokens``, cancelled) at once and is
  answered without waiting for the others.
- One request's failure is its own: its settings are checked when it is made (``Sampling``), its random stream is
  built and its tokens are chosen and decoded to text in isolation, so a bad request ends alone (``on_error``) and
  the others in the batch carry on. A failed forward fails the rows it ran.
- Text is decoded each step only for rows that stream it or have stop strings; the others decode once, at the end.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loramoe.errors import ConfigError
from loramoe.inference import cache as kv
from loramoe.inference.encoding import left_pad, padding_id, stop_token_ids
from loramoe.inference.router_stats import RouterStats, Totals
from loramoe.inference.sampling import Sampling, check_generation_config, next_tokens
from loramoe.inference.text import TextStream
from loramoe.inject import adapted_modules
from loramoe.layer import cached_stacking
from loramoe.models.base import model_device
from loramoe.routing import RouterRecorder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Completion:
    """How a request ended: its text, why it stopped, its token ids, and router statistics if asked for.

    Attributes:
        text: the output, cut at the first end token or stop string, without special tokens or surrounding
            whitespace.
        reason: ``"stop"`` (end token or stop string) or ``"length"``.
        prompt_tokens: the prompt's length in tokens.
        token_ids: every generated token, the end token included.
        router_stats: see ``RouterStats.summary``, when the request asked for them.
    """

    text: str
    reason: str
    prompt_tokens: int
    token_ids: list[int]
    router_stats: dict | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestFailed(Exception):
    """One request failed on its own: ``status`` 400 (its settings) or 500 (decoding it)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


def _never() -> bool:
    return False


@dataclass(eq=False)  # identity: two identical requests are two requests
class Request:
    """One generation: its prompt and settings, the callbacks that answer it, and its decoding state.

    The callbacks run on the decoding thread; ``cancelled`` is read there once per step. ``on_error`` gets a
    ``RequestFailed`` when this request fails alone; without one the failure is raised to the loop's caller.
    """

    prompt_ids: list[int]
    sampling: Sampling
    on_finish: Callable[[Completion], None]
    on_text: Callable[[str], None] | None = None
    on_error: Callable[[RequestFailed], None] | None = None
    router_stats: bool = False
    cancelled: Callable[[], bool] = _never
    ids: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    totals: Totals | None = None


class TokenLoop:
    """Decodes requests on one model, any number at a time. Not thread-safe: one thread runs it.

    Args:
        model: a causal LM (plain, LoRAMoE-adapted or PEFT).
        tokenizer: its tokenizer.

    Raises:
        ConfigError: the model's generation config sets something the loop does not implement.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        check_generation_config(model)
        self.model, self.tokenizer = model, tokenizer
        stops = stop_token_ids(model, tokenizer)
        self.stop_ids, self.pad_id = frozenset(stops), padding_id(tokenizer, stops)
        self.device = model_device(model)
        forward = getattr(model, "get_base_model", lambda: model)().forward
        params = inspect.signature(forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._last_logits_only = "logits_to_keep" in params
        self.router = RouterStats(model, self.device) if adapted_modules(model) else None
        self.active: list[Request] = []  # row -> request
        self._reset()

    def _reset(self) -> None:
        self._cache: Any = None
        self._mask_bW = self._positions_b = self._last_b = self._seen_bV = None

    @contextlib.contextmanager
    def session(self) -> Iterator[TokenLoop]:
        """Eval mode and the experts' stacked weights built once, for the block; both undone on exit."""
        was_training = self.model.training
        self.model.eval()
        try:
            with cached_stacking(self.model):
                yield self
        finally:
            self.model.train(was_training)

    def run(self, requests: list[Request], *, batch_size: int) -> None:
        """Decode ``requests`` to their ends, ``batch_size`` at a time in the order given (a batch is refilled only
        when it is empty, so each prompt sees the padding ``model.generate`` would give it)."""
        with self.session():
            for start in range(0, len(requests), batch_size):
                self.add(requests[start : start + batch_size])
                while self.active:
                    self.step()

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> None:
        """Prefill ``requests``, choose their first tokens and add those still running to the batch."""
        from transformers import DynamicCache

        ready = [r for r in requests if self._start(r)]
        if not ready:
            return
        input_ids, mask_nT = left_pad([r.prompt_ids for r in ready], self.pad_id, self.device)  # (n, T)
        positions_nT = (mask_nT.cumsum(-1) - 1).masked_fill(mask_nT == 0, 0)
        cache = DynamicCache(config=self.model.config)
        logits_nV = self._forward(input_ids, mask_nT, positions_nT, cache, ready, prefill_mask=mask_nT)
        seen_nV = self._seen(ready, logits_nV.shape[-1]) if self._needs_seen(ready) else None
        tokens_n, tokens = self._pick(logits_nV, ready, seen_nV)
        keep = [
            row
            for row, r in enumerate(ready)
            if tokens[row] is not None and not self._advance(r, tokens[row])
        ]
        if not keep:
            return
        rows = torch.tensor(keep, device=self.device)
        if len(keep) < len(ready):
            mask_nT = kv.select(cache, mask_nT, rows)
        if seen_nV is not None:
            seen_nV[torch.arange(len(ready), device=self.device), tokens_n] = True
            seen_nV = seen_nV[rows]
        positions_n = mask_nT.sum(-1)
        if self._cache is None:
            self._cache, self._mask_bW, self._positions_b = cache, mask_nT, positions_n
            self._last_b, self._seen_bV = tokens_n[rows], seen_nV
        else:
            self._mask_bW = kv.join(self._cache, self._mask_bW, cache, mask_nT)
            self._positions_b = torch.cat([self._positions_b, positions_n])
            self._last_b = torch.cat([self._last_b, tokens_n[rows]])
            self._seen_bV = self._join_seen(seen_nV, [ready[row] for row in keep], logits_nV.shape[-1])
        self.active += [ready[row] for row in keep]

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every running request; the ones that are done leave the batch."""
        requests = self.active
        self._mask_bW = torch.cat([self._mask_bW, self._mask_bW.new_ones(len(requests), 1)], dim=1)
        logits_bV = self._forward(
            self._last_b[:, None], self._mask_bW, self._positions_b[:, None], self._cache, requests
        )
        self._positions_b = self._positions_b + 1
        tokens_b, tokens = self._pick(logits_bV, requests, self._seen_bV)
        if self._seen_bV is not None:
            self._seen_bV[torch.arange(len(requests), device=self.device), tokens_b] = True
        keep = [
            row
            for row, r in enumerate(requests)
            if tokens[row] is not None and not self._advance(r, tokens[row])
        ]
        self._last_b = tokens_b
        if len(keep) < len(requests):
            self._leave(keep)

    def fail_all(self, err: BaseException) -> None:
        """The batch's forward failed: every running request fails with it and the batch is emptied."""
        requests, self.active = self.active, []
        self._reset()
        for r in requests:
            self._fail(r, RequestFailed(f"generation failed: {type(err).__name__}: {err}"))

    def _leave(self, keep: list[int]) -> None:
        if not keep:
            self.active = []
            self._reset()
            return
        rows = torch.tensor(keep, device=self.device)
        self._mask_bW = kv.select(self._cache, self._mask_bW, rows)
        self._positions_b, self._last_b = self._positions_b[rows], self._last_b[rows]
        self.active = [self.active[row] for row in keep]
        if self._seen_bV is not None:
            self._seen_bV = self._seen_bV[rows] if self._needs_seen(self.active) else None

    def _start(self, r: Request) -> bool:
        """Set a joining request's decoding state; False (and the request failed) when that fails."""
        try:
            r.ids, r.stream, r.totals = [], TextStream(self.tokenizer, r.sampling.stop), None
            r.generator = r.sampling.generator(self.device)
            return True
        except Exception as err:  # e.g. a seed the generator refuses: this request alone fails
            status = 400 if isinstance(err, (ConfigError, ValueError, OverflowError)) else 500
            self._fail(r, RequestFailed(f"this request's sampling settings failed: {err}", status))
            return False

    def _forward(self, input_ids, mask, positions, cache, requests: list[Request], prefill_mask=None):
        """Last-position logits ``(b, V)`` in float32; router sums added to the requests that asked for them."""
        kwargs = {self._cache_kwarg: cache}
        if self._last_logits_only:
            kwargs["logits_to_keep"] = 1
        record = self.router is not None and any(r.router_stats for r in requests)
        with RouterRecorder(self.model, detach=True) if record else contextlib.nullcontext() as recorder:
            out = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
            )
        if record:
            sums_bTN, layers = RouterStats.take(recorder)
            for row, r in enumerate(requests):
                if not r.router_stats:
                    continue
                if prefill_mask is not None:
                    r.totals = Totals(sums_bTN[row][prefill_mask[row].bool()], layers)
                else:
                    r.totals.add(sums_bTN[row, 0])
        return out.logits[:, -1, :].float()  # (b, V)

    def _pick(self, logits_bV, requests: list[Request], seen_bV) -> tuple[torch.Tensor, list[int | None]]:
        """Each row's next token; a row whose choice fails gets None and fails alone."""
        settings, generators = [r.sampling for r in requests], [r.generator for r in requests]
        # The batch may fail after some rows drew their numbers; those rows draw again from the same point.
        states = [g.get_state() if g is not None else None for g in generators]
        try:
            tokens_b = next_tokens(logits_bV, settings, generators, seen_bV)
            tokens: list[int | None] = tokens_b.tolist()
        except Exception:  # find the row(s) at fault; the others are chosen alone, as they would have been
            tokens_b, tokens = logits_bV.argmax(dim=-1), []
            for row, r in enumerate(requests):
                try:
                    if generators[row] is not None:
                        generators[row].set_state(states[row])
                    seen = None if seen_bV is None else seen_bV[row : row + 1]
                    tokens_b[row] = next_tokens(
                        logits_bV[row : row + 1], [settings[row]], [generators[row]], seen
                    )[0]
                    tokens.append(int(tokens_b[row]))
                except Exception as err:
                    self._fail(
                        r,
                        RequestFailed(
                            f"choosing this request's next token failed: {type(err).__name__}: {err}"
                        ),
                    )
                    tokens.append(None)
        return tokens_b, tokens

    def _advance(self, r: Request, token: int) -> bool:
        """Take one generated token; whether the request is finished (answered, cancelled or failed)."""
        try:
            return self._take(r, token)
        except Exception as err:  # decoding its text or answering it failed: this request alone
            self._fail(r, RequestFailed(f"finishing this request failed: {type(err).__name__}: {err}"))
            return True

    def _take(self, r: Request, token: int) -> bool:
        if r.cancelled():
            return True
        ended = token in self.stop_ids
        r.ids.append(token)
        text_ids = r.ids[:-1] if ended else r.ids
        length = len(r.ids) >= r.sampling.max_tokens
        if r.on_text is not None or r.stream.stop:
            delta = r.stream.update(text_ids, final=ended or length)
            if delta and r.on_text is not None:
                r.on_text(delta)
        elif ended or length:
            r.stream.update(text_ids, final=True)
        if not (ended or length or r.stream.stopped):
            return False
        reason = "stop" if ended or r.stream.stopped else "length"
        stats = self.router.summary(r.totals) if r.totals is not None else None
        r.on_finish(Completion(r.stream.text, reason, len(r.prompt_ids), list(r.ids), stats))
        return True

    @staticmethod
    def _fail(r: Request, err: RequestFailed) -> None:
        if r.on_error is None:
            raise err
        r.on_error(err)

    @staticmethod
    def _needs_seen(requests: list[Request]) -> bool:
        return any(r.sampling.repetition_penalty != 1.0 for r in requests)

    def _seen(self, requests: list[Request], vocab: int) -> torch.Tensor:
        """``(n, V)``: True where a token is in the request's prompt or output so far."""
        seen_nV = torch.zeros(len(requests), vocab, dtype=torch.bool, device=self.device)
        for row, r in enumerate(requests):
            seen_nV[row, torch.tensor(r.prompt_ids + r.ids, device=self.device)] = True
        return seen_nV

    def _join_seen(self, seen_nV, joined: list[Request], vocab: int):
        if seen_nV is None and self._seen_bV is None:
            return None
        old = self._seen_bV if self._seen_bV is not None else self._seen(self.active, vocab)
        new = seen_nV if seen_nV is not None else self._seen(joined, vocab)
        return torch.cat([old, new])
