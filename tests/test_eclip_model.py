"""The ECLIP model layer (eclip.models) on eclip-tiny, on the CPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("timm", reason="eclip.models needs timm")
pytest.importorskip("transformers", reason="eclip.models needs transformers")

import eclip.models as em  # noqa: E402
from eclip.models.decoder import InstanceDecoder  # noqa: E402

TEXTS = ["red striped cup", "blue dotted mug", "green plain bag", "red striped cup large", "black leather shoe",
         "white cotton hat"]
PRODUCTS = torch.tensor([0, 1, 2, 0, 3, 4])


def _model(**overrides):
    torch.manual_seed(0)
    return em.create("eclip-tiny", **overrides)


def _batch(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    ids, mask = em.tokenizer_for(model)(TEXTS)
    return dict(images=torch.randn(6, 3, size, size, generator=gen),
                positive_images=torch.randn(6, 3, size, size, generator=gen),
                input_ids=ids, attention_mask=mask, product_ids=PRODUCTS.clone())


def test_presets_build_offline_and_match_the_papers_parameter_counts():
    for name, paper in em.PAPER_PARAMS_M.items():
        with torch.device("meta"):
            model = em.create(name)
        count = em.count_parameters(model) / 1e6
        assert abs(count - paper) / paper < 0.05, (name, count)
    tiny = em.create("eclip-tiny")
    assert tiny.config.num_queries == 8 and tiny.config.decoder_depth == 2
    with pytest.raises(KeyError, match="unknown preset"):
        em.create("eclip-huge")
    with pytest.raises(TypeError, match="unknown ECLIPConfig fields"):
        em.create("eclip-tiny", widht=3)


def test_tokenizer_gives_known_ids():
    tokenizer = em.tokenizer_for(em.preset_config("eclip-tiny"))
    ids, mask = tokenizer(["A red striped cup, with logos!"])
    vocab = open(em.preset_config("eclip-tiny").vocab_file).read().split("\n")
    tokens = [vocab[i] for i in ids[0][mask[0].bool()].tolist()]
    assert tokens == ["[CLS]", "a", "red", "striped", "cup", ",", "with", "logo", "##s", "!", "[SEP]"]
    assert ids.shape == (1, 32) and tokenizer.vocab_size == em.preset_config("eclip-tiny").vocab_size
    with pytest.raises(ValueError, match="ships no vocabulary"):
        em.tokenizer_for(em.preset_config("eclip-vit-b16"))


def test_forward_returns_five_finite_losses_and_the_weighted_total():
    model = _model(loss_weights={"itc": 1.0, "inter": 0.5, "itm": 2.0, "intra": 1.0, "entropy": 0.1})
    losses = model(_batch(model))
    assert set(losses) == {"itc", "inter", "itm", "intra", "entropy", "loss"}
    for name, value in losses.items():
        assert value.shape == () and torch.isfinite(value), name
    weights = model.config.loss_weights
    expect = sum(weights[k] * losses[k] for k in weights)
    torch.testing.assert_close(losses["loss"], expect)


def test_entropy_form_positive_is_the_positive_querys_entropy_alone():
    paper = _model()
    positive = _model(entropy_form="positive")
    positive.load_state_dict(paper.state_dict())
    batch = _batch(paper)
    torch.manual_seed(5)
    a = paper(batch)
    torch.manual_seed(5)  # the same prompt draw: the decoder's entropies agree, only Eq. 10's form differs
    b = positive(batch)
    for key in ("itc", "intra", "inter", "itm"):
        torch.testing.assert_close(a[key], b[key], msg=key)
    n_tokens = paper.config.num_patches
    # Eq. 10 = mean_b [ent_pos + sum_neg (log N - ent_neg)], so the two forms differ by the negatives' terms,
    # which are >= 0 (entropy <= log N): the paper's form is never the smaller
    assert a["entropy"] >= b["entropy"] and 0 < b["entropy"] <= math.log(n_tokens) + 1e-4
    with pytest.raises(ValueError, match="entropy_form"):
        _model(entropy_form="negatives")


# which parameters each loss must reach (prefixes of parameter names)
REACHES = {
    "itc": ["towers.visual.", "towers.text.", "towers.image_proj.", "towers.text_proj.", "logit_scale"],
    "intra": ["towers.decoder.", "towers.token_proj.", "towers.text_proj.", "logit_scale"],
    "entropy": ["towers.decoder.blocks.1.slot_attn.to_q.", "towers.token_proj."],
    "inter": ["towers.decoder.", "towers.visual.", "logit_scale"],
    "itm": ["itm_head.", "towers.decoder.", "towers.text_proj."],
}
# and which it must not reach
NOT_REACHES = {"itc": ["towers.decoder.", "itm_head."], "itm": ["logit_scale"], "entropy": ["itm_head."],
               "intra": ["itm_head."], "inter": ["itm_head."]}


@pytest.mark.parametrize("loss_name", sorted(REACHES))
def test_each_loss_reaches_its_parameters_and_never_the_momentum_model(loss_name):
    model = _model()
    losses = model(_batch(model))
    losses[loss_name].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in REACHES[loss_name]:
        hit = [n for n, g in grads.items() if n.startswith(prefix) and g is not None and g.abs().sum() > 0]
        assert hit, f"{loss_name} does not reach {prefix}"
    for prefix in NOT_REACHES[loss_name]:
        hit = [n for n, g in grads.items() if n.startswith(prefix) and g is not None and g.abs().sum() > 0]
        assert not hit, f"{loss_name} reaches {hit[:3]}"
    assert all(g is None for n, g in grads.items() if n.startswith("momentum_towers."))
    assert not any(p.requires_grad for p in model.momentum_towers.parameters())


def test_momentum_update_is_the_specified_ema():
    model = _model(momentum=0.9)
    with torch.no_grad():
        for p in model.towers.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.momentum_towers.parameters()]
    model.update_momentum()
    for old, new, online in zip(before, model.momentum_towers.parameters(), model.towers.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)


def test_queue_receives_the_momentum_features_in_training_only():
    model = _model()
    batch = _batch(model)
    model.eval()
    model(batch)
    assert int(model.queue.ptr) == 0
    model.train()
    model(batch)
    assert int(model.queue.ptr) == 6 and model.queue.ids[:6].tolist() == PRODUCTS.tolist()


def test_decoder_fused_path_matches_reference():
    fused = _model(backend="cpu")
    reference = copy.deepcopy(fused)
    for block in reference.towers.decoder.blocks:
        block.slot_attn.backend = "reference"
    batch = _batch(fused)
    gen = torch.Generator().manual_seed(3)
    outs = []
    for model in (fused, reference):
        torch.manual_seed(5)
        image_raw, tokens = model.towers.encode_image(batch["images"])
        prompts = torch.randn(6, 8, 64, generator=gen.manual_seed(3))
        types = torch.randint(0, 2, (6, 8), generator=gen)
        out = model.towers.decode(tokens, prompts, types, return_attn=True)
        out.hidden.square().sum().backward()
        outs.append((out.hidden.detach(), out.entropy.detach(),
                     model.towers.decoder.blocks[0].slot_attn.to_k.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prompt_sampling_positive_slot_and_other_product_negatives():
    model = _model()
    pos_index, sources, types = model._sample_prompts(PRODUCTS)
    rows = torch.arange(6)
    assert (sources[rows, pos_index] == rows).all()
    for b in range(6):
        negatives = [int(sources[b, t]) for t in range(8) if t != int(pos_index[b])]
        # 5 other samples for 7 negative slots: drawn with replacement, never the sample itself when others exist
        assert all(n != b for n in negatives)
        assert all(PRODUCTS[n] != PRODUCTS[b] for n in negatives)
    assert set(types.unique().tolist()) <= {InstanceDecoder.TEXT, InstanceDecoder.IMAGE}


def test_instance_features_follow_the_prompt_and_are_reproducible():
    # How little the random negatives matter is a property of a trained model (paper table 6); at
    # initialization the attention is near uniform and the output hardly depends on any prompt. What holds
    # for any weights: the output is a deterministic function of (images, prompt, generator), and it changes
    # with the prompt.
    model = _model().eval()
    batch = _batch(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        first = model.instance_features(batch["images"], input_ids=ids, attention_mask=mask,
                                        generator=torch.Generator().manual_seed(0))
        again = model.instance_features(batch["images"], input_ids=ids, attention_mask=mask,
                                        generator=torch.Generator().manual_seed(0))
        other_prompt = model.instance_features(batch["images"], input_ids=ids.roll(1, 0),
                                               attention_mask=mask.roll(1, 0), generator=torch.Generator().manual_seed(0))
        by_image = model.instance_features(batch["images"], prompt_images=batch["positive_images"])
    assert torch.equal(first, again)
    assert first.shape == (6, 64) and by_image.shape == (6, 64)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(6))
    assert ((first - other_prompt).norm(dim=1) > 1e-5).all()
    with pytest.raises(ValueError, match="either a text prompt"):
        model.instance_features(batch["images"])
    maps = model.grounding_map(batch["images"], ids, mask)
    assert maps.shape == (6, 64, 64) and torch.isfinite(maps).all() and (maps >= 0).all()


def test_save_load_round_trip(tmp_path):
    model = _model()
    model(_batch(model))["loss"].backward()
    path = tmp_path / "eclip-tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = em.create("eclip-tiny")
    loaded.load_state_dict(torch.load(path))
    batch = _batch(model)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.manual_seed(9)
        a = model(batch)
        torch.manual_seed(9)
        b = loaded(batch)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_plain_clip_baseline_switch():
    model = _model(use_decoder=False)
    losses = model(_batch(model))
    assert set(losses) == {"itc", "loss"}
    assert model.momentum_towers is None and model.itm_head is None and model.towers.decoder is None
    with pytest.raises(RuntimeError, match="no instance decoder"):
        model.instance_features(torch.randn(1, 3, 64, 64), prompt_images=torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("mutate, error, message", [
    (lambda b: b.pop("positive_images"), KeyError, "batch is missing \\['positive_images'\\]"),
    (lambda b: b.update(product_ids=b["product_ids"][:4]), ValueError, "batch sizes differ"),
    (lambda b: b.update(attention_mask=b["attention_mask"][:, :5]), ValueError, "input_ids and attention_mask"),
    (lambda b: b.update(positive_images=b["positive_images"][:, :, :32]), ValueError, "positive_images"),
])
def test_bad_batch_raises_clear_error(mutate, error, message):
    model = _model()
    batch = _batch(model)
    mutate(batch)
    with pytest.raises(error, match=message):
        model(batch)


def test_pretrained_encoders_load_from_local_files(tmp_path):
    source = _model()
    with torch.no_grad():
        for p in source.towers.parameters():
            p.add_(1.0)
    torch.save(source.towers.visual.state_dict(), tmp_path / "vit.pt")
    source.towers.text.save_pretrained(tmp_path / "bert")
    target = em.create("eclip-tiny")
    target.load_pretrained_encoders(vision=str(tmp_path / "vit.pt"), text=str(tmp_path / "bert"))
    for part in ("visual", "text"):
        for (name, a), b in zip(getattr(source.towers, part).state_dict().items(),
                                getattr(target.towers, part).state_dict().values()):
            assert torch.equal(a, b), name
        for a, b in zip(getattr(target.towers, part).parameters(), getattr(target.momentum_towers, part).parameters()):
            assert torch.equal(a, b)


def test_detach_prompts_cuts_only_the_decoder_losses_path_through_the_prompts():
    """With detach_prompts the entropy term (which reaches the text tower only through the prompts) gives the
    text encoder no gradient; the losses' values are unchanged; without it the text encoder gets one."""
    batch = _batch(_model())
    grads = {}
    for detach in (False, True):
        model = _model(detach_prompts=detach)
        torch.manual_seed(5)
        losses = model(batch)
        model.zero_grad()
        losses["entropy"].backward()
        text = [p.grad for n, p in model.named_parameters() if n.startswith("towers.text.")]
        grads[detach] = sum(float(g.abs().sum()) for g in text if g is not None)
        grads[f"{detach}-values"] = {k: float(v.detach()) for k, v in losses.items()}
    assert grads[False] > 0 and grads[True] == 0
    assert grads["False-values"] == pytest.approx(grads["True-values"])
