"""Step-0 quality of a port: the teacher's and each ported student's perplexity, and KL(teacher || student).

    python bench/port_start.py                       # SmolLM2-135M-Instruct (GGUF), both SSM starts
    python bench/port_start.py --teacher ./qwen2.5-0.5b --starts attention
    python bench/port_start.py --student ./model     # an existing Bit-Axon directory instead of porting

Held-out text: the chats of examples/tickets_val.jsonl rendered with the teacher's chat template, and
plain text (default: this repository's README.md, in chunks of --chunk tokens). Every position
predicts the next token; KL is per token, in nats, over the full vocabulary. Students are ported in
this process with `bit_axon.porting.port_model` (the same mapping as `bit-axon port-weights`), so
nothing is written unless --save DIR is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.loading import load_model, load_tokenizer
from bit_axon.porting import port_model, port_weights, read_source
from bit_axon.sources.default_model import default_model_path

import mlx.core as mx
import mlx.nn as nn

ROOT = Path(__file__).resolve().parents[1]
# --starts name -> (ssm_init, depth) of the port.
STARTS = {"identity": ("identity", "moe"), "attention": ("attention", "moe"), "attention-all": ("attention", "all")}


def chat_sequences(tokenizer, path: Path, limit: int) -> list[list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    return [tokenizer.apply_chat_template(row["messages"]) for row in rows]


def text_sequences(tokenizer, path: Path, chunk: int, limit: int) -> list[list[int]]:
    ids = tokenizer.encode(path.read_text())
    return [ids[i : i + chunk] for i in range(0, len(ids) - 1, chunk)][:limit]


def logits_of(model: nn.Module, ids: list[int]) -> mx.array:
    logits, _ = model(mx.array([ids]))
    return logits[0].astype(mx.float32)


def compare(teacher: nn.Module, students: dict[str, nn.Module], sequences: list[list[int]]) -> dict[str, dict]:
    """Per model: mean next-token NLL (perplexity) and, for students, mean KL(teacher || student)."""
    totals = {name: {"nll": 0.0, "kl": 0.0} for name in ["teacher", *students]}
    tokens = 0
    for ids in sequences:
        if len(ids) < 2:
            continue
        targets = mx.array(ids[1:])
        t_logp = nn.log_softmax(logits_of(teacher, ids)[:-1], axis=-1)
        totals["teacher"]["nll"] += float(-mx.take_along_axis(t_logp, targets[:, None], axis=-1).sum())
        p = mx.exp(t_logp)
        for name, student in students.items():
            s_logp = nn.log_softmax(logits_of(student, ids)[:-1], axis=-1)
            totals[name]["nll"] += float(-mx.take_along_axis(s_logp, targets[:, None], axis=-1).sum())
            totals[name]["kl"] += float((p * (t_logp - s_logp)).sum())
        tokens += len(ids) - 1
    out = {}
    for name, t in totals.items():
        out[name] = {"ppl": math.exp(t["nll"] / tokens), "tokens": tokens}
        if name != "teacher":
            out[name]["kl"] = t["kl"] / tokens
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="source model (default: the SmolLM2-135M-Instruct GGUF)")
    parser.add_argument(
        "--starts", nargs="*", default=["identity", "attention"], choices=list(STARTS),
        help="ports to compare: identity / attention start on the MoE-layer depth map, attention-all on every layer",
    )
    parser.add_argument("--student", action="append", default=[], help="evaluate this Bit-Axon directory too")
    parser.add_argument("--chats", type=Path, default=ROOT / "examples" / "tickets_val.jsonl")
    parser.add_argument("--text", type=Path, default=ROOT / "README.md")
    parser.add_argument("--limit", type=int, default=60, help="chats (and text chunks) to use")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--config", type=Path, default=None, help="Bit-Axon config.json overrides for the port")
    parser.add_argument("--save", type=Path, default=None, help="also write each ported student to DIR/<start>")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    teacher_path = args.teacher or str(default_model_path())
    teacher = load_model(teacher_path)
    tokenizer = load_tokenizer(teacher_path)
    loaded = read_source(teacher_path)  # a second, dequantized copy: the teacher stays as stored
    config = None
    if args.config is not None:
        from bit_axon.config import BitAxonConfig
        from bit_axon.porting import default_config

        config = BitAxonConfig.from_dict({**default_config(loaded.config).to_dict(), **json.loads(args.config.read_text())})
    students: dict[str, nn.Module] = {}
    port_seconds = {}
    for start in args.starts:
        began = time.perf_counter()
        ssm_init, depth = STARTS[start]
        options = dict(ssm_init=ssm_init, depth=depth, loaded=loaded)
        if args.save is not None:
            students[start] = load_model(port_weights(teacher_path, args.save / start, config, **options))
        else:
            students[start], _ = port_model(teacher_path, config, **options)
        port_seconds[start] = time.perf_counter() - began
    for path in args.student:
        students[Path(path).name] = load_model(path)
    sets = {
        "chats": chat_sequences(tokenizer, args.chats, args.limit),
        "text": text_sequences(tokenizer, args.text, args.chunk, args.limit),
    }
    results = {name: compare(teacher, students, seqs) for name, seqs in sets.items()}
    print(f"teacher: {teacher_path}")
    for start, seconds in port_seconds.items():
        print(f"port ({start} start): {seconds:.1f} s")
    print("| held-out text | tokens | model | perplexity | KL(teacher || model) nats/token |")
    print("|---|---|---|---|---|")
    for set_name, res in results.items():
        for name, r in res.items():
            kl = f"{r['kl']:.3f}" if "kl" in r else "-"
            print(f"| {set_name} | {r['tokens']} | {name} | {r['ppl']:.2f} | {kl} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"teacher": teacher_path, "port_seconds": port_seconds, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
