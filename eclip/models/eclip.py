"""The ECLIP model (paper section 3): encoders, instance decoder, momentum model, losses, transfer API."""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import eclip_kernels as ek

from .config import ECLIPConfig
from .decoder import InstanceDecoder

BATCH_KEYS = ("images", "positive_images", "input_ids", "attention_mask", "product_ids")


def _vision_transformer(cfg: ECLIPConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    # built from its config: no weights are downloaded; timm uses F.scaled_dot_product_attention
    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width,
                             depth=cfg.vision_depth, num_heads=cfg.vision_heads, num_classes=0,
                             global_pool="token")


def _bert(cfg: ECLIPConfig) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_depth,
                        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_mlp,
                        max_position_embeddings=max(cfg.max_text_len, 512 if cfg.text_width >= 768 else 64),
                        hidden_dropout_prob=cfg.text_dropout, attention_probs_dropout_prob=cfg.text_dropout,
                        attn_implementation="sdpa")
    return BertModel(config, add_pooling_layer=False)


class Towers(nn.Module):
    """The parts the momentum model copies: image and text encoders, projections g_I, g_T, the token
    projection to Z, and the instance decoder (when enabled)."""

    def __init__(self, cfg: ECLIPConfig):
        super().__init__()
        self.visual = _vision_transformer(cfg)
        self.text = _bert(cfg)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)  # g_I
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)  # g_T
        self.decoder = None
        if cfg.use_decoder:
            self.token_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)  # visual tokens -> Z
            self.decoder = InstanceDecoder(cfg.embed_dim, cfg.decoder_depth, cfg.num_queries, cfg.decoder_heads,
                                           cfg.decoder_mlp, backend=cfg.backend)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_I(v_cls) (B, D), visual tokens (B, N, W)), both unnormalized."""
        tokens = self.visual.forward_features(images)
        return self.image_proj(tokens[:, 0]), tokens[:, 1:]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """g_T(w_cls) (B, D), unnormalized."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(hidden[:, 0])

    def decode(self, tokens, prompts, prompt_types, return_attn=False):
        return self.decoder(self.token_proj(tokens), prompts, prompt_types, return_attn=return_attn)


def _gumbel(shape, device, generator=None) -> torch.Tensor:
    uniform = torch.rand(shape, device=device, generator=generator).clamp_(1e-20, 1.0)
    return -torch.log(-torch.log(uniform))


