"""Training configurations and presets (one place; every field can be overridden from the command line)."""

from __future__ import annotations

import ast
import dataclasses


@dataclasses.dataclass
class TrainConfig:
    """A training run.

    Batch arithmetic: ``global_batch = micro_batch x grad_accum x world_size``, checked against
    ``global_batch`` when it is set (the presets set it). Gradient accumulation splits the contrastive losses'
    negatives: each micro-batch only sees its own micro_batch x world_size samples as negatives, so prefer
    activation checkpointing (``activation_checkpointing=True``) to fit the batch, and use accumulation only
    where that is acceptable.

    The learning rate warms up linearly over ``warmup_steps`` to ``lr`` and then decays linearly to 0 at the
    last step (paper: AdamW, 1e-4).
    """

    model: str = "eclip-tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    data: str | None = None  # a catalogue folder (catalogue.jsonl) or a manifest path
    out: str = "runs/demo"
    micro_batch: int = 32
    grad_accum: int = 1
    global_batch: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.02
    warmup_steps: int = 100
    grad_clip: float = 1.0
    precision: str = "fp32"  # "fp32", or "bf16" (FSDP2 mixed precision on GPUs, fp32 gradient reduction)
    activation_checkpointing: bool = False
    compile: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    workers: int = 0
    heldout_fraction: float = 0.1
    shard_group_size: int | None = None  # HSDP: shard within groups of this many ranks, replicate across
    tensorboard: bool = False
    # the weights of an earlier run to start from (its --out folder: the latest checkpoint there), e.g. the
    # shared ITC warm-up from which the demo's ECLIP and CLIP baseline branch; parameters it lacks (the
    # decoder of a model warmed up without one) keep their initialization, the momentum copy starts equal to
    # the loaded towers. Optimizer, schedule and step start afresh.
    init_from: str | None = None
    # training crop: "random_resized" (the paper's) or "keep_box" (a random crop that keeps the product box)
    crop: str = "random_resized"
    # weight decay on every parameter (True), or only on matrices (False: no decay on norms, biases, position
    # and type embeddings, the decoder's query embeddings and the logit scale, as CLIP and ViT recipes do)
    decay_all: bool = False
    # decode every training image once into a uint8 tensor on the training device and make each batch there
    # (pair choice as the dataset's, random resized crop and flip drawn and resampled on the device), instead
    # of a DataLoader over PIL: for GPUs, where the loader would be the bottleneck (eclip.data.preload,
    # docs/gpu-recipe.md). Needs crop="random_resized"; workers = threads that decode the images once.
    preload: bool = False


PRESETS: dict[str, dict] = {
    # eclip-tiny on the synthetic catalogue, on a 2-core CPU in a few minutes
    "demo": dict(model="eclip-tiny", micro_batch=32, epochs=3.0, lr=3e-4, warmup_steps=20, checkpoint_every=200,
                 log_every=10, model_overrides=dict(queue_size=128)),
    # eclip-demo's recipe (eclip.demo; the choices and their measurements are in docs/recipe.md): patch 8 at
    # 64 px (64 image tokens, so that a product covers several), batch 64, lr 1e-3 with 100 warmup steps, weight
    # decay 0.05 on matrices only. The demo trains a shared ITC-only warm-up with it, then ECLIP and the CLIP
    # baseline from that warm-up (init_from) for the same steps.
    "demo-recipe": dict(model="eclip-tiny", micro_batch=64, lr=1e-3, weight_decay=0.05, warmup_steps=100,
                        checkpoint_every=250, log_every=25, model_overrides=dict(patch_size=8, queue_size=128)),
    # The demo recipe at a larger scale on one GPU (docs/gpu-recipe.md; `eclip-demo --scale gpu`): eclip-small
    # (112 px, patch 8: the paper's 196 image tokens, 4.2M parameters) with the demo recipe's batch, learning
    # rate, warmup, weight decay and queue, the data preloaded to the device. fp32: `precision="bf16"` is FSDP2's
    # mixed precision, refused in one process, and at batch 64 the estimated host time per
    # step is about as large as the matrix products'. eclip-demo --scale gpu sets the steps.
    "h100-recipe": dict(model="eclip-small", micro_batch=64, lr=1e-3, weight_decay=0.05, warmup_steps=100,
                        checkpoint_every=1000, log_every=50, preload=True, model_overrides=dict(queue_size=128)),
    # The paper's ViT-B recipe: 200 per GPU x 32 A100s = 6400, bf16, 15 epochs, AdamW 1e-4 with warmup.
    # Layout: hybrid sharding, parameters sharded within a node of 8 GPUs and replicated across the 4 nodes:
    # 221M parameters in fp32 with AdamW need ~3.5 GB of state, 0.45 GB per GPU sharded 8 ways, so sharding
    # wider saves little memory while every all-gather would cross the slower inter-node network.
    # The queue holds 9 global batches (57600 = 9 x 6400) so that its length divides by the batch.
    "a100x32-vit-b16": dict(model="eclip-vit-b16", micro_batch=200, global_batch=6400, epochs=15.0, lr=1e-4,
                            warmup_steps=2000, precision="bf16", activation_checkpointing=True,
                            shard_group_size=8, checkpoint_every=1000, log_every=50,
                            model_overrides=dict(queue_size=57600)),
    # ViT-L: 128 per GPU x 32 = 4096; the queue holds 14 global batches (57344 = 14 x 4096).
    "a100x32-vit-l16": dict(model="eclip-vit-l16", micro_batch=128, global_batch=4096, epochs=15.0, lr=1e-4,
                            warmup_steps=2000, precision="bf16", activation_checkpointing=True,
                            shard_group_size=8, checkpoint_every=1000, log_every=50,
                            model_overrides=dict(queue_size=57344)),
}


def preset(name: str, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A preset with ``key=value`` overrides (values parsed as Python literals when they parse, e.g.
    ``lr=3e-4``, ``model_overrides={'queue_size':0}``, ``model_overrides.use_decoder=False``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown training preset {name!r}; available: {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    fields["model_overrides"] = dict(fields.get("model_overrides", {}))
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides or [])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in items:
        if key.startswith("model_overrides."):
            fields["model_overrides"][key.split(".", 1)[1]] = value
        elif key in known:
            fields[key] = value
        else:
            raise KeyError(f"unknown training option {key!r}; known: {sorted(known)} and model_overrides.<field>")
    return TrainConfig(**fields)


def _split(item: str):
    if "=" not in item:
        raise ValueError(f"overrides are key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value
