"""Never crash on bad input, never lose a run, never execute a loaded file.

- The bad-input corpus (``tests/bad_inputs``): every case, through the command line, ends in one line naming the
  file and what is wrong, exit code 2 and no traceback; through the library, in its specific ``loramoe.errors`` type.
- Fuzzing: the record parsers and the config validation raise nothing but loramoe errors.
- Crash safety: training killed with SIGKILL at random moments and resumed gives bitwise the adapter of an
  uninterrupted run; torn checkpoints are skipped; a NaN loss stops the run naming the step.
- Loading is data only: pickles are refused, and no ``torch.load`` in ``src/`` goes without ``weights_only=True``.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loramoe.errors as errors
from loramoe.cli import main
from loramoe.cli.overrides import apply_overrides
from loramoe.config import LoRAMoEConfig
from loramoe.data.formats import parse_records, read_records
from loramoe.errors import LoRAMoEError
from loramoe.files import load_yaml
from loramoe.models.trained import load_trained
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """What the corpus's relative paths point at: tiny models, a good data file and the corpus itself."""
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
    overlap the in-process tests: one plain ``python -m loramoe`` on a bad config, and warm workers that import
    everything, then wait for a job (argv and cwd in their go file) and run the command line's ``main`` on it,
    exactly as the ``loramoe`` entry point does."""

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

    def __init__(self, root: Path, workers: int) -> None:
        self.root, self.procs, self.free = root / "procs", [], []
        self.root.mkdir()
        self.cli_case = CASES[0]
        # its own output directory: the in-process cases remove `out` between cases while this one runs
        argv = [*_argv(self.cli_case), "training.output_dir=procs/out-cli"]
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


@pytest.fixture(scope="module")
def processes(workspace):
    procs = Processes(workspace, workers=4)
    yield procs
    procs.close()


def _argv(case: dict) -> list[str]:
    if "config" in case:
        return ["train", case["config"], *case.get("overrides", [])]
    argv = ["generate", "--adapter", case["adapter"], "--prompt", "hi", "--max-new-tokens", "1"]
    return argv + (["--model", case["model"]] if "model" in case else [])


def _names(case: dict) -> str:
    """What the one-line error must name: the data file, config file, adapter folder or override."""
    if "names" in case:
        return case["names"]
    if case["id"].startswith("data/"):
        return case["id"].split("/", 1)[1]
    if "overrides" in case:
        return case["overrides"][0]
    return Path(case.get("config") or case["adapter"]).name


def _library_call(case: dict) -> None:
    if "config" in case:
        raw = apply_overrides(load_yaml(case["config"]), case.get("overrides", []))
        train(RunConfig.from_dict(raw))
    else:
        load_trained(case["adapter"], base=case.get("model"))


def test_corpus_is_large_and_every_case_names_a_loramoe_error():
    assert len(CASES) >= 200
    assert len({c["id"] for c in CASES}) == len(CASES)
    for c in CASES:
        cls = getattr(errors, c["error"])
        assert issubclass(cls, LoRAMoEError) and cls is not LoRAMoEError, c["id"]


def test_corpus_controls_load_and_train(workspace, processes, monkeypatch, capsys):
    """The corpus's good adapters load and its config template trains, so each case fails for its one defect.

    (``processes`` is requested here, by the first test, to start the background processes early.)"""
    monkeypatch.chdir(workspace)
    for adapter in ("good", "peft-good"):
        model, _ = load_trained(f"corpus/generated/adapters/{adapter}")
        assert not model.training
    load_trained("base")  # a full fine-tuning output is a model directory
    assert main(["train", "corpus/generated/configs/override-base.yaml"]) == 0
    assert main(["generate", "--adapter", "out", "--prompt", "hi", "--max-new-tokens", "2"]) == 0


def _param(case: dict):
    """A case whose ``known_bug`` is not fixed yet is expected to fail (reported; see the manifest)."""
    marks = [pytest.mark.xfail(reason=case["known_bug"], strict=False)] if "known_bug" in case else []
    return pytest.param(case, id=case["id"], marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_a_specific_error(case, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    shutil.rmtree(workspace / "out", ignore_errors=True)
    capsys.readouterr()
    assert main(_argv(case)) == 2, f"{case['id']}: expected exit code 2"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("loramoe ")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"loramoe {_argv(case)[0]}: error: ")
    assert re.search(case["match"], line), f"{case['id']}: {line!r} does not match {case['match']!r}"
    assert _names(case) in line, f"{case['id']}: {line!r} does not name {_names(case)!r}"

    expected = getattr(errors, case["error"])
    with pytest.raises(LoRAMoEError) as info:
        _library_call(case)
    assert type(info.value) is expected, f"{case['id']}: {type(info.value).__name__}: {info.value}"
    assert re.search(case["match"], str(info.value)), str(info.value)


def test_real_processes_exit_2_with_one_line_and_no_traceback(workspace, processes):
    """``python -m loramoe train`` on a bad data file, and the entry point's ``main`` on a bad adapter."""
    adapter_case = next(c for c in CASES if "adapter" in c)
    runs = [
        (processes.cli_case, processes.cli),
        (adapter_case, processes.run(_argv(adapter_case), workspace)),
    ]
    for case, proc in runs:
        assert proc.wait(timeout=1200) == 2, case["id"]  # generous: shared CI machines get very loaded
        stderr = proc.stderr_path.read_text()
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert [line for line in stderr.splitlines() if "error:" in line] == [last]
        assert re.search(case["match"], last), last