class ECLIP(nn.Module):
    """ECLIP: image and text encoders, projections, instance decoder and the five pretraining losses.

    ``forward(batch)`` computes the pretraining losses; ``encode_image``, ``encode_text``,
    ``instance_features`` and ``grounding_map`` are the transfer API. Build one with
    :func:`eclip.models.create`.
    """

    def __init__(self, config: ECLIPConfig):
        super().__init__()
        self.config = config
        self.towers = Towers(config)
        # shape [1], not a 0-d tensor: FSDP2 shards parameters along dim 0
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(config.init_logit_scale)))
        self.itm_head = nn.Linear(config.embed_dim, 2) if config.use_decoder else None
        self.momentum_towers = None
        self.queue = None
        if config.use_decoder:
            self.momentum_towers = copy.deepcopy(self.towers).requires_grad_(False)
            if config.queue_size > 0:
                self.queue = ek.MomentumQueue(config.queue_size, config.embed_dim)

    # --- parameters -----------------------------------------------------------------------------------

    def trainable_parameters(self):
        """Everything but the momentum copy (which has no gradients)."""
        return [p for name, p in self.named_parameters() if not name.startswith("momentum_towers.")]

    @torch.no_grad()
    def update_momentum(self) -> None:
        """EMA step of the momentum model, ``xi <- m xi + (1 - m) theta``: call after each optimizer step."""
        if self.momentum_towers is None:
            return
        online = list(self.towers.parameters())
        momentum = list(self.momentum_towers.parameters())
        torch._foreach_mul_(momentum, self.config.momentum)
        torch._foreach_add_(momentum, online, alpha=1 - self.config.momentum)

    def scale(self) -> torch.Tensor:
        """The logit scale 1/tau (shape [1]), clamped at config.max_logit_scale."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def load_pretrained_encoders(self, vision: str | None = None, text: str | None = None) -> None:
        """Load encoder weights from local files (nothing is downloaded), into the model and its momentum copy.

        Args:
            vision: a file with a timm VisionTransformer state_dict of the same architecture (``.pt``/``.pth``
                via torch.load, or ``.safetensors``); the classifier head, if present, is ignored.
            text: a local Hugging Face BERT folder (``config.json`` and weights) of the same architecture.
        """
        if vision is not None:
            if vision.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(vision)
            else:
                state = torch.load(vision, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            self.towers.visual.load_state_dict(state, strict=True)
        if text is not None:
            from transformers import BertModel

            bert = BertModel.from_pretrained(text, local_files_only=True, add_pooling_layer=False)
            self.towers.text.load_state_dict(bert.state_dict(), strict=True)
        if self.momentum_towers is not None:
            self.momentum_towers.load_state_dict(self.towers.state_dict())

    # --- pretraining ----------------------------------------------------------------------------------

    def _check_batch(self, batch: dict):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; a pretraining batch has {list(BATCH_KEYS)}")
        images, positive_images, input_ids, attention_mask, product_ids = (batch[k] for k in BATCH_KEYS)
        size = images.shape[0]
        for key in BATCH_KEYS[1:]:
            if batch[key].shape[0] != size:
                raise ValueError(f"batch sizes differ: images has {size} samples, {key} has {batch[key].shape[0]}")
        if images.dim() != 4 or images.shape[1:] != positive_images.shape[1:]:
            raise ValueError(f"images and positive_images must be (B, 3, H, W) of one size, got "
                             f"{tuple(images.shape)} and {tuple(positive_images.shape)}")
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids and attention_mask must both be (B, L), got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        return images, positive_images, input_ids, attention_mask, product_ids

    def _sample_prompts(self, product_ids: torch.Tensor):
        """On the device: the positive's slot r_b, and for every slot the source sample and prompt type.

        The positive prompt is sample b's own text or image (a coin flip) at a random slot r_b; the T - 1
        negatives come from other products of the batch (distinct when the batch has enough, by Gumbel top-k),
        each a text or an image prompt (a coin flip)."""
        batch, slots, device = product_ids.shape[0], self.config.num_queries, product_ids.device
        same = product_ids[:, None] == product_ids[None, :]
        penalty = same.float() * -1e4  # other products first; same-product samples only if nothing else
        penalty.fill_diagonal_(-1e9)
        if batch - 1 >= slots - 1:
            negatives = (penalty + _gumbel((batch, batch), device)).topk(slots - 1, dim=1).indices
        else:  # too few samples: draw with replacement
            negatives = torch.multinomial(torch.softmax(penalty.clamp(min=-1e4), dim=1), slots - 1, replacement=True)
        pos_index = torch.randint(0, slots, (batch,), device=device)
        order = torch.rand(batch, slots, device=device).argsort(dim=1)  # random slot order of the negatives
        sources = torch.empty(batch, slots, dtype=torch.long, device=device)
        is_positive = F.one_hot(pos_index, slots).bool()
        sources[is_positive] = torch.arange(batch, device=device)
        negative_slots = order[~is_positive.gather(1, order)].view(batch, slots - 1)
        sources.scatter_(1, negative_slots, negatives)
        types = torch.randint(0, 2, (batch, slots), device=device)
        return pos_index, sources, types

    def _prompt(self, embedding: torch.Tensor) -> torch.Tensor:
        """A prompt from a g_I / g_T embedding: L2-normalized and scaled to sqrt(D), the typical norm of the
        N(0, I) negative prompts used at transfer (paper section 3.4), so that both are on one scale."""
        return F.normalize(embedding, dim=-1) * math.sqrt(self.config.embed_dim)

    def _prompts(self, text_emb, image_emb, sources, types):
        if self.config.detach_prompts:
            text_emb, image_emb = text_emb.detach(), image_emb.detach()
        text_prompt, image_prompt = self._prompt(text_emb), self._prompt(image_emb)
        return torch.where((types == InstanceDecoder.TEXT)[..., None], text_prompt[sources], image_prompt[sources])

    def _itm_loss(self, hidden, text_raw, image_emb, text_emb, product_ids):
        """Instance-text matching: positives (h_i, t_i); per image a hard-negative text and per text a
        hard-negative image, drawn in proportion to softmax similarity among other products (Gumbel-max on
        the device)."""
        batch = hidden.shape[0]
        with torch.no_grad():
            sim = self.scale() * image_emb @ text_emb.T
            other = product_ids[:, None] != product_ids[None, :]
            masked = sim.masked_fill(~other, -1e4)
            neg_text = (masked + _gumbel(sim.shape, sim.device)).argmax(dim=1)
            neg_image = (masked.T + _gumbel(sim.shape, sim.device)).argmax(dim=1)
        pairs = torch.cat([hidden * text_raw, hidden * text_raw[neg_text], hidden[neg_image] * text_raw])
        labels = torch.zeros(3 * batch, dtype=torch.long, device=hidden.device)
        labels[:batch] = 1
        return F.cross_entropy(self.itm_head(pairs), labels)

    def forward(self, batch: dict, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Pretraining losses of one batch.

        Args:
            batch: ``images`` (B, 3, H, W); ``positive_images`` (B, 3, H, W), another image of the same
                products (another source); ``input_ids``, ``attention_mask`` (B, L); ``product_ids`` (B,) int64.
            group: process group of the global batch (contrastive negatives and the queue), or None.

        Returns:
            ``{"itc", "inter", "itm", "intra", "entropy", "loss"}`` (``loss`` = weighted sum); with the decoder
            switched off (plain CLIP baseline), ``{"itc", "loss"}``.
        """
        images, positive_images, input_ids, attention_mask, product_ids = self._check_batch(batch)
        cfg, towers = self.config, self.towers
        image_raw, tokens = towers.encode_image(images)
        text_raw = towers.encode_text(input_ids, attention_mask)
        image_emb, text_emb = F.normalize(image_raw, dim=-1), F.normalize(text_raw, dim=-1)
        scale = self.scale()
        losses = {"itc": ek.clip_loss(image_emb, text_emb, scale, ids=product_ids, group=group, backend=cfg.backend)}
        if not cfg.use_decoder:
            losses["loss"] = cfg.loss_weights.get("itc", 1.0) * losses["itc"]
            return losses

        pos_index, sources, types = self._sample_prompts(product_ids)
        out = towers.decode(tokens, self._prompts(text_raw, image_raw, sources, types), types)
        rows = torch.arange(images.shape[0], device=images.device)
        hidden = out.hidden[rows, pos_index]

        # intra-product (Eq. 9): the positive query is the closest of the T to the product's text
        intra_logits = scale * F.normalize(out.hidden, dim=-1) @ text_emb[:, :, None]
        losses["intra"] = F.cross_entropy(intra_logits.squeeze(-1), pos_index)
        # entropy regularizer (Eq. 10) over the last block's attention
        if cfg.entropy_form == "paper":
            losses["entropy"] = ek.entropy_regularizer(out.entropy, pos_index, num_tokens=tokens.shape[1])
        else:  # the positive query's entropy only: the negatives are not pushed towards uniform attention
            losses["entropy"] = out.entropy.gather(1, pos_index[:, None]).mean()

        # inter-product (Eq. 8): momentum representation of another image of the same product as positive
        with torch.no_grad():
            m_image_raw, m_tokens = self.momentum_towers.encode_image(positive_images)
            m_text_raw = self.momentum_towers.encode_text(input_ids, attention_mask)
            m_out = self.momentum_towers.decode(m_tokens, self._prompts(m_text_raw, m_image_raw, sources, types), types)
            momentum_hidden = F.normalize(m_out.hidden[rows, pos_index], dim=-1)
            bank, bank_ids = momentum_hidden, product_ids
            if group is not None and dist.get_world_size(group) > 1:
                bank, bank_ids = _all_gather(bank, group), _all_gather(bank_ids, group)
            if self.queue is not None:
                bank = torch.cat([bank, self.queue.features.to(bank.dtype)])
                bank_ids = torch.cat([bank_ids, self.queue.ids])
        losses["inter"] = ek.info_nce(F.normalize(hidden, dim=-1), momentum_hidden, bank, scale,
                                      query_ids=product_ids, negative_ids=bank_ids, backend=cfg.backend)
        if self.queue is not None and self.training:
            self.queue.enqueue(momentum_hidden, product_ids, group=group)

        losses["itm"] = self._itm_loss(hidden, text_raw, image_emb, text_emb, product_ids)
        losses["loss"] = sum(cfg.loss_weights.get(name, 1.0) * losses[name]
                             for name in ("itc", "inter", "itm", "intra", "entropy"))
        return losses

    # --- transfer (paper section 3.4) -----------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embeddings (B, D), L2-normalized."""
        return F.normalize(self.towers.encode_image(images)[0], dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Global text embeddings (B, D), L2-normalized."""
        return F.normalize(self.towers.encode_text(input_ids, attention_mask), dim=-1)

    def _transfer_decode(self, images, input_ids, attention_mask, prompt_images, generator, return_attn):
        if self.towers.decoder is None:
            raise RuntimeError("this model has no instance decoder (use_decoder=False)")
        if (input_ids is None) == (prompt_images is None):
            raise ValueError("pass either a text prompt (input_ids, attention_mask) or prompt_images")
        image_raw, tokens = self.towers.encode_image(images)
        if input_ids is not None:
            prompt, prompt_type = self.towers.encode_text(input_ids, attention_mask), InstanceDecoder.TEXT
        else:
            prompt, prompt_type = self.towers.encode_image(prompt_images)[0], InstanceDecoder.IMAGE
        prompt = self._prompt(prompt)
        batch, slots, dim = prompt.shape[0], self.config.num_queries, prompt.shape[1]
        noise = torch.randn((batch, slots - 1, dim), generator=generator, device="cpu" if generator is None
                            else generator.device).to(prompt.device, prompt.dtype)
        prompts = torch.cat([prompt[:, None], noise], dim=1)  # positive first, T - 1 negatives from N(0, I)
        types = torch.full((batch, slots), prompt_type, dtype=torch.long, device=prompt.device)
        return self.towers.decode(tokens, prompts, types, return_attn=return_attn)

    def instance_features(self, images: torch.Tensor, *, input_ids=None, attention_mask=None, prompt_images=None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Instance representations (B, D), L2-normalized: the positive query's output h_0^L.

        The positive prompt is g_T(w_cls) of the given text (or g_I(v_cls) of ``prompt_images``); the T - 1
        negative prompts are drawn from N(0, I) (``generator`` makes them reproducible).
        """
        out = self._transfer_decode(images, input_ids, attention_mask, prompt_images, generator, False)
        return F.normalize(out.hidden[:, 0], dim=-1)

    def grounding_map(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, H, W) scores at image resolution: the positive query's attention over the patches in the last
        decoder block (weights that sum to 1 over the patch grid), bilinearly upsampled to the image size."""
        out = self._transfer_decode(images, input_ids, attention_mask, None, generator, True)
        grid = self.config.image_size // self.config.patch_size
        attn = out.attn[:, :, 0].reshape(-1, 1, grid, grid)
        return F.interpolate(attn, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)
