"""The guarantees against an outside adversary, one section per class of attack (docs/reliability.md):

1. never delete or overwrite what is not ours; rotate only after the new checkpoint verifies;
2. never unpickle: one loading gate for every weight file;
3. never a silently wrong result: strict adapters, finite tensors and gradients, checked task types;
4. a config that validates does not fail once training starts;
5. bounded parsing and reading;
6. generate / chat / routing and library entry points fail with ``loramoe.errors`` types.

The bad-input corpus (``tests/bad_inputs``, run by ``test_reliability.py``) holds the command-line cases of each
class; these tests cover what a corpus case cannot: that nothing was deleted or executed, resumes, crashes at a
chosen moment, and library calls.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loramoe.training.train as train_module
import loramoe.training.trainer as trainer_module
from loramoe.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loramoe.cli import main
from loramoe.cli.overrides import apply_overrides
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError, ConfigError, DataError, LoRAMoEError, TrainingError
from loramoe.files import load_yaml
from loramoe.inject import adapted_modules, inject
from loramoe.loss import compute_loss, localized_balancing_loss
from loramoe.models.base import load_base
from loramoe.models.trained import load_trained
from loramoe.routing import RouterRecorder, routing_sums
from loramoe.training.checkpoints import OWNER_MARKER, latest_good_checkpoint
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from tiny import tiny_model, tiny_tokenizer

SRC = Path(__file__).resolve().parent.parent / "src" / "loramoe"
RECORDS = [
    {"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1), "task_type": i % 2} for i in range(8)
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
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


# --- 1. ownership before deletion -----------------------------------------------------------------------------


def foreign_project(folder: Path) -> None:
    (folder / "checkpoint-500").mkdir(parents=True)
    (folder / "checkpoint-500" / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(os.urandom(64))
    (folder / "notes.txt").write_text("another project's results\n")


@pytest.mark.parametrize("resume", [False, True])
def test_a_directory_loramoe_did_not_write_is_refused_and_left_intact(root, tmp_path, capsys, resume):
    out = tmp_path / "theirs"
    foreign_project(out)
    before = tree(out)
    with pytest.raises(
        ConfigError, match=r"holds files loramoe did not write \(checkpoint-500, notes\.txt\)"
    ):
        train(RunConfig.from_dict(config(root, out)), resume=resume)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(root, out)))
    line = cli_error(capsys, ["train", str(cfg), *(["--resume"] if resume else [])])
    assert "did not write" in line and not re.search(r"\bdelete\b|--resume", line), line
    assert tree(out) == before


def test_a_foreign_checkpoint_inside_a_loramoe_run_is_never_deleted(root, tmp_path, capsys):
    out = tmp_path / "ours"
    owned_run(root, out)
    assert (out / OWNER_MARKER).is_file() and (out / "checkpoint-3" / OWNER_MARKER).is_file()
    foreign = out / "checkpoint-9"  # newer than ours, no marker: a resume used to remove it as "torn"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(os.urandom(128))
    impostor = out / "checkpoint-6"  # a marker naming another run
    impostor.mkdir()
    (impostor / OWNER_MARKER).write_text(json.dumps({"run_id": "someone-else"}))
    before = tree(out)
    for resume in (True, False):
        with pytest.raises(ConfigError, match=r"checkpoint-9: not written by this loramoe run.*Move it out"):
            train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=resume)
    assert tree(out) == before
    shutil.rmtree(foreign)  # the user moves it away; the impostor is still not ours
    with pytest.raises(ConfigError, match=r"checkpoint-6: not written by this loramoe run"):
        train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=True)
    assert (impostor / OWNER_MARKER).is_file()


class Killed(BaseException):
    """Stands for SIGKILL at one chosen moment: nothing after it runs, no handler catches it."""


def test_rotation_waits_for_the_new_checkpoint_to_verify(root, tmp_path, monkeypatch, caplog):
    """save_total_limit=1 and a crash after checkpoint-6 is written but before its marker: checkpoint-3, the last
    good one, is still there, and the resumed run continues from step 3, not from step 0."""
    out = tmp_path / "run"
    real = trainer_module.mark_complete

    def crash_at_6(folder, run_id=None):
        if folder.name == "checkpoint-6":
            raise Killed
        real(folder, run_id)

    monkeypatch.setattr(trainer_module, "mark_complete", crash_at_6)
    with pytest.raises(Killed):
        owned_run(root, out, max_steps=9, save_total_limit=1)
    assert latest_good_checkpoint(out) == str(out / "checkpoint-3")
    monkeypatch.setattr(trainer_module, "mark_complete", real)
    with caplog.at_level("INFO", logger="loramoe.train"):
        train(RunConfig.from_dict(config(root, out, max_steps=9, save_total_limit=1)), resume=True)
    assert f"resuming from {out / 'checkpoint-3'}" in caplog.text  # continued, not restarted from step 0
    assert "removing" in caplog.text and "checkpoint-6" in caplog.text  # its own torn one, replaced
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-9"]  # rotated once verified


def test_what_a_kill_leaves_mid_create_or_mid_remove_is_finished_on_resume(root, tmp_path):
    """Checkpoint folders are created and removed under hidden names holding the run id (then renamed), so a kill
    at any moment leaves either nothing or such a hidden folder, never a marker-less checkpoint-N; the next run
    finishes them. A claim killed half way (the owner marker's temporary file) does not make the directory foreign."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{OWNER_MARKER}.x1y2.tmp").write_text("{")  # killed while claiming
    owned_run(root, out)
    run_id = json.loads((out / OWNER_MARKER).read_text())["run_id"]
    creating = out / f".checkpoint-6.new-{run_id}"  # killed before the rename into checkpoint-6
    creating.mkdir()
    removing = out / f".checkpoint-3.removing-{run_id}"  # killed in the middle of a removal
    removing.mkdir()
    (removing / "optimizer.pt").write_bytes(b"half")
    train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=True)
    assert not creating.exists() and not removing.exists()
    assert latest_good_checkpoint(out) == str(out / "checkpoint-6")


