"""Time MobileSAM's image encoder: ours (``model.tiny_vit``) against the reference ``mobile_sam`` TinyViT.

Same seeded random weights on both sides, one 1024 x 1024 input, median of several runs after a warm-up.
Also prints the largest feature difference, so a speed-up never comes at the cost of parity unseen.

    .venv/bin/python -m bench.tiny_vit_encoder --threads 2 --runs 5
    .venv/bin/python -m bench.tiny_vit_encoder --device cuda --bf16 --batch 8

Target: ours no slower than the reference on CPU; on a GPU the whole encoder should stay well under
the 10 ms it takes to move an image in, so a click is bounded by the decoder.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from model.tiny_vit import TinyViT, tiny_vit_config_from_state_dict
from testsupport.mobilesam_checkpoints import randomize_, reference_tiny_vit


def median_seconds(encoder: torch.nn.Module, x: torch.Tensor, runs: int, bf16: bool) -> float:
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        encoder(x)  # warm-up: allocator, kernels, lazy initialisation
        for _ in range(runs):
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            encoder(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = PyTorch default)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (as model.load does on CUDA)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    reference = randomize_(reference_tiny_vit("vit_t"), seed=0).to(args.device)
    reference.eval()  # refresh the reference's cached attention biases on the device
    ours = TinyViT(**tiny_vit_config_from_state_dict(reference.state_dict(), prefix=""))
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours = ours.eval().to(args.device)
    x = torch.randn(args.batch, 3, 1024, 1024, generator=torch.Generator().manual_seed(1)).to(args.device)

    with torch.inference_mode():
        difference = (ours(x) - reference(x)).abs().max().item()
    t_reference = median_seconds(reference, x, args.runs, args.bf16)
    t_ours = median_seconds(ours, x, args.runs, args.bf16)
    where = f"{args.device}, {torch.get_num_threads()} threads" if args.device == "cpu" else args.device
    print(f"TinyViT vit_t, batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}, {where}")
    print(f"  reference {t_reference * 1000:8.1f} ms   ours {t_ours * 1000:8.1f} ms   "
          f"speed-up {t_reference / t_ours:4.2f}x   max |diff| fp32 {difference:.2e}")


if __name__ == "__main__":
    main()
