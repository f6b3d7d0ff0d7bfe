"""Write the generated half of the bad-input corpus: ``generated/`` and ``generated_cases.json``.

Run from the repository root: ``.venv/bin/python tests/bad_inputs/make_corpus.py`` (deterministic; commit the
result). The hand-written half is ``hand/`` and ``hand_cases.json``; ``tests/guarantees/test_bad_input_corpus.py`` runs
both.

A case is one manifest entry:

- ``{"id", "config": "generated/configs/x.yaml", "overrides": [...]}``: ``loramoe train CONFIG [OVERRIDES]``;
- ``{"id", "adapter": "generated/adapters/x", "model": "other"}``: ``loramoe generate --adapter ... [--model]``;

with ``"error"`` (the ``loramoe.errors`` type the library raises) and ``"match"`` (a regex the one-line message
must contain: the file and the line or field, and what is wrong). Paths inside configs are relative to the test's
workspace, which holds ``base/`` (a tiny llama and its tokenizer), ``other/`` (a tiny llama of another FFN width),
``noffn/`` (a tiny model of an architecture without known FFN targets), ``good.jsonl`` and ``corpus/`` (this
folder).

The generators: ``corpus_data.py`` (data files), ``corpus_configs.py`` (configs and overrides) and
``corpus_adapters.py`` (adapters and model folders); ``corpus_cases.py`` holds the case registry they share.
"""

from __future__ import annotations

import json
import shutil

from corpus_adapters import gen_adapters
from corpus_cases import HERE, KNOWN_BUGS, OUT, cases
from corpus_configs import gen_configs
from corpus_data import gen_data


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    gen_data()
    gen_configs()
    gen_adapters()
    for c in cases:
        if c["id"] in KNOWN_BUGS:
            c["known_bug"] = KNOWN_BUGS[c["id"]]
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    (HERE / "generated_cases.json").write_text(json.dumps(cases, indent=1) + "\n", encoding="utf-8")
    print(f"{len(cases)} generated cases in {OUT}")


if __name__ == "__main__":
    main()
