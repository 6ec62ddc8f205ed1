"""What the evaluation reads from a model: global embeddings, projected patch embeddings, instance features
and attention maps, computed once per image and reused by every task.

Two adapters give the same interface:

* :class:`ECLIPFeatures` for :class:`eclip.models.ECLIP` (and the CLIP baseline, the same class without a
  decoder). It runs the image encoder once per image and keeps the patch tokens, so that the instance decoder
  can decode one image with many prompts (cross-prompt retrieval: a few hundred queries x a few hundred
  gallery images) without re-encoding it. The T - 1 negative prompts of the decoder are ONE fixed draw from
  N(0, I) for the whole evaluation (seeded), so an instance feature is a deterministic function of
  (image, prompt); the draw equals the one :meth:`eclip.models.ECLIP.instance_features` makes for a
  one-image batch with ``generator=torch.Generator().manual_seed(seed)``. ``negative_prompts`` replaces the
  draw by a given (T - 1, D) set (:func:`negative_prompt_set`: other products' texts, or the mean prompt of
  the training texts), for the paper's Table 6 ablation.
* :class:`TransferAPIFeatures` for anything else with the transfer API (``encode_image``, ``encode_text``,
  ``instance_features``, ``grounding_map``; optionally ``encode_patches`` and ``scale``): test doubles,
  other models. It calls the model's methods on image tensors and token ids, so it is slower.

"Image state" and "text state" are whatever an adapter needs to decode an image with a prompt later: patch
tokens and the prompt vector for ECLIP, pixels and token ids for the transfer API. Both are tensors with one
row per image / text, so the tasks can index and repeat them.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch.nn import functional as F

DEFAULT_LOGIT_SCALE = 1 / 0.07  # CLIP's initial 1/tau, for models that do not expose theirs


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _is_eclip(model) -> bool:
    try:
        from eclip.models import ECLIP
    except ImportError:  # pragma: no cover - eclip.models needs timm and transformers
        return False
    return isinstance(model, ECLIP)


def adapter_for(model, *, seed: int = 0, device="cpu", negative_prompts: torch.Tensor | None = None):
    """The feature adapter of ``model``: :class:`ECLIPFeatures` for an ECLIP model, else
    :class:`TransferAPIFeatures` (which draws its own negatives: ``negative_prompts`` must be None)."""
    if _is_eclip(model):
        return ECLIPFeatures(model, seed=seed, device=device, negative_prompts=negative_prompts)
    if negative_prompts is not None:
        raise ValueError("negative_prompts needs an eclip.models.ECLIP model; a model with only the transfer API "
                         "draws its own negative prompts")
    return TransferAPIFeatures(model, seed=seed, device=device)


def upsample_grid(values: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """(B, grid * grid) patch values (row-major, as ViT tokens) -> (B, size, size) maps, bilinear (as
    :meth:`eclip.models.ECLIP.grounding_map` upsamples its attention)."""
    maps = values.reshape(-1, 1, grid, grid).float()
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


class ECLIPFeatures:
    """Features of an :class:`eclip.models.ECLIP` model (with or without its instance decoder).

    * global image / text embeddings: ``g_I(v_cls)``, ``g_T(w_cls)``, L2-normalized (the model's
      ``encode_image`` / ``encode_text``);
    * patch embeddings: ``g_I`` applied to every patch token of the image encoder's last layer (after its final
      norm), L2-normalized: the patches in the joint space, as zero-shot CLIP localisation uses them;
    * instance features and attention: the decoder's positive query (prompt = ``g_T(w_cls)`` of a text, scaled
      as in the model's transfer API), its output h_0^L and its last-block attention over the patches.
    """

    def __init__(self, model, *, seed: int = 0, device="cpu", negative_prompts: torch.Tensor | None = None):
        self.model, self.device = model, torch.device(device)
        cfg = model.config
        self.grid = cfg.image_size // cfg.patch_size
        self.num_tokens = self.grid * self.grid
        self.image_size = cfg.image_size
        self.has_decoder = model.towers.decoder is not None
        self.has_patches = True
        self.has_attention = self.has_decoder
        self.logit_scale = float(model.scale().detach().float().reshape(-1)[0])
        if negative_prompts is None:
            generator = torch.Generator().manual_seed(seed)
            self.noise = torch.randn((1, cfg.num_queries - 1, cfg.embed_dim), generator=generator)
        else:
            expected = (cfg.num_queries - 1, cfg.embed_dim)
            if tuple(negative_prompts.shape) != expected:
                raise ValueError(f"negative_prompts must have shape (T - 1, D) = {expected}, got "
                                 f"{tuple(negative_prompts.shape)}")
            if not torch.isfinite(negative_prompts).all():
                raise ValueError("negative_prompts must be finite")
            self.noise = negative_prompts.detach().float().cpu()[None]

    def images(self, pixels: torch.Tensor) -> dict:
        """(B, 3, S, S) -> global (B, D), patches (B, N, D), state (B, N, W): the patch tokens."""
        towers = self.model.towers
        tokens = towers.visual.forward_features(pixels.to(self.device))
        return {"global": F.normalize(towers.image_proj(tokens[:, 0]), dim=-1).float().cpu(),
                "patches": F.normalize(towers.image_proj(tokens[:, 1:]), dim=-1).float().cpu(),
                "state": tokens[:, 1:].float().cpu()}

    def texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Token ids -> embedding (B, D), state (B, D): the decoder's prompt vector."""
        raw = self.model.towers.encode_text(input_ids.to(self.device), attention_mask.to(self.device))
        return {"embedding": F.normalize(raw, dim=-1).float().cpu(), "state": self.model._prompt(raw).float().cpu()}

    def decode(self, image_state: torch.Tensor, text_state: torch.Tensor, return_attention: bool = False):
        """Instance features (B, D), L2-normalized, of image i decoded with prompt i, and the positive query's
        last-block attention (B, N) over the patches (weights that sum to 1), or None."""
        if not self.has_decoder:
            return None, None
        from eclip.models.decoder import InstanceDecoder

        batch = image_state.shape[0]
        prompts = torch.cat([text_state[:, None].to(self.device),
                             self.noise.to(self.device).expand(batch, -1, -1)], dim=1)
        types = torch.full(prompts.shape[:2], InstanceDecoder.TEXT, dtype=torch.long, device=self.device)
        out = self.model.towers.decode(image_state.to(self.device), prompts, types, return_attn=return_attention)
        features = F.normalize(out.hidden[:, 0], dim=-1).float().cpu()
        attention = out.attn[:, :, 0].float().cpu() if return_attention else None
        return features, attention

    def decoder_maps(self, image_state, text_state, attention=None) -> torch.Tensor:
        """(B, S, S) grounding maps: the positive query's attention upsampled to the image (as
        :meth:`eclip.models.ECLIP.grounding_map`)."""
        if attention is None:
            attention = self.decode(image_state, text_state, True)[1]
            if attention is None:
                return None
        return upsample_grid(attention, self.grid, self.image_size)


