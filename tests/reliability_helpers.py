"""What the ``test_reliability_*`` modules share: the bad-input corpus's cases, the workspace its relative paths
point at, and real ``loramoe`` processes started in the background.

Those modules test that loramoe never crashes on bad input, never loses a run and never executes a loaded
file: ``test_reliability_corpus`` (every corpus case through the command line and the library),
``test_reliability_fuzzing`` (the record parsers and config validation raise only loramoe errors),
``test_reliability_crash`` (SIGKILL and resume, torn checkpoints, NaN losses) and ``test_reliability_loading``
(pickles refused, ``torch.load`` only with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tiny import tiny_model, tiny_tokenizer

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
REPO = CORPUS.parent.parent
CASES = [
    c
    for manifest in ("generated_cases.json", "hand_cases.json")
    for c in json.loads((CORPUS / manifest).read_text(encoding="utf-8"))
]
GOOD_RECORDS = [
    {"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1), "task_type": i % 2} for i in range(8)
]


def save_tiny(folder: Path, model: torch.nn.Module) -> None:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def make_workspace(tmp_path_factory) -> Path:
    """What the corpus's relative paths point at: tiny models, a good data file and the corpus itself. Each module
    builds its own in a module-scoped ``workspace`` fixture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("workspace")
    save_tiny(root / "base", tiny_model("llama"))
    save_tiny(root / "other", tiny_model("llama", intermediate_size=96))
    noffn = AutoConfig.for_model("gpt_neox", vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    save_tiny(root / "noffn", AutoModelForCausalLM.from_config(noffn))  # an architecture without FFN_TARGETS
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD_RECORDS))
    (root / "corpus").symlink_to(CORPUS, target_is_directory=True)
    return root


class Processes:
    """Real processes started in the background as soon as the workspace exists, so that their slow imports
    overlap the in-process tests: one plain ``python -m loramoe`` on a bad config (unless ``cli=False``), and
    ``workers`` warm workers that import everything, then wait for a job (argv and cwd in their go file) and run
    the command line's ``main`` on it, exactly as the ``loramoe`` entry point does."""

    WORKER = (
        "import json, os, pathlib, sys, time\n"
        "import loramoe.cli\n"
        "loramoe.cli.build_parser()\n"
        "go = pathlib.Path(sys.argv[1])\n"
        "while not go.exists():\n"
        "    time.sleep(0.005)\n"
        "job = json.loads(go.read_text())\n"
        "os.chdir(job['cwd'])\n"
        "sys.exit(loramoe.cli.main(job['argv']))\n"
    )

    def __init__(self, root: Path, workers: int, *, cli: bool = True) -> None:
        self.root, self.procs, self.free = root / "procs", [], []
        self.root.mkdir()
        self.cli_case = CASES[0]
        if cli:
            # its own output directory: the in-process cases remove `out` between cases while this one runs
            argv = [*case_argv(self.cli_case), "training.output_dir=procs/out-cli"]
            self.cli = self._spawn([sys.executable, "-m", "loramoe", *argv], root, "cli")
        for i in range(workers):
            go = self.root / f"go{i}"
            self.free.append((self._spawn([sys.executable, "-c", self.WORKER, str(go)], root, f"w{i}"), go))

    def _spawn(self, argv: list[str], cwd: Path, name: str) -> subprocess.Popen:
        with open(self.root / f"{name}.err", "w") as err:  # a file, not a pipe: nobody reads while they wait
            proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        proc.stderr_path = self.root / f"{name}.err"
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], cwd: Path) -> subprocess.Popen:
        """Hand a job to a warm worker; returns the running process."""
        proc, go = self.free.pop(0)
        tmp = go.with_suffix(".tmp")
        tmp.write_text(json.dumps({"argv": argv, "cwd": str(cwd)}))
        tmp.rename(go)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def case_argv(case: dict) -> list[str]:
    """A corpus case's command line: ``loramoe train`` on its config, or ``loramoe generate`` on its adapter."""
    if "config" in case:
        return ["train", case["config"], *case.get("overrides", [])]
    argv = ["generate", "--adapter", case["adapter"], "--prompt", "hi", "--max-new-tokens", "1"]
    return argv + (["--model", case["model"]] if "model" in case else [])
