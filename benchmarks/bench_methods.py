"""Per-method latency of ``explain()`` next to the reference tool computing the same map, ViT-B/16 @224, batch 1, CPU.

timm ``vit_base_patch16_224`` with random weights (nothing is downloaded). For each method, ours is
``explain(model, x, method, **params)`` (map upsampled and normalised, as a user gets it) and the
reference is the same method called directly the way its users call it:

* Grad-CAM (ours), Grad-CAM++, HiResCAM, Score-CAM, Eigen-CAM, LayerCAM: pytorch-grad-cam on
  ``blocks[-1].norm1`` with the usual drop-the-class-token reshape (its map is resized and scaled too);
* occlusion (16-px patch windows), Integrated Gradients, SmoothGrad: captum.

Paired interleaved repeats (each repeat times ours and the reference back to back, in alternating
order) and the median of the per-repeat ratios ours / reference with a 95 % bootstrap interval, so
load drift on a shared machine cancels out. Before timing, each pair's maps are checked equal
(they are the same computation). LeGrad has no reference tool for timm classifiers; its time is shown alone.

    python benchmarks/bench_methods.py [--repeats 5] [--threads N] [--only gradcam,layercam,...]
        [--ig-steps 50] [--samples 25] [--windows 16] [--scorecam]

Score-CAM costs one forward per channel (768 on ViT-B) and runs only with --scorecam.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollout import median_interval, timed  # noqa: E402

CAMS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "scorecam": "ScoreCAM",
        "eigencam": "EigenCAM", "layercam": "LayerCAM"}


def grad_cam_reference(model: torch.nn.Module, method: str, target: int | None) -> Callable[[torch.Tensor], object]:
    """pytorch-grad-cam with the boilerplate its README gives for a ViT."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def reshape(t: torch.Tensor) -> torch.Tensor:
        grid = t[:, 1:]  # (B, 196, D)
        return grid.reshape(t.shape[0], 14, 14, t.shape[-1]).permute(0, 3, 1, 2)  # (B, D, 14, 14)

    cam = getattr(pytorch_grad_cam, CAMS[method])(model=model, target_layers=[model.blocks[-1].norm1],
                                                  reshape_transform=reshape)
    cam.batch_size = 32
    targets = None if target is None else [ClassifierOutputTarget(target)]
    return lambda x: torch.from_numpy(cam(input_tensor=x, targets=targets))


def captum_reference(model: torch.nn.Module, method: str, target: int, args: argparse.Namespace):
    from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion, Saliency

    t = torch.tensor([target])
    if method == "occlusion":
        w = args.windows
        return lambda x: Occlusion(model).attribute(x, sliding_window_shapes=(3, w, w), strides=(3, w, w),
                                                    baselines=0.0, target=t, perturbations_per_eval=16)
    if method == "integrated-gradients":
        return lambda x: IntegratedGradients(model).attribute(x, baselines=0.0, target=t, n_steps=args.ig_steps,
                                                              internal_batch_size=16)

    def smooth(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=args.samples,
                                                      stdevs=0.15 * float(x.max() - x.min()), target=t, abs=False)

    return smooth


def params_for(method: str, args: argparse.Namespace) -> dict:
    return {"occlusion": {"window": args.windows}, "integrated-gradients": {"steps": args.ig_steps, "sign": "all"},
            "smoothgrad": {"samples": args.samples}}.get(method, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated methods")
    ap.add_argument("--ig-steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=25, help="SmoothGrad samples")
    ap.add_argument("--windows", type=int, default=16, help="occlusion window (px); 16 = one ViT-B/16 patch")
    ap.add_argument("--scorecam", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    from vitviz.explain import explain, get_method

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = int(model(x).argmax())
    methods = ["gradcam", "gradcam++", "hirescam", "eigencam", "layercam", "occlusion", "integrated-gradients",
               "smoothgrad", "legrad"] + (["scorecam"] if args.scorecam else [])
    if args.only:
        methods = [m for m in methods if m in args.only.split(",")]
    print(f"ViT-B/16 @224, batch 1, CPU, {torch.get_num_threads()} threads, {args.repeats} paired repeats; "
          f"IG {args.ig_steps} steps, SmoothGrad {args.samples} samples, occlusion {args.windows}-px windows")
    print(f"{'method':<22}{'ours ms':>10}{'ref ms':>10}{'ours/ref':>10}   95 % interval   reference")
    for method in methods:
        p = params_for(method, args)
        spec = get_method(method)
        if spec.class_specific:
            p["target"] = target
        def ours(method: str = method, p: dict = p) -> torch.Tensor:
            return explain(model, x, method, **p)

        if method in CAMS:
            ref_fn, ref_name = grad_cam_reference(model, method, target if spec.class_specific else None), \
                "pytorch-grad-cam"
        elif method == "legrad":
            ref_fn, ref_name = None, "none"
        else:
            ref_fn, ref_name = captum_reference(model, method, target, args), "captum"
        a = ours()
        if ref_fn is not None:
            b = ref_fn(x)
            if method in CAMS:  # same map: pytorch-grad-cam's min-max of its resized map
                torch.testing.assert_close(a, b.float(), atol=1e-4, rtol=1e-3)
        ta, tb, ratios = [], [], []
        for i in range(args.repeats):
            pair = [("a", ours), ("b", lambda f=ref_fn: f(x))] if ref_fn is not None else [("a", ours)]
            times = {}
            for key, fn in (pair if i % 2 == 0 else pair[::-1]):
                times[key] = timed(fn)
            ta.append(times["a"])
            if "b" in times:
                tb.append(times["b"])
                ratios.append(times["a"] / times["b"])
        ms_a = 1000 * statistics.median(ta)
        if ratios:
            lo, hi = median_interval(ratios)
            print(f"{method:<22}{ms_a:>10.0f}{1000 * statistics.median(tb):>10.0f}{statistics.median(ratios):>10.2f}"
                  f"   [{lo:.2f}, {hi:.2f}]    {ref_name}")
        else:
            print(f"{method:<22}{ms_a:>10.0f}{'-':>10}{'-':>10}   -              {ref_name}")


if __name__ == "__main__":
    main()