class TransferAPIFeatures:
    """Features of any model with the transfer API, through its public methods.

    Optional: ``encode_patches(images) -> (B, N, D)`` patch embeddings in the joint space (without it the
    CLIP + text and patch-map methods are left out), ``scale()`` the logit scale (else 1/0.07). A model whose
    ``instance_features`` / ``grounding_map`` raise ``RuntimeError`` mentioning the decoder has none.
    """

    def __init__(self, model, *, seed: int = 0, device="cpu"):
        self.model, self.device, self.seed = model, torch.device(device), seed
        self.has_decoder = True
        self.has_patches = hasattr(model, "encode_patches")
        self.has_attention = False
        self.image_size = None
        self.grid = self.num_tokens = None
        scale = getattr(model, "scale", None)
        self.logit_scale = float(torch.as_tensor(scale()).reshape(-1)[0]) if callable(scale) else DEFAULT_LOGIT_SCALE

    def _generator_kwargs(self, fn) -> dict:
        return {"generator": torch.Generator().manual_seed(self.seed)} if _accepts(fn, "generator") else {}

    def images(self, pixels: torch.Tensor) -> dict:
        self.image_size = pixels.shape[-1]
        pixels = pixels.to(self.device)
        out = {"global": self.model.encode_image(pixels).float().cpu(), "state": pixels.cpu()}
        if self.has_patches:
            patches = F.normalize(self.model.encode_patches(pixels).float(), dim=-1).cpu()
            self.num_tokens = patches.shape[1]
            self.grid = math.isqrt(self.num_tokens)
            out["patches"] = patches
        return out

    def texts(self, input_ids, attention_mask) -> dict:
        emb = self.model.encode_text(input_ids.to(self.device), attention_mask.to(self.device)).float().cpu()
        return {"embedding": emb, "state": torch.stack([input_ids.cpu(), attention_mask.cpu().long()], dim=1)}

    def decode(self, image_state, text_state, return_attention: bool = False):
        if not self.has_decoder:
            return None, None
        fn = self.model.instance_features
        try:
            features = fn(image_state.to(self.device), input_ids=text_state[:, 0].to(self.device),
                          attention_mask=text_state[:, 1].to(self.device), **self._generator_kwargs(fn))
        except RuntimeError as exc:
            if "decoder" not in str(exc):
                raise
            self.has_decoder = False
            return None, None
        return F.normalize(features.float(), dim=-1).cpu(), None

    def decoder_maps(self, image_state, text_state, attention=None):
        fn = self.model.grounding_map
        try:
            maps = fn(image_state.to(self.device), text_state[:, 0].to(self.device), text_state[:, 1].to(self.device),
                      **self._generator_kwargs(fn))
        except RuntimeError as exc:
            if "decoder" not in str(exc):
                raise
            self.has_decoder = False
            return None
        return maps.float().cpu()


