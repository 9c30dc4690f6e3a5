"""Write the example matrices: two 512x512 float32 matrices and one of a mismatched shape.

    python examples/make_examples.py [OUTPUT_DIR]

Each .npz holds one array under the key ``matrix``, as the lab's clients send them.
"""

import sys
from pathlib import Path

import numpy as np


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    rng = np.random.default_rng(seed=2026)
    shapes = {"matrix1": (512, 512), "matrix2": (512, 512), "matrix_mismatched": (256, 512)}
    for name, shape in shapes.items():
        np.savez(out / f"{name}.npz", matrix=rng.random(shape, dtype=np.float32))
        print(f"wrote {out / name}.npz {shape} float32")


if __name__ == "__main__":
    main()
