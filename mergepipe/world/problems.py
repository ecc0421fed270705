"""Multi-step arithmetic problems and their two answer styles.

A problem is a chain of single-digit additions and subtractions whose running
value always stays in 0..9, so each step is one small lookup, but the final
value depends on every operand. Answering directly needs the whole chain in one
forward pass (a small model fails as chains grow); rewriting the chain one
operation at a time turns it into easy lookups and copies, at the price of more
generated tokens.
`steps` (the number of operations) is the difficulty knob.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from mergepipe.world.tokenizer import ANSWER_MARK


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+", 3), ("-", 5), …

    @property
    def steps(self) -> int:
        return len(self.ops)

    @property
    def expression(self) -> str:
        return str(self.start) + "".join(f"{op}{n}" for op, n in self.ops)

    def values(self) -> list[int]:
        """Running values after each operation."""
        out, v = [], self.start
        for op, n in self.ops:
            v = v + n if op == "+" else v - n
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def prompt(self) -> str:
        return f"Q: {self.expression}\nA:"

    def direct(self) -> str:
        """The base model's completion: the final answer only."""
        return self.partial(0)

    def reasoning(self) -> str:
        """The reasoning model's completion: every step, then the answer."""
        return self.partial(self.steps)

    def partial(self, written: int) -> str:
        """A completion that rewrites the chain `written` times, then answers.

        Each rewrite evaluates the first operation and copies the rest
        (8-6+4 -> 2+4 -> 6), so a step is one lookup plus a copy; answering
        after fewer rewrites leaves more of the chain to do in one go.
        """
        chain = []
        for j, v in enumerate(self.values()[:written], 1):
            chain.append(str(v) + "".join(f"{op}{n}" for op, n in self.ops[j:]))
        work = " " + "=".join(chain) if chain else ""
        return f"{work} {ANSWER_MARK} {self.answer}"


def random_problem(rng: random.Random, steps: int) -> Problem:
    """Draw a chain whose running value stays a single digit."""
    v = rng.randint(0, 9)
    start, ops = v, []
    for _ in range(steps):
        choices = [("+", n) for n in range(1, 10) if v + n <= 9]
        choices += [("-", n) for n in range(1, 10) if v - n >= 0]
        op, n = rng.choice(choices)
        v = v + n if op == "+" else v - n
        ops.append((op, n))
    return Problem(start, tuple(ops))


def sample(rng: random.Random, count: int, min_steps: int, max_steps: int,
           exclude: set[str] | None = None) -> list[Problem]:
    """`count` distinct problems with steps uniform in [min_steps, max_steps]."""
    seen = set(exclude or ())
    out: list[Problem] = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 100 * count:
            raise ValueError(f"cannot draw {count} distinct problems with "
                             f"{min_steps}..{max_steps} steps")
        p = random_problem(rng, rng.randint(min_steps, max_steps))
        if p.expression in seen:
            continue
        seen.add(p.expression)
        out.append(p)
    return out


def write_jsonl(problems: list[Problem], path: Path) -> None:
    """Task file in the evaluator's format (prompt, answer) plus the difficulty."""
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "answer": str(p.answer),
                                "steps": p.steps}, sort_keys=True) + "\n")
