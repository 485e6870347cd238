"""``bit-axon run``: generate from a prompt, or chat, with a model directory and an optional adapter."""

from __future__ import annotations

import sys
from pathlib import Path

from bit_axon.inference import (
    ChatSession,
    GenerationChunk,
    Sampler,
    load,
    load_for_inference,
    stream_generate,
)
from bit_axon.loading import check_tokenizer_fits, load_tokenizer
from bit_axon.tokenizer import BaseTokenizer

import typer
from rich.console import Console

EXIT_COMMANDS = ("/exit", "/quit")
CHAT_HELP = "Commands: /reset starts the conversation over, /exit or /quit (or Ctrl-D) ends it, /help shows this."


TOKENIZER_HELP = (
    "Tokenizer id, directory or file (default: the model directory's tokenizer.json, else the bundled Qwen2.5 one)."
)


def _load(model: Path | None, adapter: Path | None, tokenizer: str | None, config_small: bool):
    """The model and tokenizer of ``run``; raises ``ValueError``/``OSError`` with a one-line message."""
    if config_small and model is not None:
        raise ValueError("pass --model or --config-small, not both")
    if not config_small and model is None:
        raise ValueError("no model: pass --model DIR (or --config-small for a random smoke-test model)")
    if not config_small:
        return load(model, adapter, tokenizer)
    loaded, tok = load_for_inference(None, adapter, config_small=True), load_tokenizer(None, tokenizer)
    check_tokenizer_fits(loaded, tok)
    return loaded, tok


def _read_prompt(prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    if sys.stdin.isatty():
        raise ValueError("no prompt: give PROMPT, pipe one on stdin, or use --chat")
    text = sys.stdin.read()
    if not text.strip():
        raise ValueError("the prompt read from stdin is empty")
    return text


def _show(chunks, stream: bool, console: Console) -> GenerationChunk:
    """Print the generated text (as it comes, or at the end) and the speed; return the last chunk."""
    parts = []
    for chunk in chunks:
        if stream:
            typer.echo(chunk.text, nl=False)
        else:
            parts.append(chunk.text)
    if not stream:
        typer.echo("".join(parts), nl=False)
    typer.echo()
    if chunk.stats is not None:
        console.print(chunk.stats.summary(), style="dim", highlight=False)
    return chunk


def run(
    prompt: str | None = typer.Argument(None, help="Prompt text; read from stdin when omitted and stdin is piped."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model directory (float or quantized)."),
    adapter: Path | None = typer.Option(None, "--adapter", help="LoRA/DoRA adapter file, applied without merging."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", "-t", help=TOKENIZER_HELP),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens to generate per reply."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: off)."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling probability mass (1: off)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed, for reproducible sampling."),
    chat: bool = typer.Option(
        False, "--chat", "-c", help="Interactive multi-turn chat (/exit or EOF ends, /reset clears)."
    ),
    system: str | None = typer.Option(None, "--system", help="System message put before the conversation."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as-is, without the chat template."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the reply when it is complete."),
    config_small: bool = typer.Option(
        False, "--config-small", help="A fresh small model with random weights (smoke test)."
    ),
) -> None:
    """Generate text with a Bit-Axon model.

    The prompt is rendered with the tokenizer's chat template (the model's own, else ChatML) as a
    user turn followed by the generation prompt (``--raw`` sends it as-is). Generation stops at the
    tokenizer's end-of-turn or end-of-document token or after --max-tokens. Prompt and generation
    speed go to stderr.
    """
    console = Console(stderr=True)
    try:
        if raw and (chat or system is not None):
            raise ValueError("--raw sends one prompt as-is; it cannot be combined with --chat or --system")
        if max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
        Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)  # reject bad settings before loading
        text = None if chat else _read_prompt(prompt)
        loaded, tok = _load(model, adapter, tokenizer, config_small)
    except (ValueError, OSError) as err:  # TokenizerLoadError and FileNotFoundError are OSErrors
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None

    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    try:
        if chat:
            _chat(ChatSession(loaded, tok, system=system), prompt, seed, sampling, not no_stream, console)
            return
        ids = prompt_ids(tok, text, system, raw)
        _show(stream_generate(loaded, tok, ids, seed=seed, **sampling), not no_stream, console)
    except KeyboardInterrupt:
        typer.echo()
        raise typer.Exit(130) from None


def prompt_ids(tok: BaseTokenizer, text: str, system: str | None = None, raw: bool = False) -> list[int]:
    """The token ids ``run`` generates from: ``text`` as-is when ``raw``, else a user turn (after the
    ``system`` message, if any) rendered with the tokenizer's chat template and its generation prompt."""
    if raw:
        return tok.encode(text)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return tok.apply_chat_template([*messages, {"role": "user", "content": text}], add_generation_prompt=True)


def _chat(session: ChatSession, first: str | None, seed: int | None, sampling: dict, stream: bool, console: Console):
    interactive = sys.stdin.isatty()
    if interactive:
        console.print("Chat: /exit or Ctrl-D ends, /reset starts over, /help lists the commands.", style="dim")
    turn = 0
    while True:
        if first is not None:
            message, first = first, None
        else:
            if interactive:
                console.print(">>> ", end="")
            line = sys.stdin.readline()
            if not line:  # EOF
                break
            message = line.rstrip("\n")
        if message.strip() in EXIT_COMMANDS:
            break
        if message.strip() == "/reset":
            session.reset()
            console.print("Conversation cleared.", style="dim", highlight=False)
            continue
        if message.strip() == "/help":
            console.print(CHAT_HELP, style="dim", highlight=False, soft_wrap=True)
            continue
        if not message.strip():
            continue
        # A different seed per turn, so a repeated question need not get the same answer.
        turn_seed = None if seed is None else seed + turn
        _show(session.send(message, seed=turn_seed, **sampling), stream, console)
        turn += 1
