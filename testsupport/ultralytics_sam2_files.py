"""Seeded random SAM 2 / SAM 2.1 files in Ultralytics' format (``sam2.1_{t,s,b,l}.pt``, ``sam2_{t,s,b,l}.pt``).

What the format is, read off Ultralytics' own code (``ultralytics/models/sam/build.py``, 8.4.x): the
builder makes a ``SAM2Model`` whose modules carry Meta's ``SAM2Base`` names, switches on SAM 2.1's extra
modules (``no_obj_embed_spatial``, ``obj_ptr_tpos_proj``) when the file name contains ``sam2.1``, then
``_load_checkpoint`` does ``torch.load(f)``, takes ``["model"]`` when that is a dict, and
``load_state_dict`` (strict) on the result. So a file is a state dict of the whole video model in Meta's
key layout, plain or under ``"model"``; how the released files wrap it cannot be checked here (nothing can
be downloaded), so both wrappings are made and tested.

Two ways to make such a file:

* ``ultralytics_model`` (needs ``ultralytics``, AGPL-3.0, a test tool only): Ultralytics' builder itself,
  with only its checkpoint load skipped (the builder needs the name ``sam2.1_t.pt`` to build the 2.1
  modules, and would otherwise look for that file), every parameter then randomised as
  ``testsupport.sam2_checkpoints.randomize`` does for Meta's models;
* ``fixture_state_dict`` (no ``ultralytics``): seeded tensors for the key names and shapes recorded in
  ``tests/fixtures/ultralytics-sam2.1_t-keys.json``, written from Ultralytics' builder by running this
  module (``python -m testsupport.ultralytics_sam2_files``).
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch

from testsupport.sam2_checkpoints import randomize

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ultralytics-sam2.1_t-keys.json"
BUILDERS = {"t": "build_sam2_t", "s": "build_sam2_s", "b": "build_sam2_b", "l": "build_sam2_l"}
# Keys of nn.Embedding tables and other learned vectors that randomize() draws at unit scale.
_UNIT_SCALE = ("token.weight", "tokens.weight", "point_embeddings.", "not_a_point_embed.", "no_mask_embed.",
               "positional_encoding_gaussian_matrix", "no_obj_ptr", "no_obj_embed_spatial", "maskmem_tpos_enc",
               "no_mem_pos_enc")


def file_name(size: str = "t", version: str = "sam2.1") -> str:
    """Ultralytics' file name of a release: ``sam2.1_t.pt`` ... ``sam2_l.pt``."""
    return f"{version}_{size}.pt"


def ultralytics_model(size: str = "t", version: str = "sam2.1", seed: int = 0) -> torch.nn.Module:
    """Ultralytics' ``SAM2Model`` of a release, built by its own builder, with seeded random parameters."""
    from ultralytics.models.sam import build

    with mock.patch.object(build, "_load_checkpoint", lambda model, checkpoint: model):
        sam = getattr(build, BUILDERS[size])(file_name(size, version))
    return randomize(sam, seed)


def save(state_dict: dict[str, torch.Tensor], path: Path, wrap: bool = False) -> Path:
    """Write a state dict as Ultralytics' loader reads it: plain, or under ``"model"`` when ``wrap``."""
    torch.save({"model": state_dict} if wrap else state_dict, path)
    return path


def key_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {key: list(tensor.shape) for key, tensor in state_dict.items()}


def fixture_state_dict(seed: int = 0, fixture: Path = FIXTURE) -> dict[str, torch.Tensor]:
    """Seeded tensors for every key of the fixture, scaled by name as ``randomize`` scales by module."""
    shapes: dict[str, list[int]] = json.loads(fixture.read_text())["shapes"]
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        leaf = key.rsplit(".", 1)[-1]
        if "pos_embed" in key:
            value = 0.5 * noise
        elif key == "no_mem_embed":
            value = 0.3 * noise
        elif leaf == "weight" and len(shape) == 1:
            value = 1.0 + 0.1 * noise
        elif any(part in key for part in _UNIT_SCALE):
            value = noise
        elif leaf == "bias" or len(shape) < 2:
            value = 0.05 * noise
        else:
            value = noise / max(1, noise[0].numel()) ** 0.5
        out[key] = value
    return out


def write_fixture(path: Path = FIXTURE) -> Path:
    """Record the key names and shapes of Ultralytics' ``sam2.1_t.pt`` state dict (needs ``ultralytics``)."""
    import ultralytics

    shapes = key_shapes(ultralytics_model("t", "sam2.1").state_dict())
    document = {"source": f"ultralytics {ultralytics.__version__}: models/sam/build.py build_sam2_t('sam2.1_t.pt')"
                          ".state_dict()", "shapes": shapes}
    lines = [f" {json.dumps(key)}: {json.dumps(shape)}" for key, shape in shapes.items()]  # one key a line
    path.write_text(f'{{"source": {json.dumps(document["source"])},\n"shapes": {{\n' + ",\n".join(lines) + "\n}}\n")
    return path


if __name__ == "__main__":
    print(write_fixture())