def test_an_output_directory_of_an_earlier_loramoe_resumes_from_its_verified_checkpoints(root, tmp_path):
    """Written before owner markers: its complete checkpoints (loramoe's own completion marker verifies) are found
    and resumed from; a torn one without markers cannot be proven to be loramoe's and is refused, not removed."""
    from loramoe.training.checkpoints import mark_complete

    out = tmp_path / "old"
    owned_run(root, out, max_steps=6)
    (out / OWNER_MARKER).unlink()
    for folder in out.glob("checkpoint-*"):
        (folder / OWNER_MARKER).unlink()
        mark_complete(folder)  # as an earlier loramoe wrote it: no run id
    assert latest_good_checkpoint(out) == str(out / "checkpoint-6")
    torn = out / "checkpoint-9"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"half")
    with pytest.raises(ConfigError, match=r"checkpoint-9: not written by this loramoe run"):
        train(RunConfig.from_dict(config(root, out, max_steps=9)), resume=True)
    assert torn.is_dir()
    shutil.rmtree(torn)  # the user moves it away
    train(RunConfig.from_dict(config(root, out, max_steps=9)), resume=True)
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")


def _deleting_calls(tree_: ast.AST):
    """The enclosing function of every call that deletes a file or folder (``shutil.rmtree``, ``os.remove``,
    ``os.unlink``, ``os.rmdir``, ``Path.unlink``/``rmdir``) in a module."""
    for fn in ast.walk(tree_):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
                    if name in ("rmtree", "unlink", "rmdir", "removedirs") or (
                        name == "remove" and owner == "os"
                    ):
                        yield fn.name


# Where loramoe deletes, and what: this run's checkpoints (after checking ownership), its own temporary files.
ALLOWED_DELETIONS = {
    ("checkpoints.py", "_remove_owned"),  # a checkpoint this run proved is its own, right before
    ("checkpoints.py", "_sweep_leftovers"),  # its own hidden folders a kill left, named by its run id
    ("checkpoints.py", "claim_output_dir"),  # the probe file it just wrote
    ("files.py", "atomic_path"),  # its own temporary file, when a write fails
}


