"""Regenerate smoa_mlx/data/{train,valid,test}.jsonl: the demo set `python -m smoa_mlx.train` uses with no --data.

Short questions, each answered in one terse sentence that restates the question ("The capital of Peru is Lima.").
SmolLM2-135M-Instruct answers such questions at length; the consistent short style is what the adapter visibly
learns within a few hundred steps. The splits hold out different items (other countries, other numbers), so
validation measures the learned style on unseen questions, not memorisation. Deterministic: run it again and
the files come out identical.

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "smoa_mlx" / "data"

CAPITALS = dict(
    France="Paris", Germany="Berlin", Italy="Rome", Spain="Madrid", Portugal="Lisbon", Japan="Tokyo",
    China="Beijing", India="New Delhi", Russia="Moscow", Canada="Ottawa", Mexico="Mexico City", Brazil="Brasilia",
    Argentina="Buenos Aires", Peru="Lima", Chile="Santiago", Egypt="Cairo", Kenya="Nairobi", Greece="Athens",
    Norway="Oslo", Sweden="Stockholm", Finland="Helsinki", Denmark="Copenhagen", Poland="Warsaw",
    Austria="Vienna", Ireland="Dublin", Belgium="Brussels", Netherlands="Amsterdam", Switzerland="Bern",
    Turkey="Ankara", Iran="Tehran", Iraq="Baghdad", Thailand="Bangkok", Vietnam="Hanoi", Indonesia="Jakarta",
    Australia="Canberra", Cuba="Havana", Colombia="Bogota", Hungary="Budapest", Ukraine="Kyiv",
    Nigeria="Abuja", Ghana="Accra", Morocco="Rabat", Philippines="Manila", Malaysia="Kuala Lumpur",
    Pakistan="Islamabad", Israel="Jerusalem", Czechia="Prague", Romania="Bucharest", Bulgaria="Sofia",
    Serbia="Belgrade", Croatia="Zagreb", Iceland="Reykjavik", Venezuela="Caracas", Ecuador="Quito",
    Uruguay="Montevideo", Ethiopia="Addis Ababa", Senegal="Dakar", Nepal="Kathmandu", Mongolia="Ulaanbaatar",
)
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("old", "new"),
    ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("thick", "thin"), ("loud", "quiet"), ("near", "far"),
    ("long", "short"), ("clean", "dirty"), ("heavy", "light"), ("inside", "outside"), ("win", "lose"),
    ("true", "false"), ("begin", "end"), ("push", "pull"), ("buy", "sell"), ("day", "night"), ("left", "right"),
    ("first", "last"), ("always", "never"), ("above", "below"), ("friend", "enemy"), ("brave", "afraid"),
    ("sweet", "sour"), ("wide", "narrow"), ("young", "old"), ("safe", "dangerous"), ("easy", "difficult"),
    ("north", "south"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("man", "men"),
    ("woman", "women"), ("goose", "geese"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives"),
    ("city", "cities"), ("box", "boxes"), ("bus", "buses"), ("baby", "babies"), ("wolf", "wolves"),
    ("cactus", "cacti"), ("fish", "fish"), ("sheep", "sheep"), ("ox", "oxen"), ("potato", "potatoes"),
    ("hero", "heroes"), ("party", "parties"), ("church", "churches"), ("life", "lives"), ("shelf", "shelves"),
    ("dish", "dishes"), ("story", "stories"), ("key", "keys"), ("toy", "toys"), ("glass", "glasses"),
]
SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("pig", "oink"),
    ("owl", "hoot"), ("horse", "neigh"), ("lion", "roar"), ("snake", "hiss"), ("bee", "buzz"), ("frog", "croak"),
    ("mouse", "squeak"), ("rooster", "cock-a-doodle-doo"), ("crow", "caw"), ("donkey", "hee-haw"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
UNITS = [("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
         ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("years", "months", 12),
         ("kilograms", "grams", 1000), ("dozens", "items", 12)]


def qa(prompt: str, completion: str) -> dict:
    return {"prompt": prompt, "completion": completion}


def items(rng: random.Random) -> list[list[dict]]:
    """Per task, a list of examples; each task list is later split by position, so splits share no item."""
    tasks = []
    caps = list(CAPITALS.items())
    rng.shuffle(caps)
    tasks.append([qa(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in caps])
    ops = OPPOSITES[:]
    rng.shuffle(ops)
    tasks.append([qa(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in ops])
    pl = PLURALS[:]
    rng.shuffle(pl)
    tasks.append([qa(f"What is the plural of {a}?", f"The plural of {a} is {b}.") for a, b in pl])
    snd = SOUNDS[:]
    rng.shuffle(snd)
    tasks.append([qa(f"What sound does a {a} make?", f"A {a} says {b}.") for a, b in snd])
    seq = [qa(f"What day comes after {d}?", f"{DAYS[(i + 1) % 7]} comes after {d}.") for i, d in enumerate(DAYS)]
    seq += [qa(f"What month comes after {m}?", f"{MONTHS[(i + 1) % 12]} comes after {m}.")
            for i, m in enumerate(MONTHS)]
    rng.shuffle(seq)
    tasks.append(seq)
    add, seen = [], set()
    while len(add) < 160:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if rng.random() < 0.5:
            row = qa(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
        else:
            a, b = max(a, b), min(a, b)
            row = qa(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.")
        if row["prompt"] not in seen:  # every question in one split only
            seen.add(row["prompt"])
            add.append(row)
    tasks.append(add)
    conv = []
    for big, small, factor in UNITS:
        for n in range(2, 12):
            conv.append(qa(f"How many {small} are in {n} {big}?", f"{n} {big} is {n * factor} {small}."))
    rng.shuffle(conv)
    tasks.append(conv)
    return tasks


def main() -> None:
    rng = random.Random(0)
    splits = {"train": [], "valid": [], "test": []}
    for task in items(rng):
        n = len(task)
        n_val = n_test = max(2, n // 8)
        splits["valid"] += task[:n_val]
        splits["test"] += task[n_val : n_val + n_test]
        splits["train"] += task[n_val + n_test :]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        rng.shuffle(rows)
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{OUT / name}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    main()