def test_long_samples_are_truncated_and_counted_not_errors(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace)
    long = [{"instruction": "x" * 300, "output": "y", "task_type": 0}, {"instruction": "q", "output": "z" * 300,
            "task_type": 1}]  # fmt: skip
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    raw = yaml.safe_load((CORPUS / "generated/configs/override-base.yaml").read_text())
    raw["data"]["sources"] = [{"path": str(tmp_path / "long.jsonl")}]
    raw["training"]["output_dir"] = str(tmp_path / "out")
    metrics = train(RunConfig.from_dict(raw))
    assert metrics["data"]["prompt_truncated"] == 1 and metrics["data"]["answer_truncated"] == 1


# --- fuzzing -------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
record_keys = st.sampled_from(
    ["instruction", "input", "output", "question", "answer", "answers", "prompt", "completion", "messages",
     "task_type", "role", "content", "value", "x"]
)  # fmt: skip
records = st.dictionaries(record_keys, json_values | st.text(max_size=5), max_size=5) | json_values
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(rows=st.lists(records, max_size=4), fmt=st.sampled_from(["auto", "alpaca", "qa", "messages", "chat", "csv"]),
       task_type=st.none() | st.integers(0, 1), skip=st.booleans())  # fmt: skip
def test_parse_records_raises_only_loramoe_errors(rows, fmt, task_type, skip):
    try:
        examples, _, _ = parse_records(
            [("f.jsonl", i + 1, r) for i, r in enumerate(rows)],
            task_names=("downstream", "knowledge"),
            fmt=fmt,
            task_type=task_type,
            skip_invalid=skip,
        )
    except LoRAMoEError:
        return
    assert all(e.answer.strip() and e.prompt.strip() and e.task_type in (0, 1) for e in examples)


@FUZZ
@given(data=st.binary(max_size=200) | st.lists(records, max_size=4).map(lambda r: json.dumps(r).encode()),
       cut=st.integers(0, 200), skip=st.booleans())  # fmt: skip
def test_read_records_raises_only_loramoe_errors(tmp_path_factory, data, cut, skip):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(data[: cut or None])
    try:
        rows, _ = read_records(path, skip_invalid=skip)
        parse_records(rows, task_names=("downstream", "knowledge"), skip_invalid=skip)
    except LoRAMoEError:
        pass


LORAMOE_FIELDS = [f for f in LoRAMoEConfig.__dataclass_fields__] + ["bogus"]


@FUZZ
@given(st.dictionaries(st.sampled_from(LORAMOE_FIELDS), json_values, max_size=4))
def test_loramoe_config_from_dict_raises_only_config_errors(data):
    try:
        cfg = LoRAMoEConfig.from_dict(data)
    except errors.ConfigError:
        return
    assert LoRAMoEConfig.from_json(cfg.to_json()) == cfg


@FUZZ
@given(
    top=st.dictionaries(
        st.sampled_from(["model", "method", "dtype", "lora", "bogus"]), json_values, max_size=2
    ),
    loramoe=st.dictionaries(st.sampled_from(LORAMOE_FIELDS), json_values, max_size=2),
    data=st.dictionaries(
        st.sampled_from(["max_length", "seed", "template", "val_size", "total_samples", "x"]),
        json_values,
        max_size=2,
    ),  # fmt: skip
    source=st.dictionaries(
        st.sampled_from(
            [
                "path",
                "format",
                "task_type",
                "num_samples",
                "ratio",
                "columns",
                "skip_invalid",
                "name",
                "split",
            ]
        ),
        json_values,
        max_size=2,
    ),  # fmt: skip
    training=st.dictionaries(
        st.sampled_from(
            [
                "learning_rate",
                "max_steps",
                "seed",
                "save_steps",
                "bf16",
                "lr_scheduler_type",
                "per_device_train_batch_size",
                "output_dir",
                "num_train_epochs",
                "warmup_steps",
                "optim",
            ]
        ),
        json_values,
        max_size=2,
    ),  # fmt: skip
)
def test_run_config_from_dict_raises_only_config_errors(top, loramoe, data, source, training):
    raw = {
        "loramoe": loramoe,
        "data": {"sources": [{"path": "x.jsonl", **source}], **data},
        "training": {"output_dir": "/nonexistent/out", **training},
        **top,
    }
    with contextlib.suppress(errors.ConfigError):
        RunConfig.from_dict(raw)


# --- crash safety ----------------------------------------------------------------------------------------------


