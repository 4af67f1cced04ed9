from __future__ import annotations

import json

import pytest
import torch

from guidekit.errors import GuidekitError
from guidekit.unet import (
    AttentionBlock,
    ClassifierConfig,
    EncoderUNet,
    ResBlock,
    UNet,
    UNetConfig,
    count_parameters,
    timestep_embedding,
)

# Tiny but complete: 2 levels, attention at the second level and in the middle block.
TINY = dict(image_size=8, model_channels=16, channel_mult=(1, 2), attention_resolutions=(4,))


def tiny_unet(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**TINY, **kw}))


def perturb_(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Give every parameter (zero-initialised ones included) a random nudge."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    ("kw", "shape_in", "c_out"),
    [
        (dict(image_size=16, in_channels=1, attention_resolutions=(8,)), (2, 1, 16, 16), 1),
        (dict(image_size=32, in_channels=3, channel_mult=(1, 2, 2), attention_resolutions=(8,)),
         (2, 3, 32, 32), 3),
        (dict(image_size=16, in_channels=3, attention_resolutions=(16,), learn_sigma=True),
         (2, 3, 16, 16), 6),
    ],
)
def test_forward_shapes(kw, shape_in, c_out):
    model = tiny_unet(**kw)
    assert model.config.out_channels == c_out
    out = model(torch.randn(shape_in), torch.randint(0, 1000, (shape_in[0],)))
    assert out.shape == (shape_in[0], c_out, *shape_in[2:])


def test_zero_output_at_init_then_training_signal_flows():
    model = tiny_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    assert torch.equal(model(x, t), torch.zeros_like(x))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = (model(x, t) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    opt.step()
    assert model(x, t).abs().max() > 0


def test_down_middle_up_equals_forward():
    model = tiny_unet(num_res_blocks=2)
    perturb_(model)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    feats = model.down(x, t)
    assert len(feats.skips) == len(model.output_blocks)
    assert feats.emb.shape == (3, 4 * model.config.model_channels)
    assert torch.equal(model.middle_up(feats), model(x, t))


def test_timestep_matters():
    model = tiny_unet()
    perturb_(model)
    x = torch.randn(2, 1, 8, 8)
    out10 = model(x, torch.full((2,), 10))
    out900 = model(x, torch.full((2,), 900))
    assert (out10 - out900).abs().max() > 1e-4
    # Scalar timesteps broadcast to the batch.
    assert torch.equal(model(x, 10), out10)


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 5, 999]), 7)
    assert emb.shape == (3, 7) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :3], torch.ones(3))  # cos(0)
    assert torch.equal(emb[:, -1], torch.zeros(3))  # odd dim: zero pad
    ints = timestep_embedding(torch.tensor([7, 8]), 8)
    assert torch.allclose(ints, timestep_embedding(torch.tensor([7.0, 8.0]), 8))


def test_resblock_cond_silent_at_init_then_effective():
    torch.manual_seed(0)
    block = ResBlock(8, 12, out_channels=16, cond_channels=5, down=True)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    c1, c2 = torch.randn(2, 5), torch.randn(2, 5)
    out = block(x, emb, c1)
    assert out.shape == (2, 16, 4, 4)
    assert torch.equal(out, block(x, emb, c2))  # zero-init output conv: cond has no effect yet
    assert block.cond_layers.weight.abs().sum() > 0  # but z's projection is live from the start
    torch.nn.init.normal_(block.out_layers[-1].weight, std=0.1)
    assert (block(x, emb, c1) - block(x, emb, c2)).abs().max() > 1e-4
    with pytest.raises(GuidekitError):
        block(x, emb)  # a cond block needs cond


def test_resblock_up_and_attention_shapes():
    block = ResBlock(8, 12, up=True)
    assert block(torch.randn(2, 8, 4, 4), torch.randn(2, 12)).shape == (2, 8, 8, 8)
    attn = AttentionBlock(16, num_heads=4)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(attn(x), x)  # zero-init proj: identity at init
    with pytest.raises(GuidekitError):
        AttentionBlock(10, num_heads=4)


