"""``eclip-train``: pretrain ECLIP from a preset.

    eclip-train --preset demo --data data/synthetic --out runs/demo [key=value ...]
    torchrun --nproc_per_node 2 -m eclip.train --preset demo --data data/synthetic --out runs/demo2
    eclip-train --preset a100x32-vit-b16 --dry-run --world-size 32      # batch arithmetic and memory, no GPU
"""

from __future__ import annotations

import argparse
import sys

import torch

from .config import preset


def dry_run(cfg, world: int) -> int:
    """Check the batch arithmetic of a preset for a world size and estimate memory per GPU, without GPUs."""
    import eclip.models as em

    from .trainer import check_batch

    global_batch = check_batch(cfg, world)
    with torch.device("meta"):
        model = em.create(cfg.model, **cfg.model_overrides)
    params = em.count_parameters(model)
    momentum = sum(p.numel() for p in model.momentum_towers.parameters()) if model.momentum_towers else 0
    shard = cfg.shard_group_size or world
    # fp32 weights + fp32 gradients + 2 AdamW moments for the trainable parameters, fp32 momentum copy
    state_gb = (params * 16 + momentum * 4) / shard / 2**30
    cfg_m = model.config
    tokens = cfg_m.num_patches + 1
    act_bytes = 2 if cfg.precision == "bf16" else 4
    # with activation checkpointing: each block's input is kept; without: ~ 12 tensors of that size per block
    per_block = 1 if cfg.activation_checkpointing else 12
    act_gb = cfg.micro_batch * act_bytes * per_block * (
        cfg_m.vision_depth * tokens * cfg_m.vision_width * 2  # the image and the positive image (momentum: no grad)
        + cfg_m.text_depth * cfg_m.max_text_len * cfg_m.text_width) / 2**30
    print(f"preset: {cfg.model}, world size {world}, micro-batch {cfg.micro_batch} x accumulation {cfg.grad_accum} "
          f"x {world} = global batch {global_batch} (preset: {cfg.global_batch})")
    print(f"parameters: {params / 1e6:.1f}M trainable + {momentum / 1e6:.1f}M momentum copy; sharded over {shard} ranks")
    if cfg_m.queue_size:
        ok = cfg_m.queue_size % global_batch == 0
        print(f"queue: {cfg_m.queue_size} = {cfg_m.queue_size / global_batch:g} x global batch"
              f"{'' if ok else ' (does not divide: the queue wraps mid-batch)'}")
    print(f"memory per GPU (estimate): model and optimizer state {state_gb:.2f} GiB, activations "
          f"{act_gb:.2f} GiB ({'with' if cfg.activation_checkpointing else 'without'} activation checkpointing)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eclip-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--data", default=None, help="a catalogue folder (catalogue.jsonl) or a manifest")
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    parser.add_argument("--dry-run", action="store_true", help="check batch arithmetic and memory, train nothing")
    parser.add_argument("--world-size", type=int, default=None, help="with --dry-run: the world size to check")
    parser.add_argument("overrides", nargs="*", help="key=value TrainConfig overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data={args.data!r}")
    if args.out:
        overrides.append(f"out={args.out!r}")
    cfg = preset(args.preset, overrides)
    if args.dry_run:
        world = args.world_size or (cfg.global_batch // (cfg.micro_batch * cfg.grad_accum) if cfg.global_batch else 1)
        return dry_run(cfg, world)
    from eclip._deps import TRAIN, require

    require("eclip-train", *TRAIN, *(("tensorboard",) if cfg.tensorboard else ()))
    from .trainer import train

    train(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
