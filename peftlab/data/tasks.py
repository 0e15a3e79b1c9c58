"""A built-in arithmetic word-problem task, written by our own code (no download, no licence).

Each problem is a short story over one to two operations with an exact integer answer, and
its output is a worked solution in the style the evaluators parse:
    "Mia has 12 apples. She buys 7 more apples. How many apples does Mia have now?"
    -> "12 + 7 = 19. The answer is 19."   answer "19"
Generation is deterministic for a seed (a private random.Random) and has no duplicate
instructions, and arithmetic_task(n) is a prefix of arithmetic_task(m) for n < m.
"""
from __future__ import annotations

import random
from functools import partial

from .formats import DataError, Example

NAMES = (("Mia", "She"), ("Liam", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She"), ("Omar", "He"),
         ("Priya", "She"), ("Kenji", "He"), ("Sofia", "She"), ("Lucas", "He"), ("Amara", "She"), ("Ivan", "He"))
THINGS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "stamps", "cards", "coins")


def _problem(rng: random.Random, max_value: int) -> tuple[str, list[tuple[int, str, int, int]]]:
    """One story and its solution steps [(x, op, y, x op y), ...]; each step feeds the next."""
    (name, she), (friend, _) = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    big, small = partial(rng.randint, 1, max_value), partial(rng.randint, 2, min(12, max_value))  # small: times tables
    kind = rng.choice(("add", "sub", "mul", "add_sub", "mul_add"))
    if kind == "add":
        a, b = big(), big()
        return (f"{name} has {a} {thing}. {she} buys {b} more {thing}. How many {thing} does {name} have now?",
                [(a, "+", b, a + b)])
    if kind == "sub":
        a = big()
        b = rng.randint(1, a)
        return (f"{name} has {a} {thing}. {she} gives {b} {thing} to {friend}. "
                f"How many {thing} does {name} have left?", [(a, "-", b, a - b)])
    if kind == "mul":
        a, b = small(), small()
        return (f"{name} has {a} boxes. Each box holds {b} {thing}. How many {thing} does {name} have in total?",
                [(a, "*", b, a * b)])
    if kind == "add_sub":
        a, b = big(), big()
        c = rng.randint(1, a + b)
        return (f"{name} has {a} {thing}. {she} finds {b} more {thing}, then gives {c} {thing} to {friend}. "
                f"How many {thing} does {name} have now?", [(a, "+", b, a + b), (a + b, "-", c, a + b - c)])
    a, b, c = small(), small(), big()
    return (f"{name} buys {a} bags with {b} {thing} in each bag. {she} already had {c} {thing}. "
            f"How many {thing} does {name} have altogether?", [(a, "*", b, a * b), (a * b, "+", c, a * b + c)])


def arithmetic_task(n: int, seed: int = 0, max_value: int = 50) -> list[Example]:
    """``n`` distinct word problems, deterministic for ``seed``; operands are at most ``max_value``."""
    if n < 1 or max_value < 2:
        raise DataError(f"arithmetic_task needs n >= 1 and max_value >= 2, got n={n}, max_value={max_value}: "
                        "raise them")
    rng, seen, examples, misses = random.Random(seed), set(), [], 0
    while len(examples) < n:
        instruction, steps = _problem(rng, max_value)
        if instruction in seen:
            misses += 1
            if misses > 1000:  # a long run of repeats: a small max_value has run out of problems
                break
            continue
        seen.add(instruction)
        misses = 0
        result = steps[-1][3]
        work = " ".join(f"{x} {op} {y} = {z}." for x, op, y, z in steps)
        examples.append(Example(instruction, "", f"{work} The answer is {result}.", str(result)))
    if len(examples) == n:
        return examples
    raise DataError(f"only about {len(examples)} distinct problems exist with max_value={max_value}: "
                    f"raise max_value or ask for fewer than {n}")


def arithmetic_splits(n_train: int, n_test: int, seed: int = 0, max_value: int = 50) -> tuple[list, list]:
    """Disjoint (train, test): the test set is drawn first, so it does not change with n_train."""
    examples = arithmetic_task(n_train + n_test, seed, max_value)
    return examples[n_test:], examples[:n_test]
