"""The ECLIP trainer: torch.distributed (torchrun) + FSDP2, distributed checkpoints, resumable.

    python -m eclip.train --preset demo --data data/synthetic                   # one process
    torchrun --nproc_per_node 2 -m eclip.train --preset demo --data data/synthetic   # FSDP2 over 2 ranks (gloo)

Layout under ``--out``: ``metrics.jsonl`` (one line per logged step: each loss, lr, logit scale, samples/s,
memory), ``checkpoints/step-XXXXXXX`` (torch.distributed.checkpoint, written to a temporary folder and
renamed when complete; ``checkpoints/latest`` names the last complete one, and resumption takes the newest
complete folder whatever was killed when), ``config.json``, ``data_report.json`` (the data skipped or handled,
summed over ranks).

Faults: a rank whose batch lost samples (unreadable images) weights its loss by its share of the step's
samples, so the step's loss and gradients are those of one process on the samples that were read; a
micro-batch in which some rank read nothing is left out on every rank (counted). A NaN or infinite loss term
or gradient norm stops the run before the optimizer step with :class:`NonFiniteLossError`, naming the step,
the term and the rank.

Determinism: every random draw of step s on rank r comes from a generator seeded with (seed, s, r), and
the data order of epoch e from (seed, e): a run resumed from a checkpoint continues exactly as the
uninterrupted run would (same world size, ``workers=0``). A checkpoint saved on W ranks loads on any number
of ranks (the data order then changes with the sampler's split).

Preloaded data (``preload=True``, :mod:`eclip.data.preload`): every training image is decoded once onto the
device and each micro-batch is made there, in the sampler's order; the image pairs, crops and flips of an
epoch are drawn per product from (seed, epoch), so they are the same on every rank and after a resumption.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings

import torch
import torch.distributed as dist

import eclip.models as em
from eclip.data.dataset import Collate, ProductDataset
from eclip.data.manifest import read_manifest, split

from .config import TrainConfig


def _dist_env():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def manifest_path(data: str) -> str:
    path = os.path.join(data, "catalogue.jsonl") if os.path.isdir(data) else data
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no catalogue at {data!r} (expected a manifest or a folder with catalogue.jsonl)")
    return path


def check_batch(cfg: TrainConfig, world: int) -> int:
    """The global batch, after checking it against the preset."""
    global_batch = cfg.micro_batch * cfg.grad_accum * world
    if cfg.global_batch is not None and cfg.global_batch != global_batch:
        raise ValueError(
            f"global batch {cfg.global_batch} != micro_batch {cfg.micro_batch} x grad_accum {cfg.grad_accum} x "
            f"world size {world} = {global_batch}; set micro_batch or grad_accum so that they multiply to it")
    return global_batch


def shard_model(model: em.ECLIP, cfg: TrainConfig, world: int):
    """FSDP2: each ViT block, each BERT layer and the instance decoder (of the model and of its momentum copy),
    then the root. bf16 parameters with fp32 gradient reduction when ``precision="bf16"``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.shard_group_size and cfg.shard_group_size < world:
        if world % cfg.shard_group_size:
            raise ValueError(f"world size {world} is not a multiple of shard_group_size {cfg.shard_group_size}")
        mesh = init_device_mesh(device_type, (world // cfg.shard_group_size, cfg.shard_group_size),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (world,))
    kwargs = {"mesh": mesh}
    if cfg.precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for towers in (model.towers, model.momentum_towers):
        if towers is None:
            continue
        blocks = list(towers.visual.blocks) + list(towers.text.encoder.layer)
        if towers.decoder is not None:
            # the decoder as one unit, not per block: its forward projects Z for all blocks in one matrix
            # product (InstanceSlotAttention.project_kv), which needs every block's W_z and W_v unsharded
            # at once; it is small (about 25M parameters in eclip-vit-b16)
            blocks.append(towers.decoder)
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # the root, with the same policy
    return model


def _apply_activation_checkpointing(model: em.ECLIP) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    blocks = {id(b) for b in list(model.towers.visual.blocks) + list(model.towers.text.encoder.layer)}
    apply_activation_checkpointing(model.towers, check_fn=lambda m: id(m) in blocks)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))

    return factor


