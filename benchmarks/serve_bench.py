"""Load test of ``loramoe serve``: concurrent clients on loopback, batched against one-at-a-time, in one run.

``python benchmarks/serve_bench.py [--tiny] [--clients 32] [--requests 2] [--max-tokens 32] [--batch-sizes 1,8,32]``

For each batch size it starts ``loramoe serve`` in a subprocess (on SmolLM2-135M-Instruct with a freshly injected
LoRAMoE adapter, 8 experts of rank 4 like the demo's, or ``--tiny`` for a 2-layer test model), sends every client's
requests (half streamed, half not; greedy, the same prompts in every run), and records: requests answered, errors
(any non-200, any stream without ``[DONE]``), lost requests (sent but never answered), generated tokens (from the
responses' usage), wall time, token throughput and latency percentiles. The figures are only comparable within one
run: the ratio to batch size 1 is the result. A phase that passes ``--time-limit`` seconds stops sending new
requests and counts the ones it did not send as not sent (never as lost).

Writes a JSON report (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Give a synonym of quick.",
    "Translate 'good morning' into French.",
    "What is the boiling point of water in Celsius?",
]


def make_adapter(folder: Path, tiny: bool) -> Path:
    """Save a LoRAMoE adapter with random (non-zero) experts and routers: serving cost does not depend on training."""
    import torch

    from loramoe import LoRAMoEConfig, adapted_modules, inject, save_adapter
    from loramoe.models.base import load_base

    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import tiny_model, tiny_tokenizer

        base = folder / "tiny-base"
        tiny_model("llama", max_position_embeddings=512).save_pretrained(base)
        tiny_tokenizer().save_pretrained(base)
        name = str(base)
    else:
        name = "smollm2-135m-instruct"
    model, _ = load_base(name)
    torch.manual_seed(0)
    inject(model, LoRAMoEConfig(num_experts=8, rank=4, alpha=32.0, dropout=0.0))
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=0.01)
    return save_adapter(model, folder / "adapter")


def start_server(adapter: Path, batch_size: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable, "-m", "loramoe", "serve", "--adapter", str(adapter), "--port", "0",
        "--max-batch-size", str(batch_size), "--max-queue", str(args.clients * 2), "--batch-wait-ms", "20",
        "--max-tokens", str(args.max_tokens), "--timeout", str(args.time_limit * 2),
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if match := re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line):
            return proc, match.group(1)
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


async def one_request(client, url: str, prompt: str, stream: bool, max_tokens: int) -> dict:
    import httpx

    body = {
        "model": "adapter",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    start = time.perf_counter()
    try:
        if not stream:
            response = await client.post(url + "/v1/chat/completions", json=body)
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
            data = response.json()
            text, tokens = data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return {"ok": False, "error": f"HTTP {response.status_code}"}
                events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                return {"ok": False, "error": "stream ended without [DONE]"}
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            tokens = chunks[-1]["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    return {
        "ok": True,
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
        "text": text,
        "prompt": prompt,
    }


async def load(url: str, args: argparse.Namespace) -> dict:
    """``clients`` concurrent clients, each sending ``requests`` requests in turn, until done or the time limit."""
    import httpx

    deadline = time.perf_counter() + args.time_limit
    results: list[dict] = []
    sent = not_sent = 0

    async def client_loop(index: int, client) -> None:
        nonlocal sent, not_sent
        for k in range(args.requests):
            if time.perf_counter() > deadline:
                not_sent += args.requests - k
                return
            prompt = PROMPTS[(index + k) % len(PROMPTS)]
            sent += 1
            results.append(await one_request(client, url, prompt, (index + k) % 2 == 1, args.max_tokens))

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=args.time_limit * 2, limits=limits) as client:
        start = time.perf_counter()
        crashed = await asyncio.gather(
            *(client_loop(i, client) for i in range(args.clients)), return_exceptions=True
        )
        wall = time.perf_counter() - start
        for _ in range(100):  # the server answers a request before its batch's bookkeeping ends
            health = (await client.get(url + "/health")).json()
            if health["running"] + health["waiting"] == 0:
                break
            await asyncio.sleep(0.1)
    answered = [r for r in results if r["ok"]]
    latencies = sorted(r["seconds"] for r in answered)
    tokens = sum(r["tokens"] for r in answered)
    return {
        "sent": sent,
        "answered": len(answered),
        "errors": [r["error"] for r in results if not r["ok"]] + [repr(e) for e in crashed if e is not None],
        "lost": sent - len(results),  # sent, but no response and no error came back
        "left_in_server": health["running"] + health["waiting"],
        "not_sent": not_sent,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(answered) / wall,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        "answers": {r["prompt"]: r["text"] for r in answered},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer test model instead of SmolLM2-135M")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, sent one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated; 1 is one request at a time")
    parser.add_argument(
        "--time-limit", type=float, default=300.0, help="seconds per phase before sending stops"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="the server's torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT / "src"))

    phases = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(Path(tmp), args.tiny)
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            proc, url = start_server(adapter, batch_size, args)
            try:
                result = asyncio.run(load(url, args))
            finally:
                proc.terminate()
                proc.wait(60)
            result["max_batch_size"] = batch_size
            phases.append(result)
            print(f"max batch {batch_size}: {result['answered']}/{result['sent']} answered, "
                  f"{result['tokens_per_s']:.1f} tokens/s", file=sys.stderr)  # fmt: skip
    base = phases[0]
    for phase in phases:
        phase["throughput_ratio"] = phase["tokens_per_s"] / base["tokens_per_s"]
        phase["answers_equal_first_phase"] = sum(
            phase["answers"].get(p) == base["answers"].get(p) for p in base["answers"]
        )
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "model": "tiny 2-layer llama" if args.tiny else "SmolLM2-135M-Instruct + LoRAMoE (8 experts, rank 4)",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "phases": [{k: v for k, v in p.items() if k != "answers"} for p in phases],
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0 if all(not p["errors"] and not p["lost"] and not p["left_in_server"] for p in phases) else 1


def table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"{report['model']}; {s['clients']} clients x {s['requests']} requests, max_tokens {s['max_tokens']}, "
        f"greedy, half streamed; server with {s['threads']} threads; {report['machine']}; {report['date']}",
        "",
        "| max batch | answered / sent | errors | lost | tokens | wall s | tokens/s | x batch 1 | p50 s | p95 s "
        "| answers = batch 1's |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        lines.append(
            f"| {p['max_batch_size']} | {p['answered']} / {p['sent']} | {len(p['errors'])} | {p['lost']} | "
            f"{p['tokens']} | {p['wall_s']:.1f} | {p['tokens_per_s']:.1f} | {p['throughput_ratio']:.2f} | "
            f"{p['latency_p50_s']:.2f} | {p['latency_p95_s']:.2f} | "
            f"{p['answers_equal_first_phase']} of {len(PROMPTS)} prompts |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
