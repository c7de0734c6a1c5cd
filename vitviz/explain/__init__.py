"""Why a model predicts what it does, and what a ViT learned.

* Models: :func:`adapter_for` finds the adapter that tells every method about a model (ours, any timm model).
* Capture: :func:`capture_attention` (every layer's attention, optionally its gradients, one pass).
* Saliency: :func:`explain` with ``method`` in :data:`METHODS`, the one registry
  (:func:`registry`: label, description, parameters, models, class-specific, cost of each method):
  attention, rollout, grad-rollout, chefer, LeGrad, Grad-CAM and the CAM family (pytorch-grad-cam),
  occlusion, RISE, Integrated Gradients, SmoothGrad; and the pure functions behind them
  (:func:`attention_rollout`, :func:`grad_rollout`, :func:`chefer_relevance`, :func:`gradcam`, :func:`legrad`).
* What a ViT learned: patch-embedding filters and their PCA, position-embedding similarity, mean
  attention distance.
* Which explanation to trust: deletion/insertion AUC, pointing game, mask IoU.
* Rendering without plotly: :func:`render_overlay`, :func:`overlay_png`.
"""

from vitviz.explain.adapters import Adapter, Tokens, adapter_for
from vitviz.explain.api import (
    FEATURE_METHODS,
    METHOD_LABELS,
    METHOD_PARAMS,
    METHODS,
    Explanation,
    explain,
    explain_details,
    methods_for,
    refusal,
)
from vitviz.explain.attention import attention_heads, attention_map, heads_map
from vitviz.explain.capture import Capture, Layer, capture_attention, has_attention, mean_heads
from vitviz.explain.distance import attention_distance, mean_attention_distance, patch_distances
from vitviz.explain.embeddings import (
    FilterPCA,
    filter_pca,
    patch_embedding_filters,
    patch_embedding_pca,
    patch_embedding_weight,
    pos_embed_similarity,
    position_embeddings,
    position_similarity,
)
from vitviz.explain.faithfulness import (
    DeletionInsertion,
    auc,
    baseline_images,
    deletion_insertion,
    mask_iou,
    pointing_game,
    random_maps,
)
from vitviz.explain.features import feature_pca, grid_features, patch_similarity
from vitviz.explain.gradcam import BaseCAM, CAMResult, GradCAM, gradcam
from vitviz.explain.layout import TokenLayout, model_family, token_layout
from vitviz.explain.legrad import legrad
from vitviz.explain.maps import normalize_maps, upsample_maps
from vitviz.explain.registry import Cost, Method, get_method, registry
from vitviz.explain.relevance import chefer_relevance
from vitviz.explain.render import COLORMAPS, apply_colormap, overlay_png, render_overlay, save_overlay_png
from vitviz.explain.rollout import HEAD_FUSIONS, attention_rollout, fuse_heads, grad_rollout, rollout_row

__all__ = [
    "COLORMAPS", "HEAD_FUSIONS", "METHODS", "METHOD_LABELS", "METHOD_PARAMS", "Adapter", "BaseCAM", "CAMResult",
    "Cost", "FEATURE_METHODS", "Method", "get_method", "legrad", "registry",
    "Capture", "Layer", "Tokens", "adapter_for", "feature_pca", "grid_features", "mean_heads", "patch_similarity",
    "refusal",
    "DeletionInsertion", "Explanation", "FilterPCA", "GradCAM", "TokenLayout", "apply_colormap", "attention_distance",
    "attention_heads", "attention_map", "attention_rollout", "auc", "baseline_images", "capture_attention",
    "chefer_relevance", "deletion_insertion", "explain", "explain_details", "filter_pca", "fuse_heads", "gradcam",
    "grad_rollout", "has_attention", "heads_map", "mask_iou", "mean_attention_distance", "methods_for",
    "model_family", "normalize_maps", "overlay_png", "patch_distances", "patch_embedding_filters",
    "patch_embedding_pca", "patch_embedding_weight", "pointing_game", "pos_embed_similarity", "position_embeddings",
    "position_similarity", "random_maps", "render_overlay", "rollout_row", "save_overlay_png",
    "token_layout", "upsample_maps",
]