@pytest.mark.parametrize("cls", [UNetConfig, ClassifierConfig])
def test_config_round_trip(cls):
    cfg = cls(image_size=32, in_channels=3, channel_mult=(1, 2, 4), attention_resolutions=(16, 8))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mult"] == [1, 2, 4]
    back = cls.from_dict(d)
    assert back == cfg and isinstance(back.channel_mult, tuple)
    with pytest.raises(GuidekitError, match="'chanel_mult'"):
        cls.from_dict({**d, "chanel_mult": [1]})


def test_bad_configs():
    with pytest.raises(GuidekitError, match="divisible by 4"):
        UNetConfig(image_size=18, channel_mult=(1, 2, 2))
    with pytest.raises(GuidekitError, match="never occur"):
        UNetConfig(image_size=16, attention_resolutions=(7,))
    with pytest.raises(GuidekitError, match="num_heads"):
        UNetConfig(model_channels=32, num_heads=7)
    cfg = UNetConfig()
    cfg.image_size = 10  # mutated after construction: caught when the model is built
    with pytest.raises(GuidekitError, match="image_size 10"):
        UNet(cfg)


def test_wrong_input_shape():
    model = tiny_unet()
    t = torch.zeros(2, dtype=torch.long)
    for shape in [(2, 1, 16, 16), (2, 3, 8, 8), (1, 8, 8)]:
        with pytest.raises(GuidekitError, match=r"model expects \(1, 8, 8\) images, got"):
            model(torch.randn(shape), t)
    with pytest.raises(GuidekitError, match="timesteps"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(3))


def test_encoder_unet_logits_and_input_gradient():
    torch.manual_seed(0)
    cfg = ClassifierConfig(**TINY, num_classes=5)
    model = EncoderUNet(cfg)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 4])
    logits = model(x, torch.tensor([5, 50, 500]))
    assert logits.shape == (3, 5)
    # Classifier guidance: ∇_x log p(y | x_t).
    selected = torch.log_softmax(logits, dim=-1)[torch.arange(3), y].sum()
    (grad,) = torch.autograd.grad(selected, x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().max() > 0
    # The classifier is the UNet's down half: no output blocks.
    assert count_parameters(model) < count_parameters(UNet(UNetConfig(**TINY)))


def test_count_parameters():
    lin = torch.nn.Linear(3, 4)
    assert count_parameters(lin) == 16


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    model = tiny_unet(learn_sigma=True).eval()
    perturb_(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t), model(x, t), atol=1e-4)
        feats = model.down(x, t)
        assert torch.allclose(compiled(x, t), model.middle_up(feats), atol=1e-4)
    clf = EncoderUNet(ClassifierConfig(**TINY)).eval()
    with torch.no_grad():
        assert torch.allclose(torch.compile(clf, fullgraph=True)(x, t), clf(x, t), atol=1e-4)


# --------------------------------------------------------------------------- ADM coverage

ADM_VARIANTS = [
    dict(num_head_channels=8),  # per-layer heads: 16 channels → 2 heads, 32 → 4
    dict(resblock_updown=False),  # stride-2 conv down, nearest + conv up
    dict(resblock_updown=False, conv_resample=False),  # pooling / nearest, no conv
    dict(use_scale_shift_norm=False),  # additive time embedding
    dict(use_new_attention_order=False),  # legacy QKV layout
    dict(channel_mult=(2, 2)),  # channel_mult[0] ≠ 1: a 32-channel input conv
    dict(channel_mult=(0.5, 1), model_channels=32),  # fractional widths (openai's 512 model)
    dict(num_heads=2, num_heads_upsample=1),
    dict(timestep_scale=0.25),  # improved-diffusion's rescale_timesteps at T = 4000
    dict(num_classes=5, learn_sigma=True, dropout=0.1),
]


@pytest.mark.parametrize("kw", ADM_VARIANTS)
def test_adm_variants_build_run_and_round_trip(kw):
    model = tiny_unet(**kw)
    perturb_(model)
    model.eval()
    cfg = model.config
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    y = torch.tensor([0, 4]) if cfg.num_classes else None
    out = model(x, t, y)
    assert out.shape == (2, cfg.out_channels, 8, 8) and torch.isfinite(out).all()
    back = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert model.input_blocks[0][0].out_channels == int(cfg.channel_mult[0] * cfg.model_channels)


