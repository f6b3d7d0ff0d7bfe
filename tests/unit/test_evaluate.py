"""The ``loramoe`` lm-eval model type end to end on a tiny model, ``evaluate_benchmarks`` and ``compare``.

The log-likelihoods and generations lm-eval reports are checked against a direct computation with the same model
(the reference), not against stored numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from loramoe.errors import ConfigError  # noqa: E402
from loramoe.eval.evaluate import EvalConfig, evaluate_benchmarks  # noqa: E402
from loramoe.eval.lm_eval_model import LoRAMoELM  # noqa: E402 (registers the "loramoe" model type)
from loramoe.eval.report import compare, write_results  # noqa: E402

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

QA_DOCS = [
    {"question": "what does jamaican people speak?", "golds": ["Jamaican English", "Jamaican Creole"]},
    {"question": "who plays ken barlow?", "golds": ["Tony Warren"]},
]
MC_DOCS = [
    {"prompt": "Paris is the capital of", "choices": ["France", "Spain", "Chile"], "gold": 0, "suffix": ""},
    {
        "prompt": "The Nile flows into the",
        "choices": ["Pacific", "Mediterranean"],
        "gold": 1,
        "suffix": " Sea.",
    },
]
GEN_TOKENS = 6

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{golds[0]}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: {tokens}, do_sample: false}}
process_results: !function utils.results_qa
metric_list:
  - {{metric: em, aggregation: mean, higher_is_better: true}}
  - {{metric: f1, aggregation: mean, higher_is_better: true}}
  - {{metric: contains, aggregation: mean, higher_is_better: true}}
"""
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: !function utils.docs_rank_choices
doc_to_target: gold
process_results: !function utils.results_rank
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: mrr, aggregation: mean, higher_is_better: true}}
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory):
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("tiny_tasks")
    for name, docs in (("qa", QA_DOCS), ("mc", MC_DOCS)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "tiny_gen.yaml").write_text(GEN_YAML.format(data=root / "qa.jsonl", tokens=GEN_TOKENS))
    (root / "tiny_mc.yaml").write_text(MC_YAML.format(data=root / "mc.jsonl"))
    (root / "utils.py").write_text("from loramoe.eval.tasks.utils import *  # noqa: F403\n")
    return TaskManager(include_path=str(root), include_defaults=False)


def _run(model, task_manager, tasks: list[str], **kwargs) -> dict:
    return lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=task_manager, batch_size=1, log_samples=True, **kwargs
    )


def _logliks(out: dict, task: str) -> list[list[float]]:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[resp[0][0] for resp in s["resps"]] for s in samples]


def _reference_logliks(model: torch.nn.Module, tok) -> list[list[float]]:
    """Sum of log p(continuation token | prefix) computed directly: the byte tokenizer makes the split exact."""
    out = []
    for doc in MC_DOCS:
        ctx = tok(doc["prompt"], add_special_tokens=False).input_ids
        row = []
        for choice in doc["choices"]:
            cont = tok(" " + choice + doc["suffix"], add_special_tokens=False).input_ids
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
            row.append(sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont)))
        out.append(row)
    return out


@pytest.fixture(scope="module")
def base_run(tiny_dir: Path, task_manager) -> dict:
    return _run(
        "loramoe", task_manager, ["tiny_gen", "tiny_mc"], model_args=f"pretrained={tiny_dir},device=cpu"
    )


def test_loglikelihood_task_matches_a_direct_computation(tiny_dir: Path, base_run: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ref = _reference_logliks(model, AutoTokenizer.from_pretrained(tiny_dir))
    got = _logliks(base_run, "tiny_mc")
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(r), atol=1e-4, rtol=1e-5)
    want_acc = sum(max(range(len(r)), key=r.__getitem__) == d["gold"] for r, d in zip(ref, MC_DOCS)) / len(
        MC_DOCS
    )
    assert base_run["results"]["tiny_mc"]["acc,none"] == pytest.approx(want_acc)


