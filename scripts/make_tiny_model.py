"""Write a tiny random SD1-like latentgen checkpoint (CLIP text encoder, KL f=2, 16x16 images, 2 steps).

    python scripts/make_tiny_model.py tiny.safetensors
    latentgen txt2img "a red circle" --model tiny.safetensors

The weights are random: the images are noise, but every stage of the pipeline runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import KINDS, random_model


def main() -> None:
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in KINDS):
        raise SystemExit(f"usage: python scripts/make_tiny_model.py OUT.safetensors [{'|'.join(KINDS)}]")
    kind = sys.argv[2] if len(sys.argv) == 3 else "sd1"
    print(random_model(kind, sys.argv[1]))


if __name__ == "__main__":
    main()