NEGATIVE_SETS = ("noise", "texts", "mean")


def negative_prompt_set(kind: str, model, tokenizer, texts, *, seed: int = 0, batch_size: int = 64,
                        device="cpu") -> torch.Tensor | None:
    """The T - 1 negative prompts of the decoder at evaluation (the paper's Table 6 ablation), (T - 1, D) in
    the decoder's prompt space (:meth:`eclip.models.ECLIP._prompt` of a g_T embedding), or None for the
    default.

    * ``"noise"``: None, i.e. the default draw from N(0, I) (paper section 3.4);
    * ``"texts"``: the texts of T - 1 products drawn at random (``seed``) from ``texts``, encoded by the text
      encoder (the paper's "description text from other products"); pass texts of products that are not
      evaluated (the training split), so that no query's own text is among its negatives;
    * ``"mean"``: the mean prompt of all of ``texts``, repeated T - 1 times: a fixed set, the analogue at the
      end of training of the paper's "exponential moving average of queries on the whole dataset".
    """
    if kind not in NEGATIVE_SETS:
        raise ValueError(f"negative prompt set must be one of {NEGATIVE_SETS}, got {kind!r}")
    if kind == "noise":
        return None
    if not _is_eclip(model):
        raise ValueError("negative prompt sets other than 'noise' need an eclip.models.ECLIP model")
    slots = model.config.num_queries - 1
    texts = list(texts)
    if kind == "texts":
        if len(texts) < slots:
            raise ValueError(f"'texts' negatives need at least T - 1 = {slots} texts, got {len(texts)}")
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:slots]
        texts = [texts[i] for i in order.tolist()]
    elif not texts:
        raise ValueError("'mean' negatives need at least one text")
    was_training = model.training
    model.eval()
    prompts = []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                ids, mask = tokenizer(texts[start:start + batch_size])
                raw = model.towers.encode_text(ids.to(device), mask.to(device))
                prompts.append(model._prompt(raw).float().cpu())
    finally:
        model.train(was_training)
    prompts = torch.cat(prompts)
    return prompts if kind == "texts" else prompts.mean(dim=0, keepdim=True).expand(slots, -1).clone()
