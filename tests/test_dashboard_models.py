"""The dashboard's *Hugging Face* and *CLIP* sources, driven with AppTest: a tiny transformers folder written here,
open_clip with random weights and its bundled tokenizer, and the offline advice in the sidebar's words."""

from __future__ import annotations

import pytest
import torch
from dashboard_fixtures import dashboard_env, start_app
from streamlit.testing.v1 import AppTest
from test_clip_prompts import hf_dual_folder
from test_dashboard import assert_clean, chart_keys, charts, errors, texts

TIMEOUT = 240


@pytest.fixture(scope="module")
def env(demo_folder, tmp_path_factory):
    import transformers as T

    vit = tmp_path_factory.mktemp("hf_vit")
    torch.manual_seed(0)
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, num_labels=2, id2label={0: "kitten", 1: "puppy"},
                         label2id={"kitten": 0, "puppy": 1})
    T.ViTForImageClassification(config).save_pretrained(vit)
    clip = tmp_path_factory.mktemp("hf_clip")
    hf_dual_folder(clip, "clip", prompts=["a dog", "a red car", "a cat"], size=32)
    with dashboard_env(demo_folder, HF_HUB_CACHE=str(tmp_path_factory.mktemp("empty_cache"))):
        yield {"vit": vit, "clip": clip}


def bars(at: AppTest) -> list[str]:
    """The texts of the probability bars (st.progress)."""
    return [p.proto.text for p in at.get("progress")]


@pytest.fixture
def app(env) -> AppTest:
    return start_app(TIMEOUT)


def test_a_hugging_face_folder_predicts_with_its_own_class_names(app, env):
    app.button_group(key="model_source").set_value("Hugging Face").run()
    assert_clean(app)
    assert "Type a hub id or a folder path" in texts(app)
    app.text_input(key="hf_source").input(str(env["vit"])).run()
    assert_clean(app)
    assert not errors(app), errors(app)
    assert "Prediction" in texts(app)
    assert {"kitten", "puppy"} <= set(" ".join(bars(app)).replace("*", "").split()), bars(app)
    methods = next(b for b in app.selectbox if str(b.key).startswith("method_"))
    assert "Relevance (Chefer et al. 2021)" in methods.options
    assert len(charts(app)) >= 2
    app.switch_page("pages/embeddings.py").run()  # Fig. 7 through the adapter: filters, positions, distances
    assert_clean(app)
    assert not errors(app), errors(app)
    assert len(charts(app)) >= 3


def test_an_offline_hub_id_gets_advice_in_the_sidebars_words(app):
    app.button_group(key="model_source").set_value("Hugging Face").run()
    app.text_input(key="hf_source").input("google/vit-base-patch16-224").run()
    assert_clean(app)
    assert not errors(app), errors(app)
    warning = " ".join(w.value for w in app.warning)
    assert "`hf download google/vit-base-patch16-224`" in warning and "huggingface-cli" not in warning
    assert "sidebar's \"Hugging Face model\" field" in warning and "create_model" not in warning
    # random weights would need the config.json from the Hub too: not offered
    assert not any("Pretrained weights* off" in i.value for i in app.info), [i.value for i in app.info]


def test_a_hugging_face_clip_folder_scores_the_typed_prompts_with_one_map_each(app, env):
    app.button_group(key="model_source").set_value("Hugging Face").run()
    app.text_input(key="hf_source").input(str(env["clip"])).run()
    app.text_area(key="hf_prompts").input("a dog\na red car\na cat").run()
    assert_clean(app)
    assert not errors(app), errors(app)
    assert "Prompt probabilities" in texts(app)
    assert all(any(f"**{p}**" in b for b in bars(app)) for p in ("a dog", "a red car", "a cat")), bars(app)
    app.toggle(key="every_prompt").set_value(True).run()
    assert_clean(app)
    assert not errors(app), errors(app)
    keys = chart_keys(app)
    assert {"prompt_map_0", "prompt_map_1", "prompt_map_2"} <= keys and "prompt_map_3" not in keys, keys


def test_clip_prompts_are_the_classes_with_one_map_per_prompt(app):
    app.button_group(key="model_source").set_value("CLIP").run()
    app.text_input(key="clip_arch").input("ViT-S-32").run()
    app.toggle(key="clip_pretrained").set_value(False).run()
    app.text_area(key="clip_prompts").input("a dog\na red car\n\na cat").run()
    assert_clean(app)
    assert not errors(app), errors(app)
    assert "Prompt probabilities" in texts(app)
    assert all(any(f"**{p}**" in b for b in bars(app)) for p in ("a dog", "a red car", "a cat")), bars(app)
    targets = next(s for s in app.selectbox if "target" in str(s.key))
    assert len(targets.options) == 4  # the predicted prompt, then each of the three
    app.toggle(key="every_prompt").set_value(True).run()
    assert_clean(app)
    assert not errors(app), errors(app)
    keys = chart_keys(app)
    assert {"prompt_map_0", "prompt_map_1", "prompt_map_2"} <= keys, keys


def test_bad_prompts_and_offline_clip_weights_are_explained(app):
    app.button_group(key="model_source").set_value("CLIP").run()
    assert_clean(app)
    assert not errors(app), errors(app)  # offline with the default "openai" tag: advice, not an error
    warning = " ".join(w.value for w in app.warning)
    assert "huggingface.co/timm/vit_base_patch32_clip_224.openai" in warning and "Weights file" in warning
    app.toggle(key="clip_pretrained").set_value(False).run()
    app.text_input(key="clip_arch").input("ViT-S-32").run()
    app.text_area(key="clip_prompts").input("a dog\na dog").run()
    assert_clean(app)
    assert any("Prompts (sidebar)" in e and "repeated: a dog" in e for e in errors(app)), errors(app)


def test_more_prompts_than_bars_says_how_many_are_shown(app, env):
    prompts = [f"a photo of thing {i}" for i in range(12)]
    app.button_group(key="model_source").set_value("Hugging Face").run()
    app.text_input(key="hf_source").input(str(env["clip"])).run()
    app.text_area(key="hf_prompts").input("\n".join(prompts)).run()
    assert_clean(app)
    assert not errors(app), errors(app)
    assert len([b for b in bars(app) if "a photo of thing" in b]) == 10
    assert any("The 10 most likely of your 12 prompts are shown." in c.value for c in app.caption)
