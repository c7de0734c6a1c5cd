"""The ``conv`` training initialisation: a plain ViT whose attention layers start as 3x3 convolutions."""

from __future__ import annotations

import pytest
import timm
import torch

from vitviz import create_model
from vitviz.data import make_shapes
from vitviz.errors import ConfigError
from vitviz.explain import capture_attention
from vitviz.training import TrainConfig
from vitviz.training.init import _CONV_OFFSETS, apply_init, conv_init


def _scenes(img_size: int, n: int = 8) -> torch.Tensor:
    images, _, _ = make_shapes(n, seed=3, img_size=img_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (n, 3, H, W)
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


@pytest.mark.parametrize(("img_size", "width", "heads"), [(32, 96, 8), (16, 128, 8), (32, 64, 4)])
def test_every_head_starts_attending_to_its_neighbour(img_size, width, heads):
    torch.manual_seed(0)
    model = create_model("vit_p4_d8_32", img_size=img_size, embed_dim=width, depth=3, num_heads=heads,
                         pooling="mean", num_classes=8).eval()
    conv_init(model)
    gh, gw = model.grid_size
    x = _scenes(img_size)  # real scenes, normalised as training normalises them
    mass_by_layer = []
    for layer, attn in enumerate(capture_attention(model, x).attentions):
        patches = attn[:, :, 1:, 1:]  # (B, heads, N, N) among patch tokens
        for h in range(heads):
            dr, dc = _CONV_OFFSETS[h]
            queries = [(r, c) for r in range(gh) for c in range(gw) if 0 <= r + dr < gh and 0 <= c + dc < gw]
            q = torch.tensor([r * gw + c for r, c in queries])
            k = torch.tensor([(r + dr) * gw + c + dc for r, c in queries])
            on_target = patches[:, h, q, k]  # (B, queries)
            hits = (patches[:, h, q].argmax(-1) == k).float().mean().item()
            assert hits >= 0.9, (layer, h, hits)  # the peak sits on the neighbour in every layer
            mass_by_layer.append((layer, on_target.mean().item()))
    first = [m for layer, m in mass_by_layer if layer == 0]
    last = [m for layer, m in mass_by_layer if layer == 2]
    assert min(first) > 0.7  # layer 0: a sharp 3x3 kernel (~0.85 on the neighbour)
    assert max(last) < min(first)  # deeper layers start wider (sharpness / (1 + layer))


def test_conv_init_starts_a_hybrid_s_first_layer_as_a_convolution_over_its_cnn_tokens():
    torch.manual_seed(0)
    model = create_model("hybrid_r18_vit_32", img_size=32, backbone_layers=(1, 1, 1), backbone_width=16,
                         embed_dim=64, depth=2, num_heads=8, num_classes=8).eval()
    conv_init(model)  # calibrated on what the CNN makes of a random batch
    gh, gw = model.grid_size
    patches = capture_attention(model, _scenes(32)).attentions[0][:, :, 1:, 1:]  # (B, heads, N, N)
    for h in range(8):
        dr, dc = _CONV_OFFSETS[h]
        queries = [(r, c) for r in range(gh) for c in range(gw) if 0 <= r + dr < gh and 0 <= c + dc < gw]
        k = torch.tensor([(r + dr) * gw + c + dc for r, c in queries])
        hits = (patches[:, h, [r * gw + c for r, c in queries]].argmax(-1) == k).float().mean().item()
        assert hits >= 0.9, (h, hits)


def test_conv_init_keeps_a_plain_vit_that_timm_loads():
    torch.manual_seed(0)
    model = create_model("vit_p4_d8_32", img_size=32, embed_dim=96, depth=2, num_heads=8, pooling="mean",
                         num_classes=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv_init(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(after[k].shape == before[k].shape for k in after)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert {"pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"} <= changed
    assert not {"head.weight", "blocks.0.norm1.weight", "cls_token"} & changed
    # the last 8K = 24 position channels: +code / -code pairs, never written by the patch projection
    pos = model.pos_embed[0, 1:, -24:]  # (64, 24)
    assert torch.allclose(pos[:, 0::2], -pos[:, 1::2]) and pos.abs().max() > 1
    assert torch.all(model.patch_embed.proj.weight[-24:] == 0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=96,
                               depth=2, num_heads=8, num_classes=8, global_pool="avg", class_token=True)
    theirs.load_state_dict(after)
    x = _scenes(32, 2)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_conv_init_refuses_what_it_cannot_build():
    tiny_heads = create_model("vit_p4_d8_32", img_size=32, embed_dim=16, depth=1, num_heads=8)
    with pytest.raises(ConfigError, match="head dimension of at least 4"):
        conv_init(tiny_heads)
    with pytest.raises(ConfigError, match="init 'conv' applies to ViTs and hybrids, not to a resnet"):
        apply_init(torch.nn.Identity(), "conv", "resnet")
    with pytest.raises(ConfigError, match="init must be one of"):
        TrainConfig(model="vit_p4_d8_32", dataset="digits", epochs=1, out="unused", init="convolutional")


def test_a_training_run_with_init_conv_starts_from_it_and_saves_a_plain_vit(tmp_path):
    from vitviz.checkpoint import load_checkpoint
    from vitviz.training import train

    config = TrainConfig.from_dict({
        "model": "vit_p4_d8_32", "dataset": "shapes", "img_size": 32, "embed_dim": 96, "depth": 1, "num_heads": 8,
        "pooling": "mean", "init": "conv", "epochs": 1, "warmup_epochs": 0, "limit_train": 64, "limit_eval": 32,
        "batch_size": 32, "threads": 1, "progress": False, "lr": 1e-4, "out": str(tmp_path / "run"),
    })
    result = train(config)
    model, meta = load_checkpoint(result.best_path)
    assert meta.train_config["init"] == "conv" and meta.family == "vit"
    # two small steps later the heads still look at their neighbours: the run started from the conv init
    attn = capture_attention(model, _scenes(32, 4)).attentions[0][:, :, 1:, 1:]  # (B, heads, 64, 64)
    dr, dc = _CONV_OFFSETS[0]
    queries = [(r, c) for r in range(8) for c in range(8) if 0 <= r + dr < 8 and 0 <= c + dc < 8]
    k = torch.tensor([(r + dr) * 8 + c + dc for r, c in queries])
    assert (attn[:, 0, [r * 8 + c for r, c in queries]].argmax(-1) == k).float().mean() > 0.8