def test_deletion_happens_only_in_the_guarded_places():
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        for function in _deleting_calls(ast.parse(path.read_text(encoding="utf-8"))):
            found.add((path.name, function))
    conversion = {f for f in found if f[1] == "_ensure_converted"}  # its own temporary conversion folders
    assert found - conversion <= ALLOWED_DELETIONS, found - conversion - ALLOWED_DELETIONS
    assert ("checkpoints.py", "_remove_owned") in found


def test_no_message_recommends_destroying_data():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.search(r"\b(delete|remove|rm -rf|erase|wipe) (it|them|the folder|the directory)\b",
                                     node.value, re.I), f"{path.name}: {node.value!r}"  # fmt: skip


# --- 2. one loading gate: safetensors only --------------------------------------------------------------------


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_pickle(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": Payload(marker)}, path)


def full_output(folder: Path) -> None:
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def test_pickle_weights_are_refused_wherever_a_loader_reads_weights(root, tmp_path):
    """Each loader (loramoe adapter, PEFT adapter, full output, base model, a base named by an adapter, a base to
    train), with only a pickle (whose unpickling would create a file) and an unrelated safetensors file beside."""
    marker = tmp_path / "pwned"
    full = tmp_path / "full"
    full_output(full)
    (full / "model.safetensors").rename(full / "unrelated.safetensors")
    evil_pickle(full / "pytorch_model.bin", marker)
    adapter = tmp_path / "adapter"
    save_adapter(
        inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2)),
        adapter,
        base_name_or_path=str(full),
    )
    named = tmp_path / "names-a-pickle-base"
    shutil.copytree(adapter, named)
    (adapter / WEIGHTS_NAME).rename(adapter / "unrelated.safetensors")
    evil_pickle(adapter / "adapter_model.bin", marker)
    from peft import LoraConfig, get_peft_model

    peft = tmp_path / "peft"
    base = tiny_model("llama")
    get_peft_model(base, LoraConfig(r=2, target_modules=["up_proj"])).save_pretrained(peft)
    (peft / "adapter_model.safetensors").rename(peft / "unrelated.safetensors")
    evil_pickle(peft / "adapter_model.bin", marker)
    meta = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(
        json.dumps({**meta, "base_model_name_or_path": str(root / "base")})
    )

    refusal = r"pytorch_model\.bin|adapter_model\.bin"
    for call in (
        lambda: load_trained(full),
        lambda: load_trained(adapter),
        lambda: load_trained(peft),
        lambda: load_trained(named),
        lambda: load_base(str(full)),
        lambda: train(RunConfig.from_dict({**config(root, tmp_path / "out"), "model": str(full)})),
    ):
        with pytest.raises(
            LoRAMoEError, match=rf"({refusal}): refusing to load a pickle file \(unpickling can run"
        ):
            call()
    assert not marker.exists()


def test_a_pickle_beside_the_safetensors_is_never_opened(root, tmp_path):
    marker = tmp_path / "pwned"
    full = tmp_path / "full"
    full_output(full)
    evil_pickle(full / "pytorch_model.bin", marker)
    model, _ = load_trained(full)
    assert not marker.exists() and not model.training


def test_allow_pickle_reads_tensors_only(root, tmp_path, capsys):
    """The explicit opt-in reads pickle-format weights with torch.load(weights_only=True): real tensors load, a
    payload is still refused and never runs."""
    full = tmp_path / "full"
    full_output(full)
    state = tiny_model("llama").state_dict()
    (full / "model.safetensors").unlink()
    torch.save(state, full / "pytorch_model.bin")
    with pytest.raises(AdapterError, match="allow-pickle"):
        load_trained(full)
    model, _ = load_trained(full, allow_pickle=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    marker = tmp_path / "pwned"
    evil_pickle(full / "pytorch_model.bin", marker)
    with pytest.raises(LoRAMoEError):
        load_trained(full, allow_pickle=True)
    line = cli_error(capsys, ["generate", "--adapter", str(full), "--allow-pickle", "--prompt", "hi"])
    assert "full" in line
    assert not marker.exists()


# --- 3. never a silently wrong result -----------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_adapter(
        inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2, alpha=8)), tmp_path / "a"
    )


