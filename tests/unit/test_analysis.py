"""Routing analysis: per-example means match an unpadded loop, masses sum to 1, files written, a rigged router."""

from __future__ import annotations

import json

import pytest
import torch

from loramoe.analysis.report import expert_usage, layer_index, routing_report, summarize
from loramoe.cli import main
from loramoe.cli.routing import parse_data_arg
from loramoe.config import LoRAMoEConfig
from loramoe.data.dataset import ExampleEncoder
from loramoe.data.formats import Example
from loramoe.errors import ConfigError
from loramoe.inject import adapted_modules, inject
from loramoe.routing import RouterRecorder

from tiny import tiny_model, tiny_tokenizer

N = 4


def adapted(seed: int = 0):
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=N, rank=2, dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_router.normal_(std=1.0)
    return model.eval()


def tasks() -> dict[str, list[Example]]:
    return {
        "trivia": [Example(f"capital of land {i}?", "City" + "x" * i, 1) for i in range(5)],
        "sort": [Example(f"sort {' '.join('cab'[: i % 3 + 1])}", "a b", 0) for i in range(3)],
    }


def test_expert_usage_equals_unpadded_per_example_loop():
    model, tok = adapted(), tiny_tokenizer()
    examples = tasks()["trivia"]  # different lengths: batches are padded
    probs, types = expert_usage(model, tok, examples, batch_size=3, progress=False)
    encoder = ExampleEncoder(tok)
    for i, example in enumerate(examples):  # reference: one example at a time, no padding at all
        ids = torch.tensor([encoder.encode(example)[0]["input_ids"]])
        with RouterRecorder(model, detach=True) as rec, torch.no_grad():
            model(input_ids=ids)
        for name, (p,) in rec.probs.items():
            torch.testing.assert_close(probs[name][i], p[0].mean(0), rtol=0, atol=1e-5)
    assert types.tolist() == [1] * 5


def test_report_shapes_and_masses_sum_to_one(tmp_path):
    model, tok = adapted(), tiny_tokenizer()
    report = routing_report(model, tok, tasks(), tmp_path, batch_size=2, progress=False)
    assert report["layers"] == [0, 1]
    assert report["group_of_expert"] == [0, 0, 1, 1]
    for task in report["tasks"].values():
        assert len(task["mean"]) == N and set(task["per_layer"]) == {"0", "1"}
        assert len(task["per_module"]) == len(adapted_modules(model))
        assert sum(task["mean"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(task["group_mass"].values()) == pytest.approx(1.0, abs=1e-5)
    assert report["tasks"]["trivia"]["task_type"] == "knowledge"
    assert report["task_types"]["knowledge"]["examples"] == 5
    assert report["task_types"]["downstream"]["examples"] == 3
    written = json.loads((tmp_path / "routing.json").read_text())
    assert written["tasks"]["sort"]["group_mass"] == report["tasks"]["sort"]["group_mass"]
    for kind in ("layers", "mean", "groups"):
        assert (tmp_path / f"routing_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **all knowledge** | knowledge | 5 |" in (tmp_path / "routing.md").read_text()


def test_max_examples_takes_the_first_ones(tmp_path):
    report = routing_report(adapted(), tiny_tokenizer(), tasks(), tmp_path, max_examples=2, plot=False,
                            progress=False)  # fmt: skip
    assert {t["examples"] for t in report["tasks"].values()} == {2}
    assert not (tmp_path / "routing_mean.png").exists()


def test_router_rigged_toward_expert_0_shows_expert_0_hottest(tmp_path):
    model, tok = adapted(), tiny_tokenizer()
    # No router bias exists, so point expert 0's router row along each layer's mean input: tokens with a positive
    # projection (most of them) go to expert 0; the other rows are zero.
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, args[0]))
             for name, layer in adapted_modules(model).items()]  # fmt: skip
    with torch.no_grad():
        model(input_ids=torch.tensor([ExampleEncoder(tok).encode(tasks()["trivia"][0])[0]["input_ids"]]))
        for handle in hooks:
            handle.remove()
        for name, layer in adapted_modules(model).items():
            mu = inputs[name].reshape(-1, layer.in_features).mean(0)
            layer.loramoe_router.zero_()
            layer.loramoe_router[0] = 50.0 * mu / mu.norm()
    report = routing_report(model, tok, tasks(), tmp_path, plot=False, progress=False)
    for task in report["tasks"].values():
        assert max(range(N), key=lambda e: task["mean"][e]) == 0
        assert task["mean"][0] > 0.5
        assert task["group_mass"]["downstream"] > 0.5  # expert 0 is in the downstream half