def _run_config(root: Path, out: Path, **training) -> dict:
    return {
        "model": str(root / "base"),
        "loramoe": {"num_experts": 4, "rank": 2, "dropout": 0.1},
        "data": {"sources": [{"path": str(root / "good.jsonl")}], "max_length": 48},
        "training": {"output_dir": str(out), "max_steps": 40, "per_device_train_batch_size": 2, "learning_rate": 5e-3,
                     "save_steps": 3, "logging_steps": 1, "use_cpu": True, "disable_tqdm": True,
                     "dataloader_num_workers": 0, **training},
    }  # fmt: skip


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter_bitwise(
    workspace, processes, tmp_path
):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "killed"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_run_config(workspace, out)))
    reference = tmp_path / "reference"
    train(RunConfig.from_dict(_run_config(workspace, reference)))  # the uninterrupted run
    kills = []
    for _ in range(3):
        # Kill when a random later checkpoint (1 to 3 saves on) has begun to appear, after a random delay of up to
        # 50 ms: mid-save or a step or two later, wherever it falls, on a fast machine or a loaded one.
        past = max(_checkpoint_steps(out), default=0)
        target, delay = past + 3 * rng.randint(1, 3), rng.uniform(0.0, 0.05)
        proc = processes.run(["train", str(config), "--resume"], tmp_path)
        deadline = time.monotonic() + 1200
        while max(_checkpoint_steps(out), default=0) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "training made no checkpoint"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr_path.read_text()
        kills.append((target, round(delay, 3), proc.returncode))
    print(f"seed {seed}; kills (at checkpoint step, delay s, exit code): {kills}")
    assert all(rc == -signal.SIGKILL for *_, rc in kills), kills
    assert main(["train", str(config), "--resume"]) == 0
    want, got = _adapter(reference), _adapter(out)
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, (
        f"seed {seed}, kills (after step, delay, rc) {kills}: {len(differ)} tensors differ: {differ[0]}"
    )


def test_torn_checkpoints_are_skipped_and_the_previous_good_one_is_used(workspace, tmp_path, caplog):
    from loramoe.training.checkpoints import COMPLETE_MARKER, latest_good_checkpoint

    out = tmp_path / "run"
    train(RunConfig.from_dict(_run_config(workspace, out, max_steps=9)))
    assert _checkpoint_steps(out) == [3, 6, 9]
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")
    (out / "checkpoint-9" / COMPLETE_MARKER).unlink()  # killed before the marker
    weights = out / "checkpoint-6" / "adapter_model.safetensors"  # torn after the marker
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="loramoe.train"):
        assert latest_good_checkpoint(out) == str(out / "checkpoint-3")
    assert "checkpoint-9" in caplog.text and "checkpoint-6" in caplog.text and "torn" in caplog.text
    # the resumed run starts at step 3, removes the torn ones, and writes good ones in their place
    train(RunConfig.from_dict(_run_config(workspace, out, max_steps=9)), resume=True)
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 10))  # none redone
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(workspace, tmp_path, monkeypatch):
    import loramoe.training.train as train_module
    from loramoe.training.checkpoints import latest_good_checkpoint

    prepare = train_module.prepare_model
    calls = {"n": 0}

    def poisoned(model, run):  # the 5th training forward returns a NaN loss
        model = prepare(model, run)

        def hook(module, args, output):
            calls["n"] += module.training
            if calls["n"] == 5:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "prepare_model", poisoned)
    out = tmp_path / "run"
    with pytest.raises(errors.TrainingError, match=r"loss is nan at step 5.*checkpoint-3"):
        train(RunConfig.from_dict(_run_config(workspace, out, max_steps=10)))
    assert latest_good_checkpoint(out) == str(out / "checkpoint-3")
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a failed run


def test_absurd_learning_rate_exits_2_naming_the_step(workspace, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(_run_config(workspace, tmp_path / "run", learning_rate=1e30, save_steps=1))
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"loramoe train: error: .*(loss is (nan|inf)|NaN or infinite).* step \d+", err), err


# --- loading is data only ------------------------------------------------------------------------------------


def test_pickle_adapters_are_refused_without_being_unpickled(workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(workspace)
    marker = tmp_path / "pwned"
    folder = tmp_path / "adapter"
    shutil.copytree(CORPUS / "generated/adapters/good", folder)
    (folder / "adapter_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Payload()}, folder / "adapter_model.bin")
    with pytest.raises(
        errors.AdapterError, match=r"refusing to load a pickle file \(unpickling can run arbitrary"
    ):
        load_trained(folder)
    assert not marker.exists()


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (
                name == "load"
                and isinstance(func, ast.Attribute)
                and getattr(func.value, "id", "") == "torch"
            ):
                yield node


def test_src_never_calls_torch_load_without_weights_only():
    sources = sorted((REPO / "src").rglob("*.py"))
    assert sources
    for path in sources:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for call in _torch_load_calls(tree):
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in call.keywords
            )
            assert safe, f"{path}:{call.lineno}: torch.load without weights_only=True"
        # no aliases or pickle-based loaders either
        assert not re.search(
            r"from torch import .*\bload\b|\bpickle\.loads?\(|\bdill\b|numpy\.load\(.*allow_pickle=True", text
        ), path