def test_every_adapter_config_field_is_required(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    fields = [("config", k) for k in meta["config"]] + [("base_model", k) for k in meta["base_model"]]
    fields += [(None, "weights_sha256")]
    for section, key in fields:
        changed = json.loads(json.dumps(meta))
        (changed[section] if section else changed).pop(key)
        (saved / CONFIG_NAME).write_text(json.dumps(changed))
        model = tiny_model("llama")
        name = f"{section}.{key}" if section else key
        with pytest.raises(AdapterError, match=rf"field '{re.escape(name)}': missing"):
            load_adapter(model, saved)
        assert not adapted_modules(model)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_adapter_tensors_must_be_floating(saved, dtype):
    _rewrite_tensor(saved, lambda t: t.to(dtype))
    with pytest.raises(AdapterError, match=rf"lora_A: dtype {dtype}, a floating-point tensor expected"):
        load_adapter(tiny_model("llama"), saved)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_adapter_tensors_must_be_finite(saved, value):
    _rewrite_tensor(saved, lambda t: t.clone().index_fill_(0, torch.tensor([0]), value))
    with pytest.raises(AdapterError, match=r"lora_A: holds NaN or infinite values"):
        load_adapter(tiny_model("llama"), saved)


def _rewrite_tensor(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    from loramoe.files import sha256_file

    state = load_file(str(folder / WEIGHTS_NAME))
    key = sorted(k for k in state if k.endswith("lora_A"))[0]
    state[key] = change(state[key])
    save_file(state, str(folder / WEIGHTS_NAME))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["weights_sha256"] = sha256_file(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_an_infinite_gradient_norm_stops_the_run_like_a_nan_loss(root, tmp_path, monkeypatch):
    """A loss of 1e30 is finite, but its gradients' norm overflows float32: the clip would zero every gradient
    and the run would "succeed" untrained. It stops before the update, naming the step and the last checkpoint."""
    prepare = train_module.prepare_model
    calls = {"n": 0}

    def huge_from_step_5(model, run):
        model = prepare(model, run)

        def hook(module, args, output):
            calls["n"] += module.training
            if calls["n"] >= 5:
                output.loss = output.loss * 1e30
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "prepare_model", huge_from_step_5)
    out = tmp_path / "run"
    with pytest.raises(
        TrainingError, match=r"gradient norm is (inf|nan) at step 5.*Last good checkpoint: .*checkpoint-3"
    ):
        owned_run(root, out, max_steps=8)
    assert not (out / WEIGHTS_NAME).exists()


def _batch(B: int = 2, T: int = 5) -> dict:
    ids = torch.randint(0, 300, (B, T))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize(
    "task_types",
    [torch.zeros(2, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros((), dtype=torch.long), [0, 1],
     torch.zeros(2), torch.tensor([0, 2])],
    ids=["B-by-1", "wrong-length", "scalar", "python-list", "float", "out-of-range"],
)  # fmt: skip
def test_task_types_of_the_wrong_shape_or_kind_are_data_errors(task_types):
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2)).train()
    with pytest.raises(DataError, match="task_types"):
        compute_loss(model, {**_batch(), "task_types": task_types})
    probs = torch.softmax(torch.randn(2, 5, 2), -1)
    if isinstance(task_types, torch.Tensor) and task_types.shape != (2,):
        with pytest.raises(DataError, match=r"task_types must have shape \(2,\)"):
            localized_balancing_loss(probs, task_types, group_of_expert=[0, 1], delta=0.1, weight=0.1)
        with pytest.raises(DataError, match=r"task_types must have shape \(2,\)"):
            routing_sums({"m": probs}, task_types, group_of_expert=[0, 1], num_types=2)


# --- 4. a config that validates does not fail once training starts -------------------------------------------


def test_resume_with_a_changed_config_names_every_changed_field(root, tmp_path, caplog):
    out = tmp_path / "run"
    owned_run(root, out)
    changed = config(root, out, max_steps=6)
    changed["method"] = "lora"
    changed["loramoe"]["rank"] = 4
    changed["data"]["max_length"] = 40
    with pytest.raises(ConfigError) as info:
        train(RunConfig.from_dict(changed), resume=True)
    message = str(info.value)
    for field in (
        "method: was 'loramoe', now 'lora'",
        "loramoe.rank: was 2, now 4",
        "data.max_length: was 48",
    ):
        assert field in message, message
    with caplog.at_level("WARNING", logger="loramoe.train"):  # more steps: a training setting may change
        train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=True)
    assert "training.max_steps changed: was 3, now 6" in caplog.text


