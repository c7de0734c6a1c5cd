"""layer_features and the adapters' layers(): every block's / stage's output, split as the adapter says,
checked against hand-run forwards and timm's own ``forward_intermediates``."""

from __future__ import annotations

import pytest
import timm
import torch
from test_adapters_hierarchical import FAMILIES as HIERARCHICAL
from test_adapters_hierarchical import build as build_hierarchical
from test_adapters_hierarchical import images as hierarchical_images
from test_adapters_transformers import FAMILIES as TRANSFORMERS
from test_adapters_transformers import Built
from test_explain_capture import randomize, tiny_timm_vit, tiny_vit
from test_explain_methods import tiny_hybrid, tiny_resnet

from vitviz.errors import ConfigError, ExplainError
from vitviz.explain.adapters import adapter_for
from vitviz.represent.features import layer_features, layer_labels


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_our_vit_blocks_equal_a_hand_run_forward(x):
    model = tiny_vit(depth=3)
    fp = layer_features(model, x, lens=True)
    assert fp.labels == ["blocks.0", "blocks.1", "blocks.2"]
    with torch.no_grad():
        t = model._embed(x)  # (B, 1+16, D)
        for blk, f in zip(model.blocks, fp.layers, strict=True):
            t = blk(t)[0]
            assert f.split.prefix == 1 and f.grid == (4, 4)
            torch.testing.assert_close(f.split.tokens, t)
            torch.testing.assert_close(f.readout, t[:, 0])  # class-token pooling reads the class token
            torch.testing.assert_close(f.patches, t[:, 1:])
        torch.testing.assert_close(fp.logits, model(x))
    torch.testing.assert_close(fp.layers[-1].lens_logits, fp.logits)  # the last layer's lens is the model
    assert not torch.allclose(fp.layers[0].lens_logits, fp.logits)


def test_mean_pooling_reads_the_patch_mean(x):
    fp = layer_features(tiny_vit(pooling="mean"), x, lens=True)
    f = fp.layers[0]
    torch.testing.assert_close(f.readout, f.split.tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(fp.layers[-1].lens_logits, fp.logits)


def test_resnet_gives_every_residual_block_and_its_spatial_mean(x):
    model = tiny_resnet()
    fp = layer_features(model, x, lens=True)
    assert fp.labels == ["layer1.0", "layer2.0", "layer3.0"]
    assert [f.stage for f in fp.layers] == [0, 1, 2]
    with torch.no_grad():
        t = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        for name, f in zip(model.stage_names, fp.layers, strict=True):
            t = getattr(model, name)(t)  # (B, C, h, w)
            assert f.grid == tuple(t.shape[-2:]) and f.split.prefix == 0
            torch.testing.assert_close(f.patches, t.flatten(2).transpose(1, 2))
            torch.testing.assert_close(f.readout, t.mean(dim=(2, 3)))
            assert f.lens_logits is None  # no logit lens on a CNN


def test_hybrid_lists_its_cnn_stages_before_its_blocks(x):
    model = tiny_hybrid()
    fp = layer_features(model, x, lens=True)
    labels = fp.labels
    assert labels[:3] == ["patch_embed.backbone.layer1.0", "patch_embed.backbone.layer2.0",
                          "patch_embed.backbone.layer3.0"]
    assert labels[3:] == ["blocks.0", "blocks.1"]
    assert [f.stage for f in fp.layers] == [0, 1, 2, 3, 3]
    with torch.no_grad():
        feature_map = model.patch_embed.features(x)  # (B, C, h, w): the backbone's output
    torch.testing.assert_close(fp.layers[2].patches, feature_map.flatten(2).transpose(1, 2))
    assert fp.layers[2].lens_logits is None
    torch.testing.assert_close(fp.layers[-1].lens_logits, fp.logits)
    assert layer_labels(model) == labels


def test_timm_vit_matches_forward_intermediates(x):
    model = tiny_timm_vit()
    fp = layer_features(model, x, lens=True)
    with torch.no_grad():
        ref = model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True)
    assert len(ref) == len(fp.layers) == 2
    for (patches, prefix), f in zip(ref, fp.layers, strict=True):
        torch.testing.assert_close(f.patches, patches)
        torch.testing.assert_close(f.readout, prefix[:, 0])
    torch.testing.assert_close(fp.layers[-1].lens_logits, fp.logits)


