"""What the tests and the benchmarks share, and the product never ships.

Seeded random checkpoints in the official formats built with the reference implementations
(``checkpoints``, ``mobilesam_checkpoints``, ``sam2_checkpoints``), what parity with the reference means (``parity``),
synthetic images (``images``), HTTP stand-ins for Label Studio and a cloud storage host (``image_server``),
real processes: redis-server, a real Label Studio, ``sam-backend serve`` (``processes``, ``label_studio``,
``backend``). Imported from the repository root: pytest puts it on the path, benchmarks run as
``python -m bench.<name>``. It is not part of the installed package (see pyproject's package list).
"""
