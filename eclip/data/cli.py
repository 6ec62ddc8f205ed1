"""``eclip-data``: generate a synthetic catalogue, convert a manifest to shards, read a catalogue through
a DataLoader and report its bad data.

    eclip-data synth --products 2000 --images-per-product 3 --size 64 --seed 0 --out data/synthetic
    eclip-data synth ... --same-category-distractor 0.5 --family-size 4 --mark-min-px 3   # or --no-marks
    eclip-data shard --manifest data/synthetic/catalogue.jsonl --out data/synthetic/shards
    eclip-data inspect --manifest data/synthetic/catalogue.jsonl --workers 2
    eclip-data inspect --shards "data/synthetic/shards/shard-{000000..000001}.tar" --workers 2
"""

from __future__ import annotations

import argparse
import collections
import glob
import sys
import time


def _shard(args) -> int:
    from .shards import write_shards

    start = time.perf_counter()
    paths, report = write_shards(args.manifest, args.out, args.products_per_shard)
    print(f"wrote {len(paths)} shards to {args.out} in {time.perf_counter() - start:.1f} s; "
          f"not copied: {dict(report) or 'nothing'}")
    return 0


def _inspect(args) -> int:
    import torch

    import eclip.models as em

    from .dataset import Collate, ProductDataset, shard_dataset
    from .manifest import read_manifest

    cfg = em.preset_config(args.model)
    tokenizer = em.tokenizer_for(cfg, args.vocab)
    report = collections.Counter()
    if args.manifest:
        dataset = ProductDataset(read_manifest(args.manifest), cfg.image_size, train=True)
        report.update(dataset.report)
    else:
        urls = sorted(glob.glob(args.shards)) or args.shards
        dataset = shard_dataset(urls, cfg.image_size, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=Collate(tokenizer))
    samples = batches = 0
    start = time.perf_counter()
    for batch in loader:
        batches += 1
        samples += batch["size"]
        report.update(batch["skipped"])
    print(f"{samples} samples in {batches} batches ({args.workers} workers) in {time.perf_counter() - start:.1f} s")
    print(f"skipped or handled: {dict(report) or 'nothing'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eclip-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("synth", help="generate a synthetic product catalogue (see eclip-data synth --help)",
                   add_help=False)
    shard = sub.add_parser("shard", help="convert a manifest to WebDataset shards (sharded by product)")
    shard.add_argument("--manifest", required=True)
    shard.add_argument("--out", required=True)
    shard.add_argument("--products-per-shard", type=int, default=1000)
    inspect = sub.add_parser("inspect", help="read a catalogue through a DataLoader and report bad data")
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest")
    source.add_argument("--shards", help="a glob or a brace pattern of .tar shards")
    inspect.add_argument("--model", default="eclip-tiny", help="preset whose image size and tokenizer to use")
    inspect.add_argument("--vocab", default=None)
    inspect.add_argument("--batch-size", type=int, default=32)
    inspect.add_argument("--workers", type=int, default=2)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "synth":
        from .synth import main as synth_main

        return synth_main(argv[1:])
    args = parser.parse_args(argv)
    from eclip._deps import MODEL, require

    needs = ("webdataset", "PIL") + (MODEL + ("torchvision",) if args.command == "inspect" else ())
    require(f"eclip-data {args.command}", *needs)
    return {"shard": _shard, "inspect": _inspect}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