def test_the_output_directory_is_checked_before_the_model_is_loaded(root, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr("loramoe.models.base.load_base", lambda *a, **k: loads.append(1))
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot be written|is a file|Not a directory"):
        train(RunConfig.from_dict(config(root, blocked / "out")))
    assert not loads


def test_a_prompt_longer_than_the_context_is_a_config_error(root, capsys):
    from loramoe.inference.generate import generate

    model, tok = load_base(str(root / "base"))
    with pytest.raises(
        ConfigError,
        match=r"prompt 1 is \d+ tokens; with max_new_tokens 8 that is more than the model's context \(128",
    ):
        generate(model, tok, ["hi", "word " * 200], max_new_tokens=8, progress=False)
    with pytest.raises(ConfigError, match=r"prompt 0 .*context"):
        generate(model, tok, ["hi"], max_new_tokens=500, progress=False)
    line = cli_error(
        capsys, ["generate", "--model", str(root / "base"), "--prompt", "hi", "--max-new-tokens", "999"]
    )
    assert "context (128 positions)" in line


# --- 5. bounded parsing and reading -------------------------------------------------------------------------


def test_a_huge_config_or_override_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("model: base\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: \d+ bytes, more than a config can be"):
        load_yaml(big)
    with pytest.raises(ConfigError, match=r"more than a config can be"):
        apply_overrides({}, ["model=" + "x" * (100 << 10)])


def _returns_within(seconds: float, call) -> BaseException | None:
    """Run ``call`` in a thread; fail if it is still blocked after ``seconds`` (a FIFO read never returns)."""
    result: list = []

    def run():
        try:
            call()
            result.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked reading a non-regular file"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_devices_are_refused_without_reading(root, tmp_path):
    from loramoe.data.formats import read_records
    from loramoe.inference.prompts import read_prompts

    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    for call, kind in [
        (lambda: read_records(fifo), DataError),
        (lambda: read_records("/dev/zero"), DataError),
        (lambda: load_yaml(fifo), ConfigError),
        (lambda: read_prompts(fifo), DataError),
        (lambda: apply_overrides({}, []) or load_yaml("/dev/zero"), ConfigError),
    ]:
        err = _returns_within(10, call)
        assert isinstance(err, kind) and re.search(
            r"(FIFO \(named pipe\)|character device), not a regular file", str(err)
        ), err


def test_a_huge_record_is_cut_before_it_is_tokenised_with_the_same_result(root):
    from loramoe.data.dataset import ExampleEncoder
    from loramoe.data.formats import Example

    tok = tiny_tokenizer()
    encoder = ExampleEncoder(tok, max_length=64, template="plain")
    calls = []
    original = tok.__class__.__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text))
        return original(self, text, *args, **kwargs)

    # ~16k characters: cut, and still far more than 64 tokens
    words = " ".join(f"w{i % 97}" for i in range(3000))
    whole = ExampleEncoder(tok, max_length=10**6, template="plain").encode(Example(words, words, 0))[0]
    cut, how = encoder.encode(Example(words, words, 0))
    assert how == "answer"
    keep = 64 // 2  # the answer is cut, so the prompt keeps max_length // 2 tokens: its end
    prompt_ids = whole["input_ids"][: whole["labels"].count(-100)]
    assert cut["input_ids"][:keep] == prompt_ids[-keep:]
    answer_ids = whole["input_ids"][len(prompt_ids) :]
    assert cut["input_ids"][keep:] == answer_ids[: 64 - keep]
    try:
        tok.__class__.__call__ = counting
        encoder.encode(Example("p" * 50_000_000, "a" * 50_000_000, 0))  # 100 MB of text
    finally:
        tok.__class__.__call__ = original
    assert max(calls) <= 64 * 32 + 16  # never the whole record


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!<>,'\"#|? \n\t0123")), max_size=80)
    | st.text(max_size=40)
)
def test_yaml_parsing_raises_only_config_errors(text):
    from loramoe.files import parse_yaml

    with contextlib.suppress(ConfigError):
        parse_yaml(text, "f.yaml")


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.binary(max_size=120)
    | st.text(alphabet=st.sampled_from(list('[]{}":,0123 NaInfty')), max_size=80).map(str.encode)
)
def test_json_reading_raises_only_the_given_error(tmp_path_factory, data):
    from loramoe.files import read_json

    path = tmp_path_factory.mktemp("json") / "x.json"
    path.write_bytes(data)
    with contextlib.suppress(AdapterError):
        read_json(path, error=AdapterError)


