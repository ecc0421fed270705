"""Multi-step arithmetic problems and their two answer styles.

A problem is a chain of single-digit additions and subtractions, either modulo
10 (the last digit of the running value, as on a clock) or kept within 0..9 by
choosing the operands. Each step is one small lookup, but the final value
depends on every operand (and, modulo 10, on every wrap-around). Answering
directly needs the whole chain in one forward pass (a small model fails as
chains grow); writing one labelled step at a time turns it into a look-up of
the operation by its label plus one small sum, at the price of more generated
tokens. `steps` (the number of operations) is the difficulty knob.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from mergepipe.world.tokenizer import ANSWER_MARK

LABELS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+", 3), ("-", 5), …
    modulus: int | None = 10  # None: ordinary arithmetic that stays in 0..9

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
            v = apply(v, op, n, self.modulus)
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def prompt(self) -> str:
        """Operations carry labels (a, b, …) so a written step can point at its operation."""
        labelled = " ".join(f"{LABELS[j]}{op}{n}" for j, (op, n) in enumerate(self.ops))
        return f"Q: {self.start} {labelled}\nA:"

    def direct(self) -> str:
        """The base model's completion: the final answer only."""
        return self.partial(0)

    def reasoning(self) -> str:
        """The reasoning model's completion: every step, then the answer."""
        return self.partial(self.steps)

    def partial(self, written: int) -> str:
        """A completion that writes the first `written` steps, then answers.

        A step names its operation and applies it to the running value
        (`b1+7=8`); answering after fewer steps leaves more of the chain to do
        in one go, which is where a small model errs.
        """
        parts, v = [], self.start
        for j, ((op, n), nxt) in enumerate(zip(self.ops[:written], self.values())):
            parts.append(f"{LABELS[j]}{v}{op}{n}={nxt}")
            v = nxt
        work = " " + " ".join(parts) if parts else ""
        return f"{work} {ANSWER_MARK} {self.answer}"


def apply(value: int, op: str, n: int, modulus: int | None = 10) -> int:
    out = value + n if op == "+" else value - n
    return out % modulus if modulus else out


def random_problem(rng: random.Random, steps: int, modulus: int | None = 10) -> Problem:
    """Draw a start digit and `steps` operations with operands 1..9; without a
    modulus, only operations that keep the running value in 0..9."""
    v = start = rng.randint(0, 9)
    ops = []
    for _ in range(steps):
        if modulus:
            op, n = rng.choice("+-"), rng.randint(1, 9)
        else:
            op, n = rng.choice([("+", n) for n in range(1, 10 - v)] +
                               [("-", n) for n in range(1, v + 1)])
        v = apply(v, op, n, modulus)
        ops.append((op, n))
    return Problem(start, tuple(ops), modulus)


def sample(rng: random.Random, count: int, min_steps: int, max_steps: int,
           exclude: set[str] | None = None, modulus: int | None = 10) -> list[Problem]:
    """`count` distinct problems with steps uniform in [min_steps, max_steps]."""
    seen = set(exclude or ())
    out: list[Problem] = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 100 * count:
            raise ValueError(f"cannot draw {count} distinct problems with "
                             f"{min_steps}..{max_steps} steps")
        p = random_problem(rng, rng.randint(min_steps, max_steps), modulus)
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
