"""Write docs/coverage.md: every timm family in ``vitviz.coverage`` x every method and Fig. 7 analysis.

Each cell is ✓ (a finite, varied map), or "refused" with the reason vitviz gives the user. The
list is the one ``tests/test_coverage.py`` asserts on, so the table and the tests agree.

    python docs/make_coverage.py [--out docs/coverage.md]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitviz.coverage import CHECKS, COVERAGE_MODELS, build, check, conversion, input_for  # noqa: E402
from vitviz.explain import adapter_for  # noqa: E402

HEADINGS = {"attention": "attention", "rollout": "rollout", "grad-rollout": "grad-rollout", "chefer": "Chefer",
            "gradcam": "Grad-CAM", "similarity": "similarity", "legrad": "LeGrad", "attnlrp": "AttnLRP",
            "filters": "patch filters", "positions": "position sim.", "distance": "attn. distance",
            "pca": "feature PCA"}


def _general(reason: str, model: object) -> str:
    """A refusal as a footnote shared by every model it applies to: the class name made generic."""
    name = type(model).__name__
    reason = reason.split(" Methods for this model:")[0]
    reason = re.sub(rf"^{name}\b", "The model", reason).replace(f" ({name})", "")
    return reason.replace(f"not {name};", "not this architecture;")


def table() -> tuple[list[str], list[str]]:
    """(table lines, footnote lines): one row per model, refusals numbered in footnotes."""
    import timm

    head = ["family", "name", "adapter", *(HEADINGS[c] for c in CHECKS), "from_timm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reasons: dict[str, int] = {}
    for entry in COVERAGE_MODELS:
        model = build(entry)
        x = input_for(entry, batch=2)
        cells = [entry.family, f"`{entry.name}`", adapter_for(model).name]
        for what in (*CHECKS, "convert"):
            o = conversion(model, x) if what == "convert" else check(model, x, what)
            if o.status in ("ok", "n/a"):
                cells.append("✓" if o.status == "ok" else "—")
                continue
            n = reasons.setdefault(_general(o.detail, model), len(reasons) + 1)
            cells.append(f"refused [{n}]" if o.status == "refused" else f"**FAILED** [{n}]")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{n}. {reason}" for reason, n in reasons.items()]
    import open_clip
    import transformers

    versions = f"timm {timm.__version__}, transformers {transformers.__version__}, open_clip {open_clip.__version__}"
    return lines, [f"{versions}; random weights, small input sizes."] + notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    args = p.parse_args(argv)
    rows, notes = table()
    text = "\n".join([
        "# Which methods work on which models",
        "",
        "Every timm family vitviz has an adapter for, the Hugging Face image models (`hf:`, rows \"HF\") and",
        "open_clip's CLIP over typed prompts, and each method and Fig. 7 analysis on them: ✓ gives a finite",
        "map that is not constant; *refused* raises a `VitvizError` whose reason is the numbered note.",
        "`from_timm` ✓ converts the model to vitviz's own class with logits equal to timm's within 1e-4",
        "relative; otherwise the dashboard and CLI use the model as it is (— : not a timm model). For the",
        "prompt classifier, class-specific methods explain the image–text similarity of the chosen prompt.",
        "",
        "Reproduce: `python docs/make_coverage.py` (the same list `tests/test_coverage.py` checks).",
        "",
        *rows,
        "",
        notes[0],
        "",
        *notes[1:],
        "",
    ])
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)  # atomic: a reader never sees half a table
    print(f"wrote {out} ({len(rows) - 2} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