def test_an_absurd_adapter_is_refused_before_allocating():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"num_experts=1000000 .*more than 10x the base model's"):
        inject(model, LoRAMoEConfig(num_experts=1_000_000, rank=64))
    assert not adapted_modules(model)


# --- 6. generate / chat / routing, and library entry points -------------------------------------------------


def test_undecodable_prompts_and_zero_batch_sizes_are_clear_errors(root, capsys):
    from loramoe.analysis.report import expert_usage
    from loramoe.data.formats import Example
    from loramoe.inference.chat import chat_loop
    from loramoe.inference.generate import generate

    model, tok = load_base(str(root / "base"))
    with pytest.raises(ConfigError, match=r"prompt 0 holds bytes that are not UTF-8"):
        generate(model, tok, ["caf\udce9"], progress=False)
    with pytest.raises(ConfigError, match=r"batch_size must be an integer >= 1, got 0"):
        generate(model, tok, ["hi"], batch_size=0, progress=False)
    with pytest.raises(ConfigError, match=r"prompts must be a list of strings"):
        generate(model, tok, "hi", progress=False)
    line = cli_error(capsys, ["generate", "--model", str(root / "base"), "--prompt", "caf\udce9"])
    assert "not UTF-8" in line
    inject(model, LoRAMoEConfig(num_experts=2, rank=2))
    with pytest.raises(ConfigError, match=r"batch_size must be an integer >= 1, got 0"):
        expert_usage(model, tok, [Example("a", "b", 0)], batch_size=0, progress=False)
    printed = []
    inputs = iter([UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "caf\udce9", EOFError()])

    def read(_prompt):
        item = next(inputs)
        if isinstance(item, BaseException):
            raise item
        return item

    chat_loop(
        model,
        tok,
        max_new_tokens=2,
        input_fn=read,
        print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))),
    )
    assert any("not valid utf-8 text; not sent" in p for p in printed), printed
    assert any("not UTF-8 text" in p and "not sent" in p for p in printed), printed


def test_a_ratio_that_rounds_to_zero_samples_is_named(root, tmp_path):
    from loramoe.data.sources import DataConfig, load_examples, mix_examples

    data = DataConfig.from_dict({"sources": [{"path": str(root / "good.jsonl"), "ratio": 0.9, "name": "big"},
                                             {"path": str(root / "good.jsonl"), "ratio": 0.004, "name": "tiny"}],
                                 "total_samples": 100})  # fmt: skip
    groups = [load_examples(s) for s in data.sources]
    with pytest.raises(
        ConfigError, match=r"source 'tiny': ratio 0.004 of total_samples 100 rounds to 0 samples"
    ):
        mix_examples(groups, data)


def test_library_misuse_raises_loramoe_errors(tmp_path):
    plain = tiny_model("llama")
    with pytest.raises(AdapterError, match="no LoRAMoE layers"), RouterRecorder(plain):
        pass
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        save_adapter(model, tmp_path / "file")
    with pytest.raises(DataError, match="the batch is empty"):
        compute_loss(model, {**_batch(B=0), "task_types": torch.zeros(0, dtype=torch.long)})
    with pytest.raises(ConfigError, match="no LoRAMoE adapter"):
        save_adapter(plain, tmp_path / "out")
