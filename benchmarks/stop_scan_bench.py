"""The per-step cost of ``TextStream``'s search for the end of the text that may begin a stop string, at the longest
stop strings ``loramoe serve`` accepts (4 of 256 characters): ``python benchmarks/stop_scan_bench.py``.

Each decoding step of every stream in a batch runs this search on the thread that decodes the batch. Cases: text
ending in a character that no stop string holds (the usual step), text whose end begins every stop string, and
the worst case, where every prefix length ends in the text's last character. The previous
search (a slice of the stop string for every length tried) is timed beside the current one. Prints one JSON object:
microseconds per step, the median of interleaved rounds (``benchmarks.timing``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from benchmarks.timing import interleaved, median  # noqa: E402
from loramoe.inference.text import TextStream  # noqa: E402

STOPS, CHARS, TEXT_CHARS = 4, 256, 2000


def previous_stop_prefix_len(stop: tuple[str, ...], text: str) -> int:
    """The search as it was: for each stop string, a slice for every prefix length from the longest down."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def cases(chars: int, text_chars: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (text, stop strings)."""
    return {
        # words ending in a character that no stop string holds
        "no candidate": (
            ("lorem ipsum " * text_chars)[:text_chars],
            tuple(str(i) * chars for i in range(STOPS)),
        ),
        # every stop string is "a...a" and a digit: the text's end of "a"s begins each one, at the longest length
        "end begins each stop": ("a" * text_chars, tuple("a" * (chars - 1) + str(i) for i in range(STOPS))),
        # the text's last character ends every prefix of every stop string ("b...b" and a digit), and only the
        # shortest ends the text: every length is compared, as before
        "every length compared": (
            "ab" * (text_chars // 2),
            tuple("b" * (chars - 1) + str(i) for i in range(STOPS)),
        ),
    }


def time_case(text: str, stop: tuple[str, ...], *, repeats: int, calls: int) -> dict[str, float]:
    """Microseconds per search, previous and current, on one text."""
    stream = TextStream(None, stop)
    assert stream._stop_prefix_len(text) == previous_stop_prefix_len(stop, text)

    def current() -> None:
        for _ in range(calls):
            stream._stop_prefix_len(text)

    def previous() -> None:
        for _ in range(calls):
            previous_stop_prefix_len(stop, text)

    samples = interleaved({"previous": previous, "current": current}, repeats=repeats)
    return {variant: round(median(s["cpu_s"]) / calls * 1e6, 2) for variant, s in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="short stop strings and few rounds (smoke test)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    chars, repeats, calls = (16, 3, 10) if args.tiny else (CHARS, 31, 2000)
    results = {"stop_strings": STOPS, "stop_chars": chars, "text_chars": TEXT_CHARS, "us_per_step": {}}
    for name, (text, stop) in cases(chars, TEXT_CHARS).items():
        results["us_per_step"][name] = time_case(text, stop, repeats=repeats, calls=calls)
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
