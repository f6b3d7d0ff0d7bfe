"""``loramoe serve`` with a LoRAMoE adapter against ``transformers serve`` on the same base, side by side in one run.

``python benchmarks/serve_vs_transformers.py [--tiny] [--clients 32] [--requests 1] [--max-tokens 32]
[--staggered 32] [--mean-gap-s 0.5] [--servers loramoe,loramoe-base,transformers-cb,transformers] [--out FILE]``

Every server runs on one torch thread (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` in its process). All
are started first, then each load visits them one at a time (only one server has work at any moment), the staggered
load in the reverse order, with the same greedy chat requests, every one streamed (with
``stream_options.include_usage``):

- **concurrent**: ``clients`` clients at once, each sending ``requests`` requests one after another;
- **staggered**: ``staggered`` requests sent at random times (exponential gaps of mean ``mean-gap-s``, drawn with
  ``seed``), each at its time whatever the server is doing, so requests arrive while others decode.

Servers: ``loramoe`` (``loramoe serve`` with a LoRAMoE adapter of the demo's shape: ``experts`` x rank ``rank`` on
the FFN linears of every layer, untrained but with non-zero experts, so it costs what a trained one costs),
``loramoe-base`` (``loramoe serve`` on the base alone), ``transformers-cb`` (``transformers serve
--continuous-batching``) and ``transformers`` (``transformers serve``), both on the base alone: a LoRAMoE adapter
cannot be merged into its base, so nothing else serves it.

Per server and load: requests answered, generated tokens (the responses' usage), tokens per second (all tokens over
the load's wall time, and over the server processes' CPU time, which the machine's other work does
not change), time to first token (to the first chunk with text) and latency, p50 and p99. A load that passes
``--time-limit`` seconds is stopped and its unanswered requests counted. Only ratios within one run mean something:
the machine may be shared. Writes a JSON report (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve_bench import PROMPTS  # noqa: E402  (the same prompts as the load test)

SERVERS = ("loramoe", "loramoe-base", "transformers-cb", "transformers")


def make_models(folder: Path, args: argparse.Namespace) -> tuple[str, Path]:
    """The base model's directory and a saved LoRAMoE adapter on it with random non-zero experts and routers."""
    import torch

    from loramoe import LoRAMoEConfig, adapted_modules, inject, save_adapter
    from loramoe.models.base import load_base
    from loramoe.models.bundled import resolve_model

    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import tiny_model, tiny_tokenizer

        base = str(folder / "tiny-base")
        tiny_model("llama", max_position_embeddings=512).save_pretrained(base)
        tiny_tokenizer().save_pretrained(base)
    else:
        base = resolve_model(
            "smollm2-135m-instruct"
        )  # the bundled default, converted once to a local directory
    model, _ = load_base(base)
    torch.manual_seed(0)
    inject(model, LoRAMoEConfig(num_experts=args.experts, rank=args.rank, alpha=32.0, dropout=0.0))
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=0.01)
    return base, save_adapter(model, folder / "adapter")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, base: str, adapter: Path, port: int, args: argparse.Namespace) -> list[str]:
    """A Python process that sets one torch thread and runs the server's own command line."""
    if name.startswith("loramoe"):
        model = ["--adapter", str(adapter)] if name == "loramoe" else ["--model", base]
        argv = ["serve", *model, "--port", str(port), "--max-batch-size", str(args.clients),
                "--max-queue", str(4 * args.clients), "--max-tokens", str(args.max_tokens),
                "--timeout", str(args.time_limit * 2)]  # fmt: skip
        run = "from loramoe.cli import main; sys.exit(main(argv))"
    else:
        argv = ["serve", base, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level",
                "warning", *(["--continuous-batching"] if name == "transformers-cb" else [])]  # fmt: skip
        run = "from transformers.cli.transformers import main; sys.argv = ['transformers', *argv]; sys.exit(main())"
    code = f"import sys, torch; torch.set_num_threads({args.threads}); argv = {argv!r}; {run}"
    return [sys.executable, "-c", code]


def start(name: str, base: str, adapter: Path, log: Path, args: argparse.Namespace):
    import httpx

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            server_command(name, base, adapter, port, args), env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                model = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
                return proc, url, model
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"{name} did not start within 600 s")


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first = None
    text, usage = [], None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {
                    "ok": False,
                    "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}",
                }
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        first = first or time.perf_counter()
                        text.append(content)
    except httpx.HTTPError as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    end = time.perf_counter()
    if usage is None:
        return {"ok": False, "error": "no usage in the stream"}
    return {"ok": True, "tokens": usage["completion_tokens"], "ttft_s": (first or end) - start,
            "latency_s": end - start, "prompt": prompt, "text": "".join(text)}  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a server process and its live children (``transformers serve`` decodes in one)."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