def test_heads_follow_num_head_channels_per_layer():
    model = tiny_unet(num_head_channels=8)
    heads = {m.qkv.in_channels: m.num_heads for m in model.modules()
             if isinstance(m, AttentionBlock)}
    assert heads == {32: 4}  # attention only at 4 px (32 channels) and the middle
    wide = tiny_unet(num_head_channels=8, attention_resolutions=(8, 4))
    assert {m.qkv.in_channels: m.num_heads for m in wide.modules()
            if isinstance(m, AttentionBlock)} == {16: 2, 32: 4}


def test_class_conditioning_needs_and_uses_labels():
    model = tiny_unet(num_classes=3)
    perturb_(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(GuidekitError, match="class-conditional"):
        model(x, t)
    with pytest.raises(GuidekitError, match="unconditional"):
        tiny_unet()(x, t, torch.tensor([0, 1]))


def test_timestep_scale_embeds_scaled_timesteps():
    scaled, plain = tiny_unet(timestep_scale=0.25), tiny_unet()
    perturb_(scaled)
    plain.load_state_dict(scaled.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([400, 3999])
    torch.testing.assert_close(scaled(x, t), plain(x, t.float() * 0.25))


def test_qkv_layouts_differ_only_by_a_channel_permutation():
    """The legacy layout splits heads before q, k, v: permuting the qkv conv's output
    channels from the new layout to the legacy one gives the same attention."""
    torch.manual_seed(0)
    new, old = AttentionBlock(16, 4, new_order=True), AttentionBlock(16, 4, new_order=False)
    perturb_(new)
    # new layout index (three, head, d) → legacy position (head, three, d)
    idx = torch.arange(48).view(3, 4, 4).permute(1, 0, 2).reshape(-1)
    state = new.state_dict()
    state["qkv.weight"], state["qkv.bias"] = state["qkv.weight"][idx], state["qkv.bias"][idx]
    old.load_state_dict(state)
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(old(x), new(x))


@pytest.mark.parametrize("kw", [dict(), dict(num_classes=4)])
def test_sdpa_and_written_out_attention_agree(kw):
    from guidekit.unet import set_attention

    model = tiny_unet(num_head_channels=8, **kw)
    perturb_(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 900])
    y = torch.tensor([1, 3]) if kw else None
    fused = model(x, t, y)
    torch.testing.assert_close(set_attention(model, sdpa=False)(x, t, y), fused,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_classifier_pools(pool):
    torch.manual_seed(0)
    clf = EncoderUNet(ClassifierConfig(**TINY, num_classes=7, pool=pool, num_head_channels=8))
    perturb_(clf)
    logits = clf(torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999]))
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    with pytest.raises(GuidekitError, match="unknown classifier pool"):
        ClassifierConfig(**TINY, pool="max")


def test_configs_written_before_adm_coverage_keep_their_layout():
    """guidekit's UNet used to give the input conv model_channels whatever channel_mult[0]
    was; such a config (no ADM fields) still builds the network its weights fit."""
    old = {"image_size": 8, "in_channels": 1, "model_channels": 16, "channel_mult": [2, 2],
           "num_res_blocks": 1, "attention_resolutions": [], "num_heads": 4, "dropout": 0.0,
           "learn_sigma": False}
    cfg = UNetConfig.from_dict(old)
    assert cfg.stem_channels == 16
    assert UNet(cfg).input_blocks[0][0].weight.shape == (16, 1, 3, 3)
    assert UNet(UNetConfig.from_dict({**old, "channel_mult": [1, 2]})).input_blocks[0][0].weight \
        .shape == (16, 1, 3, 3)
    new = UNetConfig(**{k: v for k, v in old.items() if k != "learn_sigma"})
    assert new.stem_channels is None and UNet(new).input_blocks[0][0].weight.shape[0] == 32