class _Checkpoints:
    """``checkpoints/step-XXXXXXX`` folders and the ``latest`` pointer, safe against a kill at any moment.

    A checkpoint is written into ``step-XXXXXXX.tmp`` and renamed when torch.distributed.checkpoint has
    finished it (its ``.metadata`` file is written last); then ``latest`` is replaced atomically. Old ones are
    renamed to ``*.old`` before they are deleted, so a half-deleted folder never looks like a checkpoint.
    :meth:`latest` is the newest complete folder (``latest`` names it too, for people and tools), so a run
    killed at any point of a save resumes from the last checkpoint that was fully written."""

    PATTERN = re.compile(r"^step-(\d+)$")

    def __init__(self, root: str, rank: int, keep: int):
        self.root, self.rank, self.keep = os.path.join(root, "checkpoints"), rank, keep

    @staticmethod
    def complete(path: str) -> bool:
        return os.path.isfile(os.path.join(path, ".metadata"))

    def _finished(self) -> list[str]:
        """Complete checkpoint folders, oldest first."""
        if not os.path.isdir(self.root):
            return []
        steps = [(int(m.group(1)), name) for name in os.listdir(self.root) if (m := self.PATTERN.match(name))]
        return [name for _, name in sorted(steps) if self.complete(os.path.join(self.root, name))]

    def latest(self) -> str | None:
        """The newest complete checkpoint (``*.tmp`` and ``*.old`` folders, and any without ``.metadata``, are
        passed over), or None."""
        finished = self._finished()
        return os.path.join(self.root, finished[-1]) if finished else None

    def save(self, state: dict, step: int) -> str:
        import torch.distributed.checkpoint as dcp

        name = f"step-{step:07d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for leftover in os.listdir(self.root):  # of a run killed while writing or deleting
                if leftover.endswith((".tmp", ".old")):
                    shutil.rmtree(os.path.join(self.root, leftover), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=tmp)
        _barrier()
        if self.rank == 0:  # a kill before the rename leaves the previous checkpoint as the latest
            if not self.complete(tmp):
                raise RuntimeError(f"torch.distributed.checkpoint returned without writing {tmp}/.metadata")
            if os.path.exists(final):  # the same step saved again (a resumed run): move the old one aside
                os.rename(final, final + ".old")
            os.rename(tmp, final)
            _fsync_dir(self.root)
            with open(os.path.join(self.root, "latest.tmp"), "w") as f:
                f.write(name)
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(self.root, "latest.tmp"), os.path.join(self.root, "latest"))
            _fsync_dir(self.root)
            for old in self._finished()[:-self.keep]:
                os.rename(os.path.join(self.root, old), os.path.join(self.root, old + ".old"))
            for leftover in os.listdir(self.root):
                if leftover.endswith(".old"):
                    shutil.rmtree(os.path.join(self.root, leftover), ignore_errors=True)
        _barrier()
        return final


def _fsync_dir(path: str) -> None:
    """Make the renames in a folder durable (a kill needs none; a crash of the machine does)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns that it assumes one process when no process group exists: that
    is the intent here (single-process runs and evaluation)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradient norm of a training step is NaN or infinite (raised on every rank, before
    the optimizer step, so the weights stay those of the previous step)."""


def _rows_per_rank(sizes: list[int], world: int, device: torch.device) -> list[list[int]]:
    """[rank][micro-batch] sample counts of the step: one all_gather of the grad_accum counts."""
    if world == 1:
        return [list(sizes)]
    mine = torch.tensor(sizes, dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.stack(parts).tolist()


def _step_values(totals: dict, grad_norm: torch.Tensor, world: int) -> tuple[list[str], list[list[float]]]:
    """Names (the loss terms, sorted, then "grad_norm") and their values on every rank, [rank][name]: each
    loss term already weighted by the rank's share of the step's samples (they add up over ranks)."""
    names = sorted(totals) + ["grad_norm"]
    mine = torch.stack([totals[k].double().reshape(()) for k in names[:-1]] + [grad_norm.double().reshape(())])
    if world == 1:
        return names, [mine.tolist()]
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return names, torch.stack(parts).tolist()


def _stop_if_not_finite(names: list[str], values: list[list[float]], step: int,
                        checkpoints: _Checkpoints) -> None:
    """Raise :class:`NonFiniteLossError` on every rank when any rank has a NaN or infinite loss term or
    gradient norm, naming the step, the terms and the ranks."""
    bad = [(name, rank, value) for rank, row in enumerate(values) for name, value in zip(names, row)
           if not math.isfinite(value)]
    if not bad:
        return
    terms = [b for b in bad if b[0] not in ("loss", "grad_norm")] or [b for b in bad if b[0] == "loss"] or bad
    found = ", ".join(f"{name} = {value} on rank {rank}" for name, rank, value in terms)
    what = "gradient norm" if terms[0][0] == "grad_norm" else "loss"
    latest = checkpoints.latest() or "none"
    raise NonFiniteLossError(
        f"non-finite {what} at step {step}: {found}. The step was stopped before the optimizer update, so the "
        f"weights are those after step {step - 1}; the last complete checkpoint is {latest}. Look at this "
        f"step's data, lower the learning rate or raise the precision, then resume with --resume.")


def _sum_over_ranks(counts: collections.Counter, world: int) -> dict[str, int]:
    """The skipped-data counts added up over ranks (once, at the end of a run)."""
    if world == 1:
        return dict(+counts)
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(counts))
    total = collections.Counter()
    for part in gathered:
        total.update(part)
    return dict(+total)


