"""The lm-eval model type ``loramoe``: a Hugging Face causal LM with an optional LoRAMoE adapter.

Importing this module registers the type, after which ``lm_eval.simple_evaluate(model="loramoe",
model_args="pretrained=BASE,adapter=DIR")`` works; ``loramoe lm-eval`` (``loramoe.cli.harness``) is lm-eval's own
command line with the type registered.

Design decisions:

- Subclass ``HFLM`` and hand it an already-built model: loading (alias resolution, dtype) is
  ``loramoe.models.base.load_base``'s job, adapters are read by ``loramoe.models.trained.load_trained`` (loramoe, PEFT LoRA
  baseline or fully fine-tuned output) or, for a model object, ``loramoe.adapter.load_adapter``.
- lm-eval builds and tokenizes the requests (chat templates, its joint context + continuation encoding) and runs
  generation; the log-likelihood forward pass is the evaluation engine's (``loramoe.eval.engine``), the one the
  demo and the experiments score choices with, so the project has one implementation of it.
- ``get_model_info`` is overridden: the parent asks the Hub for a commit hash, which is a network call and is
  meaningless for a local base plus adapter.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM

from loramoe.errors import ConfigError
from loramoe.eval.engine import continuation_logprobs
from loramoe.validation import is_int

__all__ = ["MODEL_TYPE", "LoRAMoELM"]

MODEL_TYPE = "loramoe"

log = logging.getLogger(__name__)


class LoRAMoELM(HFLM):
    """``HFLM`` over a base causal LM with an optional adapter.

    Args:
        pretrained: A base model name, alias (``smollm2-135m-instruct``) or directory; or an already-built
            ``PreTrainedModel`` (give ``tokenizer`` too; an adapter, if any, is injected into it in place).
            May be omitted when ``adapter`` names its base model.
        adapter: A loramoe adapter directory (``loramoe.save_adapter``) or any training output that
            ``loramoe.models.trained.load_trained`` reads (a PEFT LoRA baseline, a fully fine-tuned model); ``None``
            evaluates the base model.
        tokenizer: A tokenizer object or name; default: the one that comes with the base model.
        dtype: Weights dtype when loading by name (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; default CUDA when available. Ignored for a model object.
        **kwargs: Passed to ``HFLM`` (``batch_size``, ``max_length``, ``add_bos_token``, ...).

    Raises:
        ConfigError: Neither ``pretrained`` nor ``adapter`` given.
    """

    def __init__(
        self,
        pretrained: str | torch.nn.Module | None = None,
        adapter: str | os.PathLike[str] | None = None,
        tokenizer: Any = None,
        dtype: str = "float32",
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        adapter = os.fspath(adapter) if adapter else None
        if pretrained is None or isinstance(pretrained, str):
            model, loaded_tokenizer = _load_by_name(pretrained or None, adapter, str(dtype))
            tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        else:
            model = pretrained
            if adapter:
                from loramoe.adapter import load_adapter

                model = load_adapter(model, adapter)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.base_name = getattr(model, "name_or_path", "") or str(pretrained or "")
        self.adapter = adapter

    def get_model_info(self) -> dict[str, Any]:
        """What the results JSON records about the model: size, dtype, base and adapter (no network)."""
        first = next(self.model.parameters())
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(first.dtype),
            "base_model": self.base_name,
            "adapter": self.adapter,
        }

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """lm-eval's tokenized log-likelihood requests, scored by :func:`loramoe.eval.engine.continuation_logprobs`.

        lm-eval tokenizes (its joint context + continuation encoding); the forward pass is the engine's, the same
        code the demo and the experiments score choices with. Consecutive requests with the same context (one
        document's choices) form one item, and its continuations that differ only in their last token share a
        forward pass (lm-eval's own rule). A context too long for the model loses tokens on the left, as in
        ``HFLM``. ``batch_size="auto"`` uses 16.
        """
        # (context, continuations, request indices)
        groups: list[tuple[list[int], list[list[int]], list[int]]] = []
        for index, (_strings, context, continuation) in enumerate(requests):
            context = self._fit_context(context, continuation)
            if groups and groups[-1][0] == context:
                groups[-1][1].append(continuation)
                groups[-1][2].append(index)
            else:
                groups.append((context, [continuation], [index]))
        batch = override_bs or (self.batch_size if is_int(self.batch_size) else 16)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scored = continuation_logprobs(
            self.model,
            [(ctx, conts) for ctx, conts, _ in groups],
            batch_size=batch,
            pad_id=pad,
            share="prefix",
        )
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for (_ctx, _conts, indices), row in zip(groups, scored, strict=True):
            for index, answer in zip(indices, row, strict=True):
                answers[index] = answer
                # Rolling requests (no context) are cached per document by lm-eval itself.
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        return answers

    def _fit_context(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context cut from the left so that context + continuation fits the model's length."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise ConfigError(
                f"a continuation of {len(continuation)} tokens leaves no room for context in the model's "
                f"{self.max_length} positions; shorten the choices or raise max_length"
            )
        if len(context) > room:
            log.warning("context of %d tokens cut to its last %d to fit %d positions", len(context), room,
                        self.max_length)  # fmt: skip
            return context[-room:]
        return context


def _load_by_name(name: str | None, adapter: str | None, dtype: str) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)``: the base alone, or a training output / adapter on its base (lazy imports)."""
    if adapter is None:
        if name is None:
            raise ConfigError("the loramoe model type needs pretrained=BASE, adapter=DIR, or both")
        from loramoe.models.base import load_base

        return load_base(name, dtype=dtype)
    from loramoe.models.trained import load_trained

    return load_trained(adapter, base=name, dtype=dtype)


def _register() -> None:
    # Guarded: lm-eval refuses a second registration of a name (a reloaded module).
    if MODEL_TYPE not in model_registry:
        register_model(MODEL_TYPE)(LoRAMoELM)


_register()
