"""``vitviz explain`` on a PNG written here, with a tiny checkpoint saved here."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image
from test_explain_capture import tiny_vit
from test_explain_methods import tiny_resnet

from vitviz.explain import METHODS
from vitviz.explain.cli import _METHODS, add_parser, build_parser, main, run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from vitviz.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("cli")
    names = ["circle", "square", "triangle", "star", "cross"]
    save_checkpoint(tiny_vit(), d / "vit.safetensors", class_names=names, mean=(0.5,) * 3, std=(0.25,) * 3)
    save_checkpoint(tiny_resnet(), d / "resnet.safetensors", class_names=names)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / "scene.png")
    return d


def test_cli_methods_match_the_library():
    assert tuple(_METHODS) == tuple(METHODS)


def test_explain_writes_png_and_npy(files, capsys):
    out = files / "out" / "map.png"
    code = main([str(files / "scene.png"), "--checkpoint", str(files / "vit.safetensors"), "--method", "chefer",
                 "--target", "star", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "top-5" in text and "star" in text
    png = Image.open(out)
    assert png.size == (224, 224)  # 32-px input enlarged 7x by default
    saliency = np.load(out.with_suffix(".npy"))
    assert saliency.shape == (32, 32) and saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    code = main([str(files / "scene.png"), "--checkpoint", str(files / "vit.safetensors"), "--method", "attention",
                 "--layer", "-1", "--head", "1", "--query", "1,2", "--scale", "1", "--out", str(out)])
    assert code == 0 and Image.open(out).size == (32, 32)


def test_subparser_wiring(files):
    parser = argparse.ArgumentParser(prog="vitviz")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain", str(files / "scene.png"), "--checkpoint", str(files / "resnet.safetensors"),
                              "--method", "gradcam", "--out", str(files / "cam.png")])
    assert args.func is run and run(args) == 0
    assert (files / "cam.npy").exists()


def test_a_bad_method_exits_2(files, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(files / "scene.png"), "--checkpoint", str(files / "vit.safetensors"), "--method", "magic",
              "--out", str(files / "x.png")])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--method", "rollout", "--discard-ratio", "1.5"], "discard_ratio"),
    (["--method", "gradcam", "--fusion", "max"], "--fusion does not apply"),
    (["--method", "chefer", "--target", "7"], "out of range"),
    (["--method", "chefer", "--target", "hexagon"], "neither a class index"),
    (["--method", "attention", "--layer", "9"], "--layer 9 is out of range: this model has 2 layers (use 1..2"),
    (["--method", "attention", "--layer", "3"], "--layer 3 is out of range"),
    (["--method", "attention", "--layer", "0"], "counts layers from 1"),
    (["--method", "rollout", "--start-layer", "0"], "--start-layer counts layers from 1"),
    (["--method", "chefer", "--start-layer", "-3"], "--start-layer -3 is out of range"),
    (["--method", "attention", "--query", "a,b"], "--query"),
])
def test_bad_arguments_exit_2_without_traceback(files, capsys, extra, message):
    code = main([str(files / "scene.png"), "--checkpoint", str(files / "vit.safetensors"), *extra,
                 "--out", str(files / "bad.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_resnet_refuses_attention_and_missing_files_are_clear(files, capsys):
    assert main([str(files / "scene.png"), "--checkpoint", str(files / "resnet.safetensors"), "--method", "rollout",
                 "--out", str(files / "r.png")]) == 2
    assert "needs attention" in capsys.readouterr().err
    assert main([str(files / "missing.png"), "--checkpoint", str(files / "vit.safetensors"),
                 "--out", str(files / "r.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([str(files / "scene.png"), "--model", "vit_p8_d8_32", "--out", str(files / "r.png")]) == 2
    assert "timm:NAME" in capsys.readouterr().err


def test_vitviz_explain_through_the_main_cli(files, capsys):
    from vitviz.cli import main as vitviz_main

    out = files / "main" / "rollout.png"
    code = vitviz_main(["explain", str(files / "scene.png"), "--checkpoint", str(files / "vit.safetensors"),
                        "--method", "rollout", "--fusion", "max", "--out", str(out)])
    assert code == 0 and out.exists() and out.with_suffix(".npy").exists()
    code = vitviz_main(["explain", str(files / "scene.png"), "--checkpoint", str(files / "vit.safetensors"),
                        "--method", "rollout", "--discard-ratio", "1.5", "--out", str(out)])
    assert code == 2
    assert "discard_ratio" in capsys.readouterr().err


def test_timm_models_open_as_they_are_with_random_weights(files, capsys):
    out = files / "swin.png"
    code = main([str(files / "scene.png"), "--model", "timm:swin_tiny_patch4_window7_224", "--random-weights",
                 "--method", "attention", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "top-5" in capsys.readouterr().out
    assert np.load(out.with_suffix(".npy")).shape == (224, 224)
    # rollout across Swin's stages is refused with the reason, in one line, status 2
    code = main([str(files / "scene.png"), "--model", "timm:swin_tiny_patch4_window7_224", "--random-weights",
                 "--method", "rollout", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "grid" in err


def test_headless_models_print_no_prediction(files, capsys):
    code = main([str(files / "scene.png"), "--model", "timm:vit_small_patch14_dinov2", "--random-weights",
                 "--method", "similarity", "--query", "3,4", "--out", str(files / "dino.png")])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "no classifier head" in text and "top-5" not in text


def test_offline_weights_advice_speaks_of_the_flag(files, capsys, monkeypatch):
    import vitviz.models.pretrained as pretrained

    monkeypatch.setenv("HF_HUB_CACHE", str(files / "empty-cache"))
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=2.0: False)
    code = main([str(files / "scene.png"), "--model", "timm:deit3_small_patch16_224", "--method", "rollout",
                 "--out", str(files / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--pretrained-file PATH" in err and "--random-weights" in err and "pretrained_file=" not in err
    import timm

    default_tag = timm.get_pretrained_cfg("deit3_small_patch16_224").tag  # a bare name means timm's default
    assert f"https://huggingface.co/timm/deit3_small_patch16_224.{default_tag}" in err


@pytest.mark.parametrize("method, flag, given, api", [
    ("attention", "--layer", "1", {"layer": 0}),
    ("attention", "--layer", "2", {"layer": 1}),
    ("attention", "--layer", "-1", {"layer": -1}),
    ("rollout", "--start-layer", "2", {"start_layer": 1}),
    ("chefer", "--start-layer", "1", {"start_layer": 0}),
])
def test_layers_count_from_one_and_reach_the_api_from_zero(files, method, flag, given, api):
    import torch

    from vitviz.checkpoint import load_checkpoint
    from vitviz.explain import explain
    from vitviz.images import fit_image, open_image, preprocess

    out = files / f"layers_{method}_{given}.png"
    assert main([str(files / "scene.png"), "--checkpoint", str(files / "vit.safetensors"), "--method", method,
                 flag, given, "--out", str(out)]) == 0
    model, meta = load_checkpoint(files / "vit.safetensors")
    x = preprocess(np.asarray(fit_image(open_image(files / "scene.png"), 32)), 32, mean=meta.mean, std=meta.std)
    with torch.no_grad() if method != "chefer" else torch.enable_grad():
        want = explain(model.eval(), x, method=method, **api)[0].numpy()
    np.testing.assert_allclose(np.load(out.with_suffix(".npy")), want, atol=1e-6)
    other = {**api, next(iter(api)): next(iter(api.values())) + (1 if next(iter(api.values())) == 0 else -1)}
    assert not np.allclose(explain(model.eval(), x, method=method, **other)[0].numpy(), want, atol=1e-4)


def test_help_says_layers_count_from_one():
    text = " ".join(build_parser().format_help().split())
    assert "--layer L" in text and "counted from 1" in text


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty Hugging Face home; huggingface_hub read its constants at import, so they follow."""
    import huggingface_hub.constants as hc

    home = tmp_path / "hf_home"
    home.mkdir()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def _one_error_line(err: str) -> bool:
    """One line of error (progress lines, "loading ...", may come before it)."""
    return [line.startswith("vitviz explain: error: ") for line in err.splitlines()][-1:] == [True] and \
        err.count("error:") == 1