def _step_seed(cfg: TrainConfig, step: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + step * 7919 + rank) % (2**63)


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True) -> list[dict]:
    """Train; returns the logged metrics (rank 0; other ranks get an empty list).

    ``resume`` continues from the latest checkpoint under ``cfg.out``; without it, an ``out`` that already
    holds checkpoints is an error (so that a run is never overwritten or resumed by accident).

    ``stop_after`` ends the run after that many steps of this invocation without a final checkpoint, as if
    the process were killed (for tests of resumption).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank, world = _dist_env()
    global_batch = check_batch(cfg, world)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {cfg.precision!r}")
    if cfg.precision == "bf16" and world == 1:  # said, not silently trained in fp32
        raise ValueError("precision='bf16' is FSDP2's mixed precision (bf16 parameters, fp32 gradient reduction), "
                         "which applies across ranks; one process trains in fp32: set precision=fp32, or launch "
                         "with torchrun on several ranks")
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if cfg.data is None:
        raise ValueError("no data: pass --data (a catalogue folder or manifest); `eclip-data synth` makes one")
    products = read_manifest(manifest_path(cfg.data))
    index = {p.product_id: i for i, p in enumerate(products)}
    train_products, _ = split(products, cfg.heldout_fraction)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = em.create(cfg.model, **cfg.model_overrides).to(device)
    tokenizer = em.tokenizer_for(model)
    if cfg.init_from is not None:
        start_from(model, cfg.init_from, announce=rank == 0)
    if cfg.preload:
        dataset = _preload(cfg, train_products, model.config.image_size, tokenizer, device, index, rank)
    else:
        dataset = ProductDataset(train_products, model.config.image_size, train=True, seed=cfg.seed,
                                 product_index=index, crop=cfg.crop)
    per_epoch = len(dataset) // (cfg.micro_batch * world) // cfg.grad_accum
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} training products are fewer than one global batch of {global_batch}")
    total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * per_epoch)))

    if cfg.activation_checkpointing:
        _apply_activation_checkpointing(model)
    if world > 1:
        shard_model(model, cfg, world)
    if cfg.compile:
        model.towers.visual.compile()
        model.towers.text.compile()
    group = dist.group.WORLD if world > 1 else None
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.98), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    checkpoints = _Checkpoints(cfg.out, rank, cfg.keep_checkpoints)
    start_step = 0
    latest = checkpoints.latest()
    if latest is not None and not resume:
        raise FileExistsError(f"{cfg.out} already holds checkpoints ({latest}); pass --resume to continue that run "
                              "or choose another --out")
    if latest is not None:
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "progress": {"step": 0}, "scheduler": scheduler.state_dict()}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=latest)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["progress"]["step"])
        if rank == 0:
            print(f"resumed from {latest} at step {start_step}")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    collate = Collate(tokenizer)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                              shuffle=True, seed=cfg.seed, drop_last=True)

    def batches_from(step: int):
        epoch, offset = divmod(step, per_epoch)
        if cfg.preload:
            yield from _preloaded_batches(dataset, sampler, cfg, per_epoch, epoch, offset)
            return
        while True:
            sampler.set_epoch(epoch)
            # a new draw of each product's image pair and crops every epoch (drawn from (seed, epoch, product)),
            # and exactly per_epoch x grad_accum micro-batches per epoch, so that a step's data depends only on
            # (seed, step, rank) and a resumed run sees what the uninterrupted one saw
            dataset.epoch = epoch
            indices = list(sampler)[offset * cfg.grad_accum * cfg.micro_batch:per_epoch * cfg.grad_accum * cfg.micro_batch]
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, indices), batch_size=cfg.micro_batch, num_workers=cfg.workers,
                collate_fn=collate, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            yield from loader
            epoch, offset = epoch + 1, 0

    skipped: collections.Counter = collections.Counter()
    if cfg.preload and rank == 0:  # counted once: every rank loads the same products
        skipped.update({f"preload_{k}": v for k, v in dataset.report.items()})
    history: list[dict] = []
    log_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    board = None
    if cfg.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from exc
        board = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
    bar = None
    if rank == 0 and progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"train {cfg.model}", dynamic_ncols=True)
    stream = batches_from(start_step)
    model.train()
    tick, ran, samples = time.perf_counter(), 0, 0
    for step in range(start_step, total_steps):
        if stop_after is not None and ran >= stop_after:
            break
        torch.manual_seed(_step_seed(cfg, step, rank))
        done = step + 1
        micro_batches = [next(stream) for _ in range(cfg.grad_accum)]
        for batch in micro_batches:
            skipped.update(batch.pop("skipped"))
        # Unreadable images shrink a rank's batch: every rank weights its loss by its share of the step's
        # samples (x world, for FSDP's mean over ranks), which gives the single-process loss and gradients of
        # the samples that were read. A micro-batch in which some rank read no sample is left out on every rank.
        rows = _rows_per_rank([batch["size"] for batch in micro_batches], world, device)
        usable = [m for m in range(cfg.grad_accum) if all(r[m] > 0 for r in rows)]
        step_rows = sum(r[m] for r in rows for m in usable)
        for m in sorted(set(range(cfg.grad_accum)) - set(usable)):
            skipped["micro_batch_with_an_empty_rank"] += int(rank == 0)  # once; the samples: per rank
            skipped["samples_left_with_it"] += rows[rank][m]
        totals: dict[str, torch.Tensor] = {}
        for m in usable:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in micro_batches[m].items()}
            if world > 1:
                model.set_requires_gradient_sync(m == usable[-1])
            losses = model(batch, group=group)
            (losses["loss"] * (world * rows[rank][m] / step_rows)).backward()
            for k, v in losses.items():  # kept on the device; their sum over ranks is the step's loss
                totals[k] = totals.get(k, 0.0) + v.detach() * (rows[rank][m] / step_rows)
        if usable:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip)
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # every rank's losses and the gradient norm, checked before the update (one small gather per step)
            names, values = _step_values(totals, norm, world)
            _stop_if_not_finite(names, values, done, checkpoints)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_momentum()
        else:  # no sample to learn from: no update, and nothing to log; the schedule moves on
            skipped["step_without_samples"] += int(rank == 0)
        scheduler.step()
        ran += 1
        samples += step_rows
        if bar is not None:
            bar.update(1)
        log_now = bool(usable) and (done % cfg.log_every == 0 or done == total_steps)
        if log_now:  # on every rank: reading sharded values is a collective
            totals = {k: sum(per_rank[i] for per_rank in values) for i, k in enumerate(names[:-1])}
            scale = model.scale().detach()
            scale = float(scale.full_tensor() if hasattr(scale, "full_tensor") else scale)
            norm = values[0][-1]
        if bar is not None and log_now:
            bar.set_postfix(loss=f"{totals['loss']:.3f}")
        if rank == 0 and log_now:
            elapsed = time.perf_counter() - tick
            record = {"step": done, **totals, "lr": scheduler.get_last_lr()[0], "logit_scale": scale,
                      "grad_norm": norm,
                      "samples_per_s": samples / elapsed if done % cfg.log_every == 0 else None,
                      "max_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None)}
            history.append(record)
            if board is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        board.add_scalar(key, value, done)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if log_now:
            tick, samples = time.perf_counter(), 0
        if done % cfg.checkpoint_every == 0 or done == total_steps:
            model_state, optim_state = get_state_dict(model, optimizer)
            checkpoints.save({"model": model_state, "optim": optim_state, "progress": {"step": done},
                              "scheduler": scheduler.state_dict()}, done)
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    report = _sum_over_ranks(skipped, world)
    if log_file is not None:
        log_file.close()
        with open(os.path.join(cfg.out, "data_report.json"), "w") as f:
            json.dump({"skipped_or_handled": report, "steps_run": ran}, f, indent=1)
        if report:
            print(f"data skipped or handled during training (all ranks): {report}")
    _barrier()  # the ranks leave together: none tears its process group down while another still uses it
    return history


def _preload(cfg: TrainConfig, products, image_size: int, tokenizer, device: torch.device, index: dict, rank: int):
    """The training products decoded once onto the device (``TrainConfig.preload``), announced in one line."""
    from eclip.data.preload import PreloadedProducts

    if cfg.crop != "random_resized":
        raise ValueError(f"preload=True makes the paper's random resized crop on the device; crop={cfg.crop!r} is "
                         "only made by the PIL path: set preload=False to use it")
    data = PreloadedProducts(products, image_size, tokenizer=tokenizer, device=device, seed=cfg.seed,
                             product_index=index, threads=cfg.workers or None)
    if rank == 0:
        print(data.describe())
    return data


def _preloaded_batches(data, sampler, cfg: TrainConfig, per_epoch: int, epoch: int, offset: int):
    """Micro-batches of preloaded data from step ``offset`` of ``epoch`` on: the products in the sampler's
    order (each rank its own slice, as the DataLoader path), exactly ``per_epoch x grad_accum`` micro-batches
    per epoch, so that a step's data depends only on (seed, step, rank) and resumption is exact."""
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        plan = data.epoch_plan(epoch)
        for m in range(offset * cfg.grad_accum, per_epoch * cfg.grad_accum):
            yield data.batch(order[m * cfg.micro_batch:(m + 1) * cfg.micro_batch], plan)
        epoch, offset = epoch + 1, 0


