"""Generated token ids to text: cut at the first stop string, streamed as deltas that no later token can change.

Design decisions:

- Text is decoded from the whole generated sequence each time and what grew is sent: simple, and always consistent
  with the final text, which is cut at the first stop string and stripped of surrounding whitespace.
- Text that a later token could still change (a partial UTF-8 character, the start of a stop string, trailing
  whitespace) is held back until it is settled.
"""

from __future__ import annotations

import functools
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
        self._prefixes = tuple(map(_stop_prefixes, self.stop))
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

        Only the prefixes of a stop string that end in the text's last character can end the text, so only those
        are compared, the longest first, each built once per stop string (``_stop_prefixes``): a step costs a
        look-up per stop string and a comparison per such prefix, and builds no slices (for stop strings up to
        ``PREFIXES_KEPT_UP_TO`` characters).
        """
        if not text:
            return 0
        longest, last = 0, text[-1]
        for prefixes, ending_in in self._prefixes:
            for k in ending_in.get(last, ()):
                if k <= longest:
                    break
                if text.endswith(prefixes[k]):
                    longest = k
                    break
        return longest


# Stop strings up to this long keep all their prefixes (about 32k characters at 256, the server's limit); a longer
# one, which only the library and the command line accept, slices the prefixes it compares.
PREFIXES_KEPT_UP_TO = 256


class _Prefixes:
    """``stop[:k]`` at index k, sliced when asked."""

    def __init__(self, stop: str):
        self.stop = stop

    def __getitem__(self, k: int) -> str:
        return self.stop[:k]


@functools.lru_cache(maxsize=64)
def _stop_prefixes(stop: str) -> tuple[Sequence[str] | _Prefixes, dict[str, tuple[int, ...]]]:
    """The proper prefixes of ``stop`` by length, and a character -> the lengths of those that end in it, longest
    first; shared by the streams with this stop string."""
    ends: dict[str, list[int]] = {}
    for k in range(len(stop) - 1, 0, -1):
        ends.setdefault(stop[k - 1], []).append(k)
    keep = len(stop) <= PREFIXES_KEPT_UP_TO
    prefixes = tuple(stop[:k] for k in range(len(stop))) if keep else _Prefixes(stop)
    return prefixes, {char: tuple(ks) for char, ks in ends.items()}