def test_generation_task_matches_greedy_decoding(tiny_dir: Path, base_run: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramoe.eval.tasks.utils import results_qa

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    samples = sorted(base_run["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    scores = []
    for doc, sample in zip(QA_DOCS, samples, strict=True):
        ids = torch.tensor([tok(f"Q: {doc['question']}\nA:", add_special_tokens=False).input_ids])
        with torch.no_grad():
            new = model.generate(
                ids, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
            )
        text = tok.decode(new[0, ids.shape[1] :], skip_special_tokens=False)
        text = text.split("\n")[0].split(tok.eos_token)[0]
        assert sample["resps"][0][0] == text
        scores.append(results_qa(doc, [text]))
    for metric in ("em", "f1", "contains"):
        assert base_run["results"]["tiny_gen"][f"{metric},none"] == pytest.approx(
            sum(s[metric] for s in scores) / len(scores)
        )


def test_adapter_from_disk_and_in_memory_model_give_the_adapted_logliks(
    tiny_dir: Path, task_manager, base_run: dict, tmp_path: Path
) -> None:
    import loramoe
    from loramoe.models.base import load_base

    model, tok = load_base(str(tiny_dir), device="cpu")
    loramoe.inject(model, loramoe.LoRAMoEConfig(num_experts=2, rank=2, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "loramoe_B" in name:
                p.normal_(std=0.5)  # zero-init B would make the adapter a no-op
    model.eval()
    loramoe.save_adapter(model, tmp_path / "adapter")
    ref = _reference_logliks(model, tok)

    from_disk = _run(
        "loramoe",
        task_manager,
        ["tiny_mc"],
        model_args=f"pretrained={tiny_dir},adapter={tmp_path / 'adapter'}",
    )
    in_memory = _run(LoRAMoELM(pretrained=model, tokenizer=tok, batch_size=1), task_manager, ["tiny_mc"])
    for got in (_logliks(from_disk, "tiny_mc"), _logliks(in_memory, "tiny_mc")):
        torch.testing.assert_close(
            torch.tensor(sum(got, [])), torch.tensor(sum(ref, [])), atol=1e-4, rtol=1e-5
        )
    base = torch.tensor(sum(_logliks(base_run, "tiny_mc"), []))
    assert (torch.tensor(sum(ref, [])) - base).abs().max() > 1e-2  # the adapter changed the model


def test_lm_eval_command_line_adds_our_tasks_and_leaves_sys_argv_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import lm_eval.__main__

    from loramoe.cli import main

    seen: list[list[str]] = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["x"])
    monkeypatch.setenv("LORAMOE_DATA_DIR", str(tmp_path))
    assert main(["lm-eval", "run", "--model", "loramoe", "--tasks", "loramoe_webq"]) == 0
    assert main(["lm-eval", "--model", "loramoe", "--include_path", "mine"]) == 0
    first, second = seen
    assert first[:2] == ["lm-eval", "run"] and (Path(first[-1]) / "loramoe_webq.yaml").is_file()
    assert first[-2] == "--include_path" and second[:3] == ["lm-eval", "--model", "loramoe"]
    assert second.count("--include_path") == 1
    assert sys.argv == ["x"]


def _fake_data(root: Path) -> Path:
    (root / "webquestions").mkdir(parents=True)
    (root / "sst2").mkdir()
    webq = [{"qId": f"q{i}", "qText": f"what is {i}?", "answers": [str(i)]} for i in range(3)]
    (root / "webquestions" / "test.json").write_text(json.dumps(webq))
    (root / "sst2" / "dev.tsv").write_text('sentence\tlabel\ngood "fun" film \t1\nbad film \t0\nok \t1\n')
    return root


def test_evaluate_writes_results_and_compare_reports_retention(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(
        model=str(tiny_dir), tasks="webq,sst2", limit=2, data_dir=str(_fake_data(tmp_path / "data")),
        output_dir=str(tmp_path / "base"), device="cpu", batch_size=2, threads=1,
    )  # fmt: skip
    threads = torch.get_num_threads()
    result = evaluate_benchmarks(cfg)
    assert torch.get_num_threads() == threads  # restored
    assert result["config"]["chat_template"] is True  # auto: the tiny tokenizer has a chat template
    assert json.loads((tmp_path / "base" / "results.json").read_text()) == json.loads(json.dumps(result))
    assert "| knowledge | loramoe_webq | contains |" in (tmp_path / "base" / "results.md").read_text()
    assert set(result["tasks"]) == {"loramoe_webq", "loramoe_sst2"}
    assert all(t["n"] == 2 and 0.0 <= t["score"] <= 1.0 for t in result["tasks"].values())
    assert all(t["seconds"] > 0 and t["cpu_seconds"] > 0 for t in result["tasks"].values())
    assert result["tasks"]["loramoe_sst2"]["n_available"] == 3  # the quoted sentence stayed one row

    # A second, real-format run written by the same writer: knowledge halves, downstream gains 0.25.
    base = json.loads(json.dumps(result))
    base["tasks"]["loramoe_webq"]["score"] = 0.5
    base["tasks"]["loramoe_sst2"]["score"] = 0.5
    write_results(base, tmp_path / "base")
    tuned = json.loads(json.dumps(base))
    tuned["label"], tuned["config"]["adapter"] = "sft", "runs/sft"
    tuned["tasks"]["loramoe_webq"]["score"] = 0.25
    tuned["tasks"]["loramoe_sst2"]["score"] = 0.75
    tuned_path = write_results(tuned, tmp_path / "sft")

    text = compare(
        [tuned_path, tmp_path / "base"], tmp_path / "cmp"
    )  # base found: the run without an adapter
    assert "# Comparison against base" in text
    assert "| knowledge | loramoe_webq | contains | 0.500 | 0.250 (-0.250, ×0.50) |" in text
    assert "| sft | 0.250 | 0.500 | 0.750 | +0.250 |" in text  # retention 0.25 / 0.5
    assert (tmp_path / "cmp" / "compare.md").read_text() == text
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="at least two"):
        compare([tuned_path], tmp_path / "cmp")
    with pytest.raises(ConfigError, match="labels"):
        compare([tuned_path, tmp_path / "base"], tmp_path / "cmp", base="nope", plot=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["mmlu"]}, "unknown suite or task"),
        ({"tasks": []}, "tasks is empty"),
        ({"limit": -1}, "limit must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"dtype": "int8"}, "dtype"),
        ({"threads": 0}, "threads"),
        ({"adapter": "/no/such/adapter"}, "adapter directory"),
        ({"data_dir": "/no/such/data"}, "data_dir"),
    ],
)
def test_eval_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**kwargs)


def test_eval_config_round_trips_and_rejects_unknown_keys() -> None:
    cfg = EvalConfig(tasks=["knowledge", "sst2"], limit=0, chat_template=True)
    assert EvalConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.run_label == "base"
    with pytest.raises(ConfigError, match=r"eval settings: unknown key\(s\) \['modle'\]"):
        EvalConfig.from_dict({"modle": "x"})


def test_log_likelihoods_equal_hflms_own_for_the_same_requests() -> None:
    """The model type scores lm-eval's requests with the engine's forward; HFLM's own code is the reference."""
    from lm_eval.models.huggingface import HFLM

    lm = LoRAMoELM(pretrained=tiny_model("llama"), tokenizer=tiny_tokenizer(), batch_size=3)
    pairs = [
        (f"Question {i}: where is it?", f" {c}") for i in range(5) for c in ("Paris", "R", "Oslo is", "x")
    ]
    requests = [((ctx, cont), *lm._encode_pair(ctx, cont)) for ctx, cont in pairs]
    got = lm._loglikelihood_tokens(requests)
    want = HFLM._loglikelihood_tokens(lm, requests)
    torch.testing.assert_close(
        torch.tensor([g for g, _ in got]), torch.tensor([w for w, _ in want]), atol=1e-5, rtol=1e-6
    )
    assert [g for _, g in got] == [w for _, w in want]
