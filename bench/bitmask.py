"""What a mask costs on the wire per output form: BitmaskLabels PNG (ours), brush RLE (ours), and the 8-bit
grayscale PNG HumanSignal's ml-interactive example sends, on the same realistic masks.

For each size: encode time (median of ``--runs``) and the JSON bytes of the region value (what Label Studio
receives and the browser parses). Every run checks that each form decodes back to the mask, so a smaller or
faster form never hides a wrong one.

    .venv/bin/python -m bench.bitmask --runs 7
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os

import numpy as np
from PIL import Image

from backend import bitmask, rle
from bench.rle import median_seconds, object_mask

SIZES = [(768, 1024), (3000, 4000)]


def gray_png(mask: np.ndarray) -> str:
    """HumanSignal's ``mask_to_bitmap_png_base64``: an 8-bit L image, 255 on 0, default PNG settings."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return bitmask.PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'size':>10} {'form':<34} {'encode ms':>10} {'JSON kB':>9}")
    for height, width in SIZES:
        mask = object_mask(height, width, seed=1)
        forms = {
            "BitmaskLabels PNG, 1-bit (ours)": (lambda m=mask: bitmask.encode(m),
                                                 lambda v: bitmask.decode(v)),
            "brush RLE (ours)": (lambda m=mask: rle.encode(m),
                                 lambda v, h=height, w=width: rle.decode(v, h, w)),
            "8-bit gray PNG (HumanSignal)": (lambda m=mask: gray_png(m),
                                             lambda v: bitmask.decode(v, channel="red")),
        }
        for name, (encode, decode) in forms.items():
            value = encode()
            assert np.array_equal(decode(value), mask), name
            seconds = median_seconds(encode, args.runs)
            size_kb = len(json.dumps(value)) / 1024
            print(f"{width}x{height:<5} {name:<34} {seconds * 1000:>10.1f} {size_kb:>9.1f}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
