"""ECLIP model configurations and the preset registry (SPEC section 6)."""

from __future__ import annotations

import dataclasses
import os

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TINY_VOCAB = os.path.join(ASSETS, "vocab.txt")


@dataclasses.dataclass
class ECLIPConfig:
    """Everything that defines an ECLIP model. Presets: :data:`PRESETS`; override any field in
    :func:`eclip.models.create`.

    Image encoder (timm VisionTransformer): image_size, patch_size, vision_width, vision_depth, vision_heads.
    Text encoder (transformers BertModel): vocab_size, text_width, text_depth, text_heads, text_mlp,
    max_text_len (WordPiece tokens, [CLS] and [SEP] included; 55 in the paper), text_dropout (BERT's hidden
    and attention dropout).
    Joint space and decoder: embed_dim (D), decoder_depth (L), num_queries (T), decoder_heads, decoder_mlp.
    Training: momentum (EMA of the momentum model), queue_size (Eq. 8 negatives; 0 = off), loss_weights,
    use_decoder (False = plain CLIP baseline: only the ITC loss), backend (of the fused kernels),
    entropy_form: "paper" (Eq. 10: low entropy for the positive query, high for the T - 1 negatives) or
    "positive" (the positive query's term only; docs/recipe.md has why it is measured); detach_prompts: the
    decoder's prompts (g_T(w_cls), g_I(v_cls)) carry no gradient of the decoder losses back into the encoders'
    global embeddings (the paper leaves it open; docs/recipe.md has the measurement).
    """

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vocab_size: int = 30522
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    max_text_len: int = 55
    text_dropout: float = 0.1
    embed_dim: int = 512
    decoder_depth: int = 6
    num_queries: int = 20
    decoder_heads: int = 8
    decoder_mlp: int = 2048
    momentum: float = 0.995
    queue_size: int = 0
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    loss_weights: dict = dataclasses.field(
        default_factory=lambda: {"itc": 1.0, "inter": 1.0, "itm": 1.0, "intra": 1.0, "entropy": 1.0}
    )
    use_decoder: bool = True
    entropy_form: str = "paper"
    detach_prompts: bool = False
    backend: str = "auto"
    vocab_file: str | None = None

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_queries < 2:
            raise ValueError("num_queries must be >= 2 (one positive and at least one negative prompt)")
        if self.entropy_form not in ("paper", "positive"):
            raise ValueError(f"entropy_form must be 'paper' or 'positive', got {self.entropy_form!r}")
        unknown = set(self.loss_weights) - {"itc", "inter", "itm", "intra", "entropy"}
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: itc, inter, itm, intra, entropy")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS: dict[str, dict] = {
    # ViT-B/16 at 224, BERT-base, D=512, L=6, T=20 (about 220M parameters in the paper)
    "eclip-vit-b16": dict(),
    # ViT-L/16 at 224, BERT-base (about 450M parameters in the paper)
    "eclip-vit-l16": dict(vision_width=1024, vision_depth=24, vision_heads=16),
    # small enough for a CPU demo and the tests; its vocabulary ships with the package
    "eclip-tiny": dict(
        image_size=64, patch_size=16, vision_width=64, vision_depth=2, vision_heads=2,
        vocab_size=253, text_width=64, text_depth=2, text_heads=2, text_mlp=128, max_text_len=32,
        embed_dim=64, decoder_depth=2, num_queries=8, decoder_heads=2, decoder_mlp=128, queue_size=64,
        vocab_file=TINY_VOCAB,
    ),
    # the demo recipe at a larger scale, for one GPU (docs/gpu-recipe.md): 112 px with patch 8, the paper's 196
    # image tokens; a 6-block ViT of width 192, a 4-layer BERT of width 128, D = 128; 4.2M parameters without
    # the momentum copy. eclip-tiny's vocabulary (the synthetic catalogue's words), shipped with the package.
    "eclip-small": dict(
        image_size=112, patch_size=8, vision_width=192, vision_depth=6, vision_heads=3,
        vocab_size=253, text_width=128, text_depth=4, text_heads=2, text_mlp=512, max_text_len=32,
        embed_dim=128, decoder_depth=2, num_queries=8, decoder_heads=4, decoder_mlp=512, queue_size=128,
        vocab_file=TINY_VOCAB,
    ),
}


def preset_config(name: str, **overrides) -> ECLIPConfig:
    """The configuration of a preset with fields overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ECLIPConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown ECLIPConfig fields {sorted(unknown)}")
    return ECLIPConfig(**{**PRESETS[name], **overrides})