def test_timm_cnn_gives_its_feature_info_stages():
    model = randomize(timm.create_model("resnet18", pretrained=False, num_classes=5), seed=3)
    x = torch.randn(2, 3, 64, 64)
    fp = layer_features(model, x)
    assert fp.labels == ["act1", "layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)  # [(B, C, h, w)] per stage
    for r, f in zip(ref, fp.layers, strict=True):
        assert f.grid == tuple(r.shape[-2:])
        torch.testing.assert_close(f.readout, r.mean(dim=(2, 3)))


def test_swin_stages_are_channels_last_maps_on_their_grids():
    model = build_hierarchical("swin")
    x = hierarchical_images("swin")
    fp = layer_features(model, x, lens=True)
    assert fp.labels == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)  # each stage's output, NCHW
    for r, f in zip(ref, [fp.layers[1], fp.layers[3]], strict=True):
        assert f.grid == tuple(r.shape[-2:])
        torch.testing.assert_close(f.patches, r.flatten(2).transpose(1, 2))
    torch.testing.assert_close(fp.layers[-1].lens_logits, fp.logits)
    assert fp.layers[0].lens_logits is None  # an earlier stage: another width than the head's


@pytest.mark.parametrize("family", [f for f in HIERARCHICAL if f not in ("swin",)])
def test_every_hierarchical_family_splits_each_layer(family):
    model = build_hierarchical(family)
    x = hierarchical_images(family)
    adapter = adapter_for(model)
    fp = layer_features(model, x, lens=True)
    assert len(fp.layers) == len(adapter.layers()) >= 1
    stages = [f.stage for f in fp.layers]
    assert stages == sorted(stages)
    for f in fp.layers:
        b, n, d = f.split.tokens.shape
        assert b == x.shape[0] and n == f.split.prefix + f.grid[0] * f.grid[1]
        assert f.readout.shape == (b, d) and f.vector("flat").shape == (b, n * d)
    lens = fp.layers[-1].lens_logits
    if family.startswith(("pvt", "crossvit")):  # the head reads a map / both branches: no lens
        assert lens is None
    elif family == "twins-pcpvt":  # a position convolution follows its one-block stage: not the logits
        assert not torch.allclose(lens, fp.logits, atol=1e-4)
    else:
        torch.testing.assert_close(lens, fp.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(TRANSFORMERS))
def test_every_flat_transformer_splits_each_block(family):
    built = Built(family)
    fp = layer_features(built.model, built.x, lens=True)
    assert fp.labels == [f"blocks.{i}" for i in range(len(built.model.blocks))]
    torch.testing.assert_close(fp.logits, built.logits)
    for f in fp.layers:
        assert f.split.tokens.shape[1] == f.split.prefix + f.grid[0] * f.grid[1]
    lens = fp.layers[-1].lens_logits
    if family in ("cait", "xcit"):  # class-attention blocks sit between the last block and the head
        assert lens is None
    else:
        torch.testing.assert_close(lens, fp.logits, atol=1e-4, rtol=1e-4)


def test_representations_and_bad_input(x):
    fp = layer_features(tiny_vit(), x, select=[-1])
    f = fp.layers[0]
    assert f.label == "blocks.1"
    assert f.vector("flat").shape == (3, 17 * 32)
    torch.testing.assert_close(f.vector("mean"), f.patches.mean(dim=1))
    with pytest.raises(ConfigError, match="unknown representation"):
        f.vector("cls")
    with pytest.raises(ConfigError, match="out of range"):
        layer_features(tiny_vit(), x, select=[5])
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        layer_features(tiny_vit(), x[0])
    with pytest.raises(ExplainError, match="cannot explain"):
        layer_features(torch.nn.Linear(3, 3), x)