def test_an_uncached_hf_hub_id_offline_gets_advice_that_can_work(files, capsys, offline_hub):
    args = [str(files / "scene.png"), "--model", "hf:google/vit-base-patch16-224", "--out", str(files / "hf.png")]
    for extra in ([], ["--random-weights"]):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert _one_error_line(err) and "Traceback" not in err, err
        assert "`hf download google/vit-base-patch16-224`" in err and "--model hf:/path/to/folder" in err
        # random weights need the config.json from the Hub too: never offered, and explained when asked for
        assert "pass --random-weights" not in err and "huggingface-cli" not in err and "create_model" not in err
        assert ("even random weights need its config.json" in err) == bool(extra), err


def test_an_hf_hub_id_with_only_its_config_cached_offers_random_weights(files, capsys, offline_hub):
    import transformers as T

    commit = "0" * 40
    base = offline_hub / "models--someone--tiny-vit"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8, num_labels=3).save_pretrained(base / "snapshots" / commit)  # config.json, no weights
    args = [str(files / "scene.png"), "--model", "hf:someone/tiny-vit", "--out", str(files / "tiny.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pass --random-weights to explore the architecture" in err and "`hf download someone/tiny-vit`" in err
    assert main(args + ["--random-weights"]) == 0, capsys.readouterr().err  # and the advice holds
    assert np.load(files / "tiny.npy").shape == (32, 32)


def test_uncached_open_clip_weights_offline_offer_a_file_or_random_weights(files, capsys, offline_hub):
    assert main([str(files / "scene.png"), "--model", "open_clip:ViT-B-32", "--pretrained", "openai", "--out",
                 str(files / "clip.png")]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) and "Traceback" not in err, err
    assert "huggingface.co/timm/vit_base_patch32_clip_224.openai" in err
    assert "--pretrained-file /path/to/open_clip_model.safetensors" in err and "--random-weights" in err