def test_summarize_group_mass_is_the_sum_over_each_group():
    usage = {"t": {"model.layers.0.mlp.up_proj": torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])}}
    out = summarize(usage, {"t": torch.tensor([0, 0])}, group_of_expert=[0, 1, 1, 1], task_names=("a", "b"))
    assert out["tasks"]["t"]["group_mass"] == pytest.approx({"a": 0.25, "b": 0.75})
    assert out["tasks"]["t"]["per_layer"]["0"] == pytest.approx([0.25] * 4)
    assert out["task_types"]["a"]["examples"] == 2 and "b" not in out["task_types"]


def test_layer_index_and_data_arg_parsing():
    assert layer_index("model.layers.12.mlp.down_proj") == 12
    assert layer_index("transformer.h.3.mlp.c_fc") == 3
    assert layer_index("lm_head") == -1
    names = ("downstream", "knowledge")
    assert parse_data_arg("nq=data/nq.jsonl:knowledge", names) == ("nq", "data/nq.jsonl", "knowledge")
    assert parse_data_arg("x=C:/d/x.json", names) == ("x", "C:/d/x.json", None)
    assert parse_data_arg("x=a.json:1", names) == ("x", "a.json", 1)
    with pytest.raises(ConfigError, match="name=path"):
        parse_data_arg("just_a_path.json", names)


def test_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no LoRAMoE layers"):
        expert_usage(tiny_model("llama"), tiny_tokenizer(), tasks()["sort"], progress=False)
    with pytest.raises(ConfigError, match="no examples"):
        routing_report(adapted(), tiny_tokenizer(), {"empty": []}, tmp_path)


def saved_adapter_and_data(tmp_path):
    """A tiny adapter saved with its base model, and one knowledge example in a JSONL file."""
    from loramoe.adapter import save_adapter

    model, tok = adapted(), tiny_tokenizer()
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    save_adapter(model, tmp_path / "adapter", base_name_or_path=str(base_dir))
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "capital of France?", "answer": "Paris"}\n')
    return tmp_path / "adapter", data


def test_cli_routing_on_a_saved_adapter(tmp_path, capsys):
    adapter, data = saved_adapter_and_data(tmp_path)
    rc = main(["routing", "--adapter", str(adapter), "--data", f"qa={data}:knowledge",
               "--out", str(tmp_path / "out"), "--no-plot"])  # fmt: skip
    assert rc == 0
    assert (
        json.loads((tmp_path / "out" / "routing.json").read_text())["tasks"]["qa"]["task_type"] == "knowledge"
    )
    assert "all knowledge" in capsys.readouterr().out
    rc = main(["routing", "--adapter", str(tmp_path / "adapter"), "--data", "x", "--out", str(tmp_path)])
    assert rc == 2


def test_cli_routing_with_the_knowledge_group_off_puts_all_mass_on_the_downstream_group(tmp_path):
    adapter, data = saved_adapter_and_data(tmp_path)
    args = ["routing", "--adapter", str(adapter), "--data", f"qa={data}:knowledge", "--no-plot"]
    assert main([*args, "--out", str(tmp_path / "off"), "--experts-off", "knowledge"]) == 0
    mass = json.loads((tmp_path / "off" / "routing.json").read_text())["tasks"]["qa"]["group_mass"]
    assert mass == {"downstream": pytest.approx(1.0), "knowledge": 0.0}
    assert main([*args, "--out", str(tmp_path / "idx"), "--experts-off", "0,1"]) == 0
    mass = json.loads((tmp_path / "idx" / "routing.json").read_text())["tasks"]["qa"]["group_mass"]
    assert mass == {"downstream": 0.0, "knowledge": pytest.approx(1.0)}
    assert (
        main([*args, "--out", str(tmp_path / "bad"), "--experts-off", "facts"]) == 2
    )  # a clear error, exit 2
