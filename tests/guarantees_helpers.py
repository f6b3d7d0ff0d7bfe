"""What the ``test_guarantees_*`` modules share: a workspace with a tiny base and a good data file, a run config
on it, a fingerprint of a folder, and the one error line of a failed command.

Those modules test the guarantees against an outside adversary, one module per class of attack
(docs/reliability.md):

1. ``test_guarantees_ownership``: never delete or overwrite what is not ours; rotate only after the new
   checkpoint verifies;
2. ``test_guarantees_loading``: never unpickle: one loading gate for every weight file;
3. ``test_guarantees_results``: never a silently wrong result: strict adapters, finite tensors and gradients,
   checked task types;
4. ``test_guarantees_config``: a config that validates does not fail once training starts;
5. ``test_guarantees_parsing``: bounded parsing and reading;
6. ``test_guarantees_entry_points``: generate / chat / routing and library entry points fail with
   ``loramoe.errors`` types.

The bad-input corpus (``tests/bad_inputs``, run by ``test_reliability_corpus.py``) holds the command-line cases of
each class; these tests cover what a corpus case cannot: that nothing was deleted or executed, resumes, crashes at
a chosen moment, and library calls.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from loramoe.cli import main
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from tiny import tiny_model, tiny_tokenizer

RECORDS = [
    {"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1), "task_type": i % 2} for i in range(8)
]


def make_root(tmp_path_factory) -> Path:
    """A fresh folder with ``base/`` (a tiny llama and its tokenizer) and ``good.jsonl`` (eight good records).
    Each module builds its own in a module-scoped ``root`` fixture."""
    root = tmp_path_factory.mktemp("guarantees")
    tiny_model("llama").save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def config(root: Path, out: Path, **training) -> dict:
    return {
        "model": str(root / "base"),
        "loramoe": {"num_experts": 2, "rank": 2},
        "data": {"sources": [{"path": str(root / "good.jsonl")}], "max_length": 48},
        "training": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                     "save_steps": 3, "use_cpu": True, "disable_tqdm": True, "report_to": "none", **training},
    }  # fmt: skip


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes: equal trees mean nothing was touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("loramoe ")]
    assert len(lines) == 1, err
    return lines[0]


def owned_run(root: Path, out: Path, **training) -> None:
    train(RunConfig.from_dict(config(root, out, **training)))


def batch(B: int = 2, T: int = 5) -> dict:
    """A batch of random token ids, without task types."""
    ids = torch.randint(0, 300, (B, T))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
