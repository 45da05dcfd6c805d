"""What one task image may cost: the defaults of the limits a labelling team can set in the environment.

One home for these numbers so the settings (``backend.config``), the download (``backend.image_fetch``) and
the decoder (``backend.image_decode``) cannot disagree; kept free of imports so reading settings stays cheap.
"""

from __future__ import annotations

# IMAGE_TIMEOUT_S: a whole download, connect to last byte.
IMAGE_TIMEOUT_S = 30.0
# IMAGE_MAX_MB: the bytes of one image file.
IMAGE_MAX_BYTES = 50 * 1024 * 1024
# IMAGE_MAX_PIXELS: 100 megapixels (300 MB once decoded to RGB), a 10000x10000 scan. Pillow warns above its
# own Image.MAX_IMAGE_PIXELS (about 89.5 megapixels) and refuses images above twice that before we can look
# at them.
IMAGE_MAX_PIXELS = 100_000_000
