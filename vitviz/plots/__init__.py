"""Plotly figures from numpy arrays: explanations (``plots.explain``) and training results (``plots.training``).

No Streamlit and no models in here: pages and scripts hand in arrays and get ``go.Figure`` back.
"""

from vitviz.plots.explain import *  # noqa: F403
from vitviz.plots.explain import __all__ as _explain_all
from vitviz.plots.training import *  # noqa: F403
from vitviz.plots.training import __all__ as _training_all

__all__ = [*_explain_all, *_training_all]
