"""Generate the example datasets under examples/ (deterministic: same seed, same files).

    python scripts/make_examples.py [--out examples] [--seed 0]

The tasks are ones a tiny model visibly learns in a few hundred CPU steps: small sums and
differences, the day or month after/before another, upper-casing and reversing short words,
opposites and plurals. ORPO pairs put a correct answer against a plausible wrong one.

``tickets*.jsonl`` is the demo's task for a real pretrained model (SmolLM2-135M-Instruct): route a
customer-support message to one of four teams, answering with the team's name alone. An instruct
model of that size answers with a sentence, or the wrong team; a few hundred LoRA steps teach it
both the format and the routing (``bit-axon demo`` measures the exact-match accuracy before/after).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
WORDS = [
    "cat", "dog", "sun", "tree", "book", "lamp", "fish", "bird", "moon", "star", "rain", "road",
    "milk", "desk", "frog", "ship", "rose", "king", "coin", "bell", "cake", "door", "wolf", "leaf",
    "apple", "river", "stone", "cloud", "tiger", "piano", "bread", "chair", "house", "light",
]
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "happy": "sad",
    "open": "closed", "early": "late", "light": "dark", "full": "empty", "old": "new", "high": "low",
    "left": "right", "wet": "dry", "hard": "soft", "loud": "quiet", "win": "lose", "first": "last",
}
PLURALS = {
    "cat": "cats", "box": "boxes", "child": "children", "mouse": "mice", "city": "cities",
    "leaf": "leaves", "foot": "feet", "tooth": "teeth", "bus": "buses", "story": "stories",
    "knife": "knives", "person": "people", "dish": "dishes", "baby": "babies", "goose": "geese",
}
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one short sentence.",
    "You are a friendly tutor who answers questions about numbers and words.",
]

TEAMS = ("billing", "shipping", "technical", "account")
TICKET_QUESTION = "Which team should handle this message: billing, shipping, technical or account?"
PRODUCTS = ["headphones", "coffee maker", "desk lamp", "backpack", "keyboard", "blender", "phone case", "jacket"]
TICKET_PROBLEMS = {
    "billing": [
        "I was charged twice for my {product}.", "My invoice shows {amount} but I paid less.",
        "Please refund the {amount} you took last week.", "Why did my card get charged {amount} again?",
        "The discount code was not applied to my bill.", "I cancelled but you still billed me {amount}.",
        "Can I get a receipt for the {product} payment?", "My subscription price went up without notice.",
    ],
    "shipping": [
        "My {product} has not arrived yet.", "The tracking number for order {order} does not work.",
        "The box with my {product} came damaged.", "Order {order} was delivered to the wrong address.",
        "When will my {product} be shipped?", "The courier left my parcel outside in the rain.",
        "I need to change the delivery address for order {order}.", "My package is stuck in customs.",
    ],
    "technical": [
        "The app crashes when I open settings.", "My {product} will not turn on after the update.",
        "I get error {code} when I try to sync.", "The bluetooth on my {product} keeps disconnecting.",
        "The website shows a blank page on my phone.", "The firmware update for my {product} failed.",
        "Error {code} appears every time I start it.", "The {product} makes a buzzing noise and restarts.",
    ],
    "account": [
        "I forgot my password and the reset email never comes.", "Please delete my account.",
        "I cannot log in with my new email address.", "Someone else changed my account email.",
        "How do I change the name on my profile?", "My account was locked after three tries.",
        "I want to merge my two accounts.", "The two-factor code is not accepted.",
    ],
}
TICKET_OPENERS = ["", "Hello, ", "Hi team, ", "Good morning. ", "Hey, ", "Dear support, "]
TICKET_CLOSERS = ["", " Thanks.", " Please help.", " This is urgent.", " Thank you in advance.", " Regards, {name}."]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]

# A task returns (question, correct answer, plausible wrong answer).
Task = Callable[[random.Random], tuple[str, str, str]]


def add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    q = rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}."])
    return q, f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def subtract(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(10, 99)
    b = rng.randint(1, a)
    wrong = a - b + rng.choice([-2, -1, 1, 2])
    q = rng.choice([f"What is {a} - {b}?", f"Subtract {b} from {a}."])
    return q, f"{a} - {b} = {a - b}.", f"{a} - {b} = {wrong}."


def cyclic(items: list[str], kind: str) -> Task:
    def task(rng: random.Random) -> tuple[str, str, str]:
        i = rng.randrange(len(items))
        step = rng.choice([1, -1])
        answer = items[(i + step) % len(items)]
        wrong = items[(i - step) % len(items)]
        if step == 1:
            q = rng.choice([f"What {kind} comes after {items[i]}?", f"Which {kind} follows {items[i]}?"])
            return q, f"The {kind} after {items[i]} is {answer}.", f"The {kind} after {items[i]} is {wrong}."
        q = f"What {kind} comes before {items[i]}?"
        return q, f"The {kind} before {items[i]} is {answer}.", f"The {kind} before {items[i]} is {wrong}."

    return task


def uppercase(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f"Write '{word}' in capital letters.", word.upper(), word.capitalize()


def reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f"Spell '{word}' backwards.", word[::-1], word


def opposite(rng: random.Random) -> tuple[str, str, str]:
    word, answer = rng.choice(sorted(OPPOSITES.items()))
    return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{answer}'.", f"The opposite of '{word}' is '{word}'."


def plural(rng: random.Random) -> tuple[str, str, str]:
    word, answer = rng.choice(sorted(PLURALS.items()))
    return f"What is the plural of '{word}'?", f"The plural of '{word}' is '{answer}'.", f"The plural of '{word}' is '{word}s'."


TASKS: list[Task] = [add, subtract, cyclic(DAYS, "day"), cyclic(MONTHS, "month"), uppercase, reverse, opposite, plural]


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice([1, 1, 1, 2])):
        question, answer, _ = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def alpaca(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        word = rng.choice(WORDS)
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if kind == 1:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)}
    question, answer, _ = rng.choice(TASKS)(rng)
    return {"instruction": question, "output": answer}


def preference(rng: random.Random) -> dict:
    question, chosen, rejected = rng.choice(TASKS)(rng)
    if rng.random() < 0.25:  # the plain-string form of the guide
        return {"prompt": question, "chosen": chosen, "rejected": rejected}
    prompt = [{"role": "user", "content": question}]
    if rng.random() < 0.2:
        prompt.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


# The last two phrasings of each team are kept for validation: held-out accuracy measures routing
# messages worded as none of the training ones are, not recall of the training phrasings.
HELD_OUT_PHRASINGS = 2


def ticket(rng: random.Random, held_out: bool = False) -> tuple[str, str, str]:
    """(prompt, team, another team) for one synthetic support message."""
    team = rng.choice(TEAMS)
    phrasings = TICKET_PROBLEMS[team]
    phrasings = phrasings[-HELD_OUT_PHRASINGS:] if held_out else phrasings[:-HELD_OUT_PHRASINGS]
    problem = rng.choice(phrasings).format(
        product=rng.choice(PRODUCTS), amount=f"${rng.randint(5, 300)}", order=f"#{rng.randint(1000, 9999)}",
        code=rng.randint(100, 999),
    )
    message = rng.choice(TICKET_OPENERS) + problem + rng.choice(TICKET_CLOSERS).format(name=rng.choice(NAMES))
    wrong = rng.choice([t for t in TEAMS if t != team])
    return f"{TICKET_QUESTION}\n\n{message}", team, wrong


def ticket_chat(rng: random.Random, held_out: bool = False) -> dict:
    prompt, team, _ = ticket(rng, held_out)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": team}]}


def ticket_preference(rng: random.Random) -> dict:
    prompt, team, wrong = ticket(rng)
    return {"prompt": prompt, "chosen": team, "rejected": wrong}


def generate(make: Callable[[random.Random], dict], n: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    """``n`` distinct records, none of them in ``exclude`` (so validation never repeats training data)."""
    records, seen = [], set(exclude)
    while len(records) < n:
        record = make(rng)
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records):4d} records to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    sft = generate(conversation, 400, rng, set())
    sft_val = generate(conversation, 50, rng, {json.dumps(r, sort_keys=True) for r in sft})
    orpo = generate(preference, 200, rng, set())
    orpo_val = generate(preference, 40, rng, {json.dumps(r, sort_keys=True) for r in orpo})
    write_jsonl(args.out / "sft.jsonl", sft)
    write_jsonl(args.out / "sft_val.jsonl", sft_val)
    write_jsonl(args.out / "alpaca.jsonl", generate(alpaca, 200, rng, set()))
    write_jsonl(args.out / "orpo.jsonl", orpo)
    write_jsonl(args.out / "orpo_val.jsonl", orpo_val)
    # A stream of its own, so adding these files left the ones above unchanged.
    rng = random.Random(args.seed + 1)
    tickets = generate(ticket_chat, 400, rng, set())
    tickets_val = generate(lambda r: ticket_chat(r, held_out=True), 60, rng, set())
    write_jsonl(args.out / "tickets.jsonl", tickets)
    write_jsonl(args.out / "tickets_val.jsonl", tickets_val)
    write_jsonl(args.out / "tickets_orpo.jsonl", generate(ticket_preference, 200, rng, set()))


if __name__ == "__main__":
    main()
