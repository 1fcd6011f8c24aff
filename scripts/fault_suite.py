"""The long fault-injection suite: every trial kind of ``tests/faults/trials.py``, repeated with random moments.

    python scripts/fault_suite.py                       # the whole suite (about 30 minutes on 2 shared cores)
    python scripts/fault_suite.py --scale 0.25          # a quarter of the repetitions of each kind
    python scripts/fault_suite.py --only sigkill --seed 7
    python scripts/fault_suite.py --json faults.json    # every trial's outcome, for docs/RELIABILITY.md

Prints one line per trial, a table per kind, and ``faults: N trials, M failures``; exits 1 when anything failed.
Runs the real commands (``python -m smoa_mlx.train`` ...) in subprocesses against a tiny model in a scratch folder.
The disk-full trials mount a 1 MB tmpfs and need root; without it they are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faults.harness import World  # noqa: E402
from faults.trials import TRIALS, Outcome  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every kind's repetitions (min 1 each)")
    parser.add_argument("--only", action="append", default=[], help="run kinds whose name contains this text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments and forms")
    parser.add_argument("--root", help="scratch folder (default: a new temporary folder, removed afterwards)")
    parser.add_argument("--json", help="write every trial's outcome to this file")
    parser.add_argument("--list", action="store_true", help="list the trial kinds and exit")
    args = parser.parse_args(argv)
    # Stopping the suite (Ctrl-C, or kill when it runs in the background, where SIGINT is ignored) still prints the
    # figures of the trials that ran and unmounts a tmpfs in use.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.list:
        for name, (_, reps) in TRIALS.items():
            print(f"{reps:4d}  {name}")
        return 0
    kinds = [(n, f, max(1, round(r * args.scale))) for n, (f, r) in TRIALS.items()
             if not args.only or any(o.lower() in n.lower() for o in args.only)]
    scratch = tempfile.TemporaryDirectory(prefix="smoa_faults_") if args.root is None else None
    world = World(Path(args.root or scratch.name))
    rng = random.Random(args.seed)
    records, started = [], time.monotonic()
    # Interleave the kinds, so a partial run (Ctrl-C) has sampled all of them.
    plan = [(name, fn, rep) for name, fn, reps in kinds for rep in range(reps)]
    rng.shuffle(plan)
    try:
        for i, (name, fn, rep) in enumerate(plan, 1):
            trial_rng = random.Random(rng.random())
            t0 = time.monotonic()
            try:
                outcome = fn(world, trial_rng, rep)
            except Exception as e:  # noqa: BLE001 - a crash of the harness is a failure to report, not to hide
                outcome = Outcome(note="harness error").fail(f"{type(e).__name__}: {e}")
                traceback.print_exc()
            status = "FAIL" if outcome.failures else "ok"
            print(f"[{i}/{len(plan)}] {status:4} {name}: {outcome.note} ({time.monotonic() - t0:.0f} s)", flush=True)
            for problem in outcome.failures:
                print(f"        - {problem}", flush=True)
            records.append({"kind": name, "note": outcome.note, "failures": outcome.failures})
    except KeyboardInterrupt:
        print("interrupted: the figures below cover the trials that ran", flush=True)
    finally:
        if scratch is not None:
            scratch.cleanup()
    print(f"\n{'kind':45} trials  failures")
    for name, _, _ in kinds:
        mine = [r for r in records if r["kind"] == name]
        print(f"{name:45} {len(mine):6d}  {sum(bool(r['failures']) for r in mine):8d}")
    failed = sum(bool(r["failures"]) for r in records)
    minutes = (time.monotonic() - started) / 60
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "scale": args.scale, "minutes": round(minutes, 1),
                                               "trials": records}, indent=1) + "\n")
    print(f"time: {minutes:.0f} min")
    print(f"faults: {len(records)} trials, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
