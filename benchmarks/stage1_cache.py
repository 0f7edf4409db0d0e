"""Stage 1 at toy scale: samples per second with and without SAM's image-feature cache.

    .venv/bin/python benchmarks/stage1_cache.py [--steps 20] [--batch-size 16] [--pretrained]

Two epochs over the same small training set: in the first every image is new (the encoder
runs), in the second every image is a cache hit. With the cache disabled (cache of size 1)
the encoder runs every time. Prints samples/s for each case.
"""

import argparse
import platform
import time

import torch

from lenslib.align import align_step
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.training import make_accelerator, make_scheduler


def measure(cache: bool, steps: int, batch_size: int, pretrained: bool) -> tuple[float, float]:
    """(samples/s in epoch 1, samples/s in epoch 2) for one setting."""
    torch.manual_seed(0)
    preset = get_preset("toy")
    model = build_lens(preset, pretrained=pretrained)
    if not cache:
        model.sam.cache.max_items = 1  # every new image evicts the last: no reuse
    model.set_stage("align")
    accelerator = make_accelerator(cpu=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = make_scheduler("cosine", optimizer, 2 * steps)
    train = toy_split(preset, "train", steps * batch_size)
    rates = []
    for _epoch in range(2):
        start = time.perf_counter()
        for s in range(steps):
            batch = [train[i] for i in range(s * batch_size, (s + 1) * batch_size)]
            align_step(model, batch, accelerator, optimizer, scheduler)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrained", action="store_true", help="use the committed toy bases")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    for cache in (False, True):
        first, second = measure(cache, args.steps, args.batch_size, args.pretrained)
        label = "with cache   " if cache else "without cache"
        print(f"{label}: epoch 1 {first:6.1f} samples/s, epoch 2 {second:6.1f} samples/s")


if __name__ == "__main__":
    main()
