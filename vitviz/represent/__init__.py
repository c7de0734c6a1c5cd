"""Compare what models represent, layer by layer (Raghu et al., "Do Vision Transformers See Like CNNs?").

* :func:`layer_features`: every block's / stage's output in one forward pass, through the model
  adapters (transformers: readout and patch tokens; CNNs: the map and its spatial mean).
* :func:`cka`: linear centred kernel alignment (Kornblith et al. 2019); :class:`MinibatchCKA`: the
  unbiased minibatch estimator of Nguyen, Raghu & Kornblith (2021), so a dataset never has to fit in
  memory; :func:`cka_matrix`: the (layers_a x layers_b) grid of two models, streamed in batches
  (sharded over ``torchrun`` processes).
* :func:`probe_layers` (linear probes by depth), :func:`logit_lens`, :func:`embed_2d` (t-SNE / UMAP),
  :func:`error_gallery`; :func:`run_report` runs them all (``vitviz represent``).
"""

from vitviz.represent.cka import MinibatchCKA, cka, unbiased_hsic
from vitviz.represent.embedding import embed_2d
from vitviz.represent.features import collect_readouts, layer_features, layer_labels
from vitviz.represent.gallery import error_gallery
from vitviz.represent.lens import logit_lens
from vitviz.represent.matrix import CKAResult, cka_matrix
from vitviz.represent.probes import probe_layers
from vitviz.represent.report import run_report
from vitviz.represent.subjects import Subject, load_subject

__all__ = [
    "CKAResult", "MinibatchCKA", "Subject", "cka", "cka_matrix", "collect_readouts", "embed_2d", "error_gallery",
    "layer_features", "layer_labels", "load_subject", "logit_lens", "probe_layers", "run_report", "unbiased_hsic",
]
