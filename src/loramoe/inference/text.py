"""Generated token ids to text: cut at the first stop string, streamed as deltas that no later token can change.

Design decisions:

- Text is decoded from the whole generated sequence each time and what grew is sent: simple, and always consistent
  with the final text, which is cut at the first stop string and stripped of surrounding whitespace.
- Text that a later token could still change (a partial UTF-8 character, the start of a stop string, trailing
  whitespace) is held back until it is settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for the first bytes of a character still being generated


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
        """Length of the longest end of ``text`` that begins some stop string (it may complete it later).

        Only a prefix of a stop string that ends in the text's last character can end the text, so ``rfind`` jumps
        from one such prefix length to the next shorter one: usually one search per stop string and no slice.
        """
        if not text:
            return 0
        longest, last = 0, text[-1]
        for s in self.stop:
            k = min(len(s) - 1, len(text))
            while k > longest:
                if s[k - 1] != last:
                    k = s.rfind(last, 0, k) + 1  # the longest prefix shorter than k that ends in ``last``
                    if k <= longest:
                        break
                if text.endswith(s[:k]):
                    longest = k
                    break
                k -= 1
        return longest
