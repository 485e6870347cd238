"""bit-axon serve against mlx_lm.server on the same model, with 1, 4 and 16 concurrent clients.

Each server runs alone (one after the other, never both at once) as a subprocess on localhost; the
clients are the `openai` package's async client, streaming chat completions at temperature 0 with
a fixed reply length, so both servers do the same work. Printed per server and concurrency:
requests/s, time to first token (median), tokens/s per client (median) and aggregate tokens/s,
and the ratio of ours to mlx-lm's.

    python bench/serve.py                       # SmolLM2-135M-Instruct (the bundled GGUF)
    python bench/serve.py --clients 1 4 16 --requests 32 --max-tokens 64

The GGUF is written once as an mlx-lm directory (quantized as in the file, 4-bit affine), which
both servers load; `--peers q4 float` also runs mlx_lm.server on a float32 copy (what ours computes
with on the CPU after dequantizing once), so the engines are also compared on the same float weights.
mlx_lm.server runs with the same OpenBLAS as ours. Each peer's ratio is against ours in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Explain what a CPU cache is.", "Write a haiku about autumn.", "How do I boil an egg?",
    "Give three tips for learning to code.", "What is the capital of France, and why is it famous?",
    "Describe a cat to someone who has never seen one.", "What is photosynthesis?",
    "Tell me a short story about a robot.", "How do vaccines work?", "List four kinds of clouds.",
    "Why is the sky blue?", "What makes a good password?", "Summarize the water cycle.",
    "How does a bicycle stay upright?", "What is a prime number?", "Suggest a name for a coffee shop.",
]


PEER_NAMES = {"q4": "mlx_lm.server", "float": "mlx_lm.server float32"}
MLX_LM_SERVER = "import sys, bit_axon; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(out: Path, kinds: list[str]) -> dict[str, Path]:
    """mlx-lm directories of the bundled SmolLM2: "q4" as quantized in the GGUF, "float" in float32."""
    import bit_axon  # noqa: F401  (BLAS before mlx)
    from bit_axon.loading import load_model, load_tokenizer, save_model
    from bit_axon.quantization import dequantize_model
    from bit_axon.sources import default_model_path

    gguf = default_model_path()
    import mlx.core as mx

    paths = {kind: out / ("smollm2-float32" if kind == "float" else "smollm2-q4") for kind in dict.fromkeys(["q4", *kinds])}
    for kind, path in paths.items():
        if (path / "config.json").is_file():
            continue
        model = load_model(gguf, mx.float32 if kind == "float" else None)
        if kind == "float":
            dequantize_model(model)
        save_model(model, path, load_tokenizer(gguf))
    return paths


def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited at start; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.5)
    raise RuntimeError(f"{' '.join(command)} did not listen on {port} within 300 s; see {log}")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else chunks
    return {"ttft": (first or end) - start, "tokens": tokens, "seconds": end - start,
            "decode_tps": (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0}


async def load_test(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        await one_request(client, model, "Hello", 8)  # warm-up: compile, first allocations
        queue = list(range(requests))
        results: list[dict] = []
        failures: list[str] = []

        async def worker() -> None:
            while queue:
                i = queue.pop()
                try:
                    results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))
                except openai.APIError as error:  # counted and shown: a server that drops requests scores less
                    failures.append(f"{type(error).__name__}: {error}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    if failures:
        print(f"    {len(failures)} of {requests} requests failed, first: {failures[0]}", flush=True)
    return {
        "clients": clients, "requests": len(results), "failed": len(failures), "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "ttft_median_s": statistics.median(r["ttft"] for r in results) if results else float("nan"),
        "client_tps_median": statistics.median(r["tokens"] / r["seconds"] for r in results) if results else 0.0,
        "aggregate_tps": tokens / wall, "tokens": tokens,
    }


def measure(name: str, command: list[str], model: str, port: int, args, log_dir: Path) -> list[dict]:
    process = start(command, port, log_dir / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        rows = []
        for clients in args.clients:
            row = asyncio.run(load_test(url, model, clients, max(args.requests, clients), args.max_tokens))
            rows.append({"server": name, **row})
            print(f"  {name:>18} {clients:>3} clients: {row['requests_per_s']:.2f} req/s, TTFT {row['ttft_median_s']:.2f} s, "
                  f"{row['client_tps_median']:.1f} tok/s per client, {row['aggregate_tps']:.1f} tok/s in all", flush=True)
        return rows
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least clients)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bit-axon-bench-serve"))
    parser.add_argument("--peers", nargs="+", choices=["q4", "float"], default=["q4"],
                        help="which mlx_lm.server runs to compare with: on the 4-bit directory, on a float32 copy")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.peers)
    bin_dir = Path(sys.executable).parent
    def mlx_lm(path: Path):  # noqa: ANN202
        # mlx_lm.server with the same OpenBLAS as ours (importing bit_axon first preloads it), so
        # that the engines are compared, not the BLAS libraries.
        return lambda port: [sys.executable, "-c", MLX_LM_SERVER, "--model", str(path), "--port", str(port),
                             "--log-level", "WARNING"]

    # mlx_lm.server answers for the path it was given (its /v1/models lists the Hugging Face cache).
    runs = [("bit-axon serve", lambda port: [str(bin_dir / "bit-axon"), "serve", str(paths["q4"]), "--name", "smollm2",
                                             "--port", str(port), "--max-batch", "16"], "smollm2"),
            *((PEER_NAMES[kind], mlx_lm(paths[kind]), str(paths[kind])) for kind in args.peers)]
    print(f"SmolLM2-135M-Instruct, {args.max_tokens}-token replies, temperature 0, streaming; "
          f"{args.requests} requests per level", flush=True)
    rows = []
    for name, command, model in runs:
        port = free_port()
        rows += measure(name, command(port), model, port, args, args.work)
    ours = {r["clients"]: r for r in rows if r["server"] == "bit-axon serve"}
    for kind in args.peers:
        print(f"\nclients  ours / {PEER_NAMES[kind]}: aggregate tok/s  (TTFT ours, theirs)")
        for r in rows:
            if r["server"] == PEER_NAMES[kind]:
                o = ours[r["clients"]]
                ratio = o["aggregate_tps"] / r["aggregate_tps"] if r["aggregate_tps"] else float("inf")
                print(f"{r['clients']:>7}  {ratio:.2f}x  ({o['ttft_median_s']:.2f} s, {r['ttft_median_s']:.2f} s)"
                      + (f"  [{r['failed']} of theirs failed]" if r["failed"] else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
