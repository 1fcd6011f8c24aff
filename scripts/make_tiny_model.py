"""Write a random-weight llama model folder and a matching jsonl data folder (offline; for GPU-host checks).

    python scripts/make_tiny_model.py MODEL_DIR DATA_DIR [--layers 4] [--hidden 512]

Uses the same builders as the tests (tests/train_helpers.py): a real word-level tokenizer with a chat template and
mlx-lm's own model writers, so `python -m smoa_mlx.train --model MODEL_DIR --data DATA_DIR` runs anywhere.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from train_helpers import build_data_folder, build_model_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--train-examples", type=int, default=256)
    args = parser.parse_args()
    build_model_folder(args.model_dir, layers=args.layers, hidden=args.hidden)
    build_data_folder(args.data_dir, n_train=args.train_examples, n_valid=32)


if __name__ == "__main__":
    main()