async def run_load(url: str, model: str, load: str, pid: int, args: argparse.Namespace) -> dict:
    """One load: ``concurrent`` (closed loop) or ``staggered`` (requests at seeded random times)."""
    import httpx

    results: list[dict] = []

    async def send(prompt: str, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        results.append(await one_request(client, url, model, prompt, args.max_tokens))

    async def client_loop(index: int) -> None:
        for k in range(args.requests):
            await send(PROMPTS[(index + k) % len(PROMPTS)])

    if load == "concurrent":
        sent = args.clients * args.requests
        jobs = [client_loop(i) for i in range(args.clients)]
    else:
        rng, at = random.Random(args.seed), 0.0
        arrivals = []
        for _ in range(args.staggered):
            arrivals.append(at)
            at += rng.expovariate(1 / args.mean_gap_s)
        sent = len(arrivals)
        jobs = [send(PROMPTS[i % len(PROMPTS)], delay) for i, delay in enumerate(arrivals)]
    limits = httpx.Limits(max_connections=sent + 4)
    async with httpx.AsyncClient(timeout=args.time_limit * 2, limits=limits) as client:
        cpu, start = cpu_seconds(pid), time.perf_counter()
        tasks = [asyncio.ensure_future(job) for job in jobs]
        _, pending = await asyncio.wait(tasks, timeout=args.time_limit)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    return summarize(results, sent, wall, cpu)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(results: list[dict], sent: int, wall: float, cpu: float) -> dict:
    answered = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in answered)
    ttft, latency = [r["ttft_s"] for r in answered], [r["latency_s"] for r in answered]
    return {
        "sent": sent,
        "answered": len(answered),
        "errors": [r["error"] for r in results if not r["ok"]],
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "server_cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
        "ttft_p50_s": _percentile(ttft, 0.5),
        "ttft_p99_s": _percentile(ttft, 0.99),
        "latency_p50_s": _percentile(latency, 0.5),
        "latency_p99_s": _percentile(latency, 0.99),
        "answers": {r["prompt"]: r["text"] for r in answered},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer test model instead of SmolLM2-135M")
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}"
    )
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the concurrent load")
    parser.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--staggered", type=int, default=32, help="requests of the staggered load")
    parser.add_argument("--mean-gap-s", type=float, default=0.5, help="mean gap between staggered arrivals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the staggered arrival times")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--experts", type=int, default=6, help="LoRAMoE experts per adapted linear")
    parser.add_argument("--rank", type=int, default=4, help="rank of each expert")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument(
        "--time-limit", type=float, default=600.0, help="seconds per load before it is stopped"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the JSON report here (after every server)"
    )
    args = parser.parse_args(argv)
    unknown = set(args.servers.split(",")) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT / "src"))
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": "tiny 2-layer llama" if args.tiny else "SmolLM2-135M-Instruct",
        "adapter": f"LoRAMoE, {args.experts} experts of rank {args.rank} on the FFN linears (server loramoe only)",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "servers": {},
    }
    names = args.servers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = make_models(Path(tmp), args)
        running = {}
        try:
            for name in names:  # all up at once (idle, they cost nothing), so the loads can alternate
                running[name] = start(name, base, adapter, Path(tmp) / f"{name}.log", args)
            # The staggered load visits the servers in the reverse order: a drift in the machine's other load
            # (it is shared) then favours no server in both loads.
            for load, order in (("concurrent", names), ("staggered", names[::-1])):
                for name in order:
                    proc, url, model = running[name]
                    r = report["servers"].setdefault(name, {})[load] = asyncio.run(
                        run_load(url, model, load, proc.pid, args)
                    )
                    print(f"{name} {load}: {r['answered']}/{r['sent']} answered, {r['tokens_per_s']:.1f} tokens/s, "
                          f"{r['tokens_per_cpu_s']} tokens/CPU s, TTFT p50 {r['ttft_p50_s']}", file=sys.stderr)  # fmt: skip
                    finish(report, args)
        finally:
            for proc, _, _ in running.values():
                proc.terminate()
            for proc, _, _ in running.values():
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(table(report))
    return report


def finish(report: dict, args: argparse.Namespace) -> None:
    """Ratios to ``transformers serve --continuous-batching`` and answers compared, for the loads measured so far;
    the machine's state; the JSON written."""
    servers = report["servers"]
    # The same greedy answers on the same base (text stripped: loramoe strips it, transformers does not).
    reference = servers.get("loramoe-base") or next(iter(servers.values()))
    for loads in servers.values():
        for load, r in loads.items():
            peer = servers.get("transformers-cb", {}).get(load)
            for key in ("tokens_per_s", "tokens_per_cpu_s", "ttft_p50_s"):
                if peer is not None and r[key] and peer[key]:
                    r[f"{key}_vs_transformers_cb"] = r[key] / peer[key]
            if load in reference:
                same = [
                    r["answers"].get(p, "").strip() == text.strip()
                    for p, text in reference[load]["answers"].items()
                ]
                r["answers_equal_reference"] = f"{sum(same)} of {len(same)}"
    report["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after the last load"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"{report['model']}; {report['adapter']}; concurrent: {s['clients']} clients x {s['requests']} request(s); "
        f"staggered: {s['staggered']} requests, mean gap {s['mean_gap_s']} s (seed {s['seed']}); max_tokens "
        f"{s['max_tokens']}, greedy, streamed; {s['threads']} torch thread(s) per server; {report['machine']}; "
        f"{report['date']}",
        "",
        "| server | load | answered / sent | tokens | wall s | tokens/s | x t-cb | server CPU s | tokens/CPU s | x t-cb "
        "| TTFT p50 s | x t-cb | TTFT p99 s | latency p50 s | latency p99 s | answers = loramoe-base's |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    for name, loads in report["servers"].items():
        for load, r in loads.items():
            lines.append(
                f"| {name} | {load} | {r['answered']} / {r['sent']} | {r['tokens']} | {r['wall_s']:.1f} | "
                f"{r['tokens_per_s']:.1f} | {f(r.get('tokens_per_s_vs_transformers_cb'))} | {r['server_cpu_s']:.1f} | "
                f"{f(r['tokens_per_cpu_s'], 1)} | {f(r.get('tokens_per_cpu_s_vs_transformers_cb'))} | "
                f"{f(r['ttft_p50_s'])} | {f(r.get('ttft_p50_s_vs_transformers_cb'))} | {f(r['ttft_p99_s'])} | "
                f"{f(r['latency_p50_s'])} | {f(r['latency_p99_s'])} | {r.get('answers_equal_reference', '-')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    loads = [r for server in main()["servers"].values() for r in server.values()]
    sys.exit(0 if all(r["answered"] == r["sent"] and not r["errors"] for r in loads) else 1)
