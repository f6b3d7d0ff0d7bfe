"""Smoke test of the benchmark code (tiny sizes, one round, nothing timed meaningfully) so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import model_bench, run, stop_scan_bench  # noqa: E402
from benchmarks.reference import (  # noqa: E402
    DenseTopKLinear,
    ExpertLoopLinear,
    GatherTopKLinear,
    PreviousFusedLinear,
)

from loramoe.layer import LoRAMoELinear  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_tiny_run_writes_results_targets_and_report(tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    results = run.main(["--tiny", "--out", str(out), "--md", str(md)])
    assert json.loads(out.read_text())["settings"]["tiny"] is True
    assert {"machine", "layer", "sweep", "top_k", "train", "generation", "memory", "targets"} <= set(results)
    train = results["train"][0]["variants"]
    assert {"floor", "peft p=0.05", "fused per_expert", "loop per_expert"} <= set(train)
    assert all(v["cpu_s"] > 0 for v in train.values())
    assert results["memory"][0]["variants"]["fused per_expert"]["peak_mib"] > 0
    assert all({"target", "value", "met"} <= set(t) for t in results["targets"])
    text = md.read_text()
    assert "## Targets" in text and "## Top-2 routing" in text
    md.unlink()
    run.main(["--from-json", str(out), "--md", str(md)])
    assert md.read_text() == text

    layer_before = json.loads(out.read_text())["layer"]
    run.main(["--tiny", "--section", "top_k", "--out", str(out), "--md", str(md)])
    updated = json.loads(out.read_text())
    assert updated["layer"] == layer_before  # the other sections are kept as measured
    assert [t["rank"] for t in updated["top_k"]] == [4, 32]
    assert "Section `top_k` re-measured on" in md.read_text()


def test_section_refuses_without_earlier_results(tmp_path):
    with pytest.raises(SystemExit, match="run the full benchmark first"):
        run.main(
            [
                "--tiny",
                "--section",
                "top_k",
                "--out",
                str(tmp_path / "none.json"),
                "--md",
                str(tmp_path / "m"),
            ]
        )


@pytest.mark.parametrize("reference", [ExpertLoopLinear, PreviousFusedLinear])
@pytest.mark.parametrize("dropout_mode", ["per_expert", "shared"])
def test_reference_structures_compute_the_fused_layer(reference, dropout_mode):
    layer = LoRAMoELinear(
        nn.Linear(16, 24), num_experts=3, rank=2, alpha=8.0, dropout=0.1, dropout_mode=dropout_mode
    )
    with torch.no_grad():
        layer.loramoe_B.normal_()
    x = torch.randn(2, 5, 16)
    fused = layer.eval()(x)
    layer.__class__ = reference
    torch.testing.assert_close(layer(x), fused, **TOL)
    layer.train()(x)  # its dropout path runs


@pytest.mark.parametrize("reference", [GatherTopKLinear, DenseTopKLinear])
def test_top_k_references_compute_the_library_top_k(reference):
    layer = LoRAMoELinear(nn.Linear(16, 24), num_experts=4, rank=2, alpha=8.0, top_k=2)
    with torch.no_grad():
        layer.loramoe_B.normal_()
    x = torch.randn(3, 4, 16)
    library = layer.eval()(x)
    layer.__class__ = reference
    torch.testing.assert_close(layer(x), library, **TOL)


def test_peak_rss_child_prints_one_json_line(capsys):
    spec = {
        "kind": "fused",
        "dropout": 0.05,
        "mode": "shared",
        "layers": 1,
        "batch": 1,
        "seq": 8,
        "tiny": True,
    }
    model_bench._child(["--peak-rss", json.dumps(spec)])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["variant"] == "fused shared" and record["peak_mib"] >= record["rss_before_mib"] > 0


@pytest.mark.slow  # about 20-30 s of imports and tiny timings; the code it covers runs only on a GPU
def test_device_bench_smoke_on_the_cpu(tmp_path):
    # The GPU benchmark of scripts/gpu_check.sh, at tiny shapes on the CPU: every path but CUDA timing runs.
    out = tmp_path / "device.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_bench.py"), "--tiny", "--device", "cpu",
         "--compile-backend", "none", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["sync_check"]["checked"] is False  # CUDA only
    names = set(result["layers"][0]["variants"])
    assert names == {"bare", "peft r=32", "fused per_expert", "fused shared", "fused p=0"}


@pytest.mark.slow
def test_gpu_check_script_parses_and_stops_cleanly_without_a_gpu(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
    }  # the same path on a GPU machine
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 1 and "no CUDA device visible to torch" in proc.stdout


@pytest.mark.slow  # two server starts (loramoe serve and transformers serve): about a minute on a busy machine
def test_serve_vs_transformers_smoke_on_a_tiny_model(tmp_path):
    out = tmp_path / "servers.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_vs_transformers.py"), "--tiny", "--servers",
         "loramoe-base,transformers-cb", "--clients", "2", "--staggered", "2", "--mean-gap-s", "0.05",
         "--max-tokens", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    servers = json.loads(out.read_text())["servers"]
    assert set(servers) == {"loramoe-base", "transformers-cb"}
    for loads in servers.values():
        assert set(loads) == {"concurrent", "staggered"}
        assert all(
            r["answered"] == r["sent"] == 2 and not r["errors"] and r["tokens"] > 0 for r in loads.values()
        )
        assert all(r["ttft_p50_s"] <= r["latency_p50_s"] for r in loads.values())
    assert servers["transformers-cb"]["concurrent"]["tokens_per_s_vs_transformers_cb"] == 1.0
    assert all(r["server_cpu_s"] >= 0 for loads in servers.values() for r in loads.values())


def test_stop_scan_bench_smoke():
    results = stop_scan_bench.main(["--tiny"])
    assert set(results["us_per_step"]) == set(stop_scan_bench.cases(16, 100))
    assert all(v["previous"] >= 0 and v["current"] >= 0 for v in results["us_per_step"].values())
