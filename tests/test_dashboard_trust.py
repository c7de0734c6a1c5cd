"""The trust panel (dashboard/trust_panel.py) driven with AppTest: Explore on request, Compare on an image
and on the bundled sample, slow methods only when asked, the sanity check on the sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dashboard_fixtures import dashboard_env, start_app
from streamlit.testing.v1 import AppTest

TIMEOUT = 300


@pytest.fixture(scope="module")
def app(demo_folder, tmp_path_factory):
    with dashboard_env(demo_folder, results=tmp_path_factory.mktemp("results")):
        yield start_app(TIMEOUT)


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not [e.value for e in at.error]


def table(at: AppTest):
    """The trust table (the one dataframe with a ROAD column)."""
    found = [d.value for d in at.dataframe if "ROAD AUC ↓" in d.value.columns]
    assert len(found) == 1, f"{len(found)} trust tables"
    return found[0]


def fast_and_slow(name: str) -> tuple[list[str], list[str]]:
    from vitviz.checkpoint import load_checkpoint
    from vitviz.explain import methods_for
    from vitviz.explain.trust import is_slow

    model, meta = load_checkpoint(Path(os.environ["VITVIZ_CHECKPOINTS"]) / f"{name}.safetensors", "cpu")
    methods = methods_for(model, saliency_only=True)
    slow = [m for m in methods if is_slow(m, model, meta.img_size, meta.img_size)]
    return [m for m in methods if m not in slow], slow


def test_explore_scores_every_method_on_request(app):
    assert not [d for d in app.dataframe if "ROAD AUC ↓" in d.value.columns], "nothing is scored until asked"
    app.toggle(key="trust_here").set_value(True).run()
    clean(app)
    fast, slow = fast_and_slow("vit_shapes")
    rows = table(app)
    assert len(rows) == len(fast) and list(rows["Rank"]) == list(range(1, len(fast) + 1))
    assert {"Deletion AUC ↓", "Insertion AUC ↑", "ROAD AUC ↓", "Pointing game ↑", "Cost"} <= set(rows.columns)
    assert all(" vs " in cell for cell in rows["ROAD AUC ↓"])  # random maps beside every number
    assert not any("[" in cell for cell in rows["Deletion AUC ↓"])  # one image: no interval to show
    verdicts = [m.value for m in [*app.success, *app.warning] if "Trust" in m.value]
    assert len(verdicts) == 1 and "for this model" in verdicts[0]
    assert slow, "the demo ViT has slow methods (RISE, occlusion, ...)"
    app.toggle(key="trust_here_slow").set_value(True).run()
    clean(app)
    assert len(table(app)) == len(fast) + len(slow)


def test_compare_scores_every_model_and_the_sample(app):
    app.switch_page("pages/compare.py").run()
    clean(app)
    rows = table(app)
    expected = sum(len(fast_and_slow(f"{family}_shapes")[0]) for family in ("vit", "hybrid", "resnet"))
    assert len(rows) == expected and len(set(rows["Family"])) == 3
    assert set(rows["Sanity ρ ↓"]) == {"—"}  # no sanity check on one image
    assert sum("for this model" in m.value for m in app.markdown) == 3  # a verdict per model
    app.button_group(key="faith_set").set_value("set").run()
    app.toggle(key="trust_sanity").set_value(True).run()
    clean(app)
    rows = table(app)
    assert "—" not in set(rows["Sanity ρ ↓"])  # every method's sanity check is reported
    assert all("[" in cell for cell in rows["Deletion AUC ↓"])  # 8 images: bootstrap intervals


def test_compare_has_one_slow_methods_toggle_for_every_model(app):
    app.switch_page("pages/compare.py").run()
    clean(app)
    toggles = [t for t in app.toggle if t.label.startswith("Include the slow methods")]
    assert [t.key for t in toggles] == ["trust_slow"]
    app.toggle(key="trust_slow").set_value(True).run()
    clean(app)
    expected = sum(len(fast) + len(slow) for fast, slow in (fast_and_slow(f"{family}_shapes")
                                                           for family in ("vit", "hybrid", "resnet")))
    assert len(table(app)) == expected