def full_state_dict(model) -> dict:
    """The full (unsharded) model state on the CPU, on every rank, for evaluation or export."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))



def parameter_groups(model: em.ECLIP, cfg: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: with ``cfg.decay_all`` one group; otherwise matrices (weights of
    linear, attention and patch-embedding layers, token embeddings) decay and the rest does not: norms, biases,
    position / type / query embeddings and the logit scale, which weight decay would only pull towards 0."""
    params = [(name, p) for name, p in model.named_parameters() if not name.startswith("momentum_towers.")]
    if cfg.decay_all:
        return [{"params": [p for _, p in params]}]

    def decays(name: str, p: torch.Tensor) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() < 2 or leaf in ("pos_embed", "cls_token", "logit_scale") or "position_embeddings" in name \
                or "token_type_embeddings" in name or "type_embed" in name:
            return False
        return True

    return [{"params": [p for n, p in params if decays(n, p)]},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]


def start_from(model: em.ECLIP, source: str, *, announce: bool = True) -> dict[str, list[str]]:
    """Copy into ``model`` the weights of the run under ``source`` (its latest checkpoint; see
    ``TrainConfig.init_from``). Parameters of the same name and shape are copied; the momentum copy of the
    towers, when ``model`` has one and the source has none, starts equal to the loaded towers; the rest keeps
    its initialization. Returns {"loaded": [...], "kept": [...]} (names), printed when ``announce``."""
    config_file = os.path.join(source, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"init_from={source!r}: no config.json there (the --out folder of a finished run)")
    with open(config_file) as f:
        fields = {k: v for k, v in json.load(f).items() if k in {x.name for x in dataclasses.fields(TrainConfig)}}
    source_state = load_trained(TrainConfig(**fields)).state_dict()
    target = model.state_dict()
    loaded, kept = [], []
    with torch.no_grad():
        for name, tensor in target.items():
            origin = name
            if origin not in source_state and name.startswith("momentum_towers."):
                origin = name[len("momentum_"):]
            if origin in source_state and source_state[origin].shape == tensor.shape:
                tensor.copy_(source_state[origin])
                loaded.append(name)
            else:
                kept.append(name)
    if not loaded:
        raise ValueError(f"init_from={source!r}: no parameter of that run matches this model")
    if announce:
        print(f"started from {source}: {len(loaded)} tensors loaded, {len(kept)} kept their initialization"
              + (f" ({', '.join(sorted({k.split('.')[0] for k in kept}))})" if kept else ""))
    return {"loaded": loaded, "kept": kept}


def load_trained(cfg: TrainConfig) -> em.ECLIP:
    """A plain (unsharded) model with the weights of the latest checkpoint under ``cfg.out`` (saved on any
    number of ranks), for evaluation in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    latest = _Checkpoints(cfg.out, 0, cfg.keep_checkpoints).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {cfg.out}")
    model = em.create(cfg.model, **cfg.model_overrides)
    state = {"model": get_model_state_dict(model)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=latest)
    set_model_state_dict(model, state["model"])
    return model.eval()
