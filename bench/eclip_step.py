"""One ECLIP training step (forward with the five losses, backward, AdamW step, momentum update), with the
decoder's slot attention on the fused kernels ("auto") and on the plain-PyTorch reference, side by side;
plus the decoder alone (forward+backward). On a GPU it runs eclip-vit-b16 at batch 200 under bfloat16
autocast by default and reports samples/s.

    python bench/eclip_step.py --threads 2                      # eclip-tiny, batch 32, on the CPU

Times are medians over --repeats (variants interleaved). Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import eclip.models as em  # noqa: E402
from cases import environment, sync  # noqa: E402


def make_batch(model, batch_size: int, device: str, seed: int = 0) -> dict:
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    size = cfg.image_size
    return dict(
        images=torch.randn(batch_size, 3, size, size, generator=gen).to(device),
        positive_images=torch.randn(batch_size, 3, size, size, generator=gen).to(device),
        input_ids=torch.randint(5, cfg.vocab_size, (batch_size, cfg.max_text_len), generator=gen).to(device),
        attention_mask=torch.ones(batch_size, cfg.max_text_len, dtype=torch.long).to(device),
        product_ids=torch.randint(0, batch_size, (batch_size,), generator=gen).to(device),
    )


def set_decoder_backend(model, backend: str) -> None:
    for block in model.towers.decoder.blocks:
        block.slot_attn.backend = backend
    for block in model.momentum_towers.decoder.blocks:
        block.slot_attn.backend = backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: eclip-tiny on CPU, eclip-vit-b16 on a GPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 (tiny), 200 (vit-b16)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("eclip-vit-b16" if device == "cuda" else "eclip-tiny")
    batch_size = args.batch or (200 if preset == "eclip-vit-b16" else 32)
    dtype = torch.bfloat16 if device == "cuda" else None

    torch.manual_seed(0)
    model = em.create(preset).to(device).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    batch = make_batch(model, batch_size, device)
    tokens = model.towers.encode_image(batch["images"])[1].detach()
    prompts = torch.randn(batch_size, model.config.num_queries, model.config.embed_dim, device=device)
    types = torch.randint(0, 2, (batch_size, model.config.num_queries), device=device)

    def train_step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_momentum()

    def decoder_step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            out = model.towers.decode(tokens, prompts, types)
        out.hidden.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    variants = ["auto", "reference"]
    samples = {(what, v): [] for what in ("train step", "decoder fwd+bwd") for v in variants}
    for v in variants:  # warm-up
        set_decoder_backend(model, v)
        train_step()
        decoder_step()
    for _ in range(args.repeats):
        for v in variants:
            set_decoder_backend(model, v)
            for what, fn in (("train step", train_step), ("decoder fwd+bwd", decoder_step)):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                samples[(what, v)].append(time.perf_counter() - start)

    env = environment()
    rows = []
    for (what, v), times in samples.items():
        median = statistics.median(times)
        rows.append({"measure": what, "decoder_backend": v, "median_s": median, "samples_s": times,
                     "samples_per_s": batch_size / median if what == "train step" else None})
    print(f"\n{env.get('gpu') or env['cpu']}; torch {env['torch']}, {env['torch_threads']} threads; "
          f"{preset}, batch {batch_size}\n")
    print("| measure | decoder slot attention | median ms | samples/s |")
    print("|---|---|---:|---:|")
    for r in rows:
        rate = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-"
        print(f"| {r['measure']} | {'fused (auto)' if r['decoder_backend'] == 'auto' else 'reference'} | "
              f"{r['median_s'] * 1e3:.1f} | {rate} |")
    path = args.out or os.path.join(HERE, "results", f"eclip_step-{preset}-{device}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "command": " ".join(sys.argv), "preset": preset, "batch": batch_size,
                   "results": rows}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
