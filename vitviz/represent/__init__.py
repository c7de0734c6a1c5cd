"""Compare what models represent: centred kernel alignment (CKA) of layer features.

* :func:`cka`: linear CKA of two (n, d) feature matrices (Kornblith et al. 2019).
* :class:`MinibatchCKA`: the unbiased minibatch estimator of Nguyen, Raghu & Kornblith (2021), so
  that a dataset never has to fit in memory: feed batches, read the grid of every layer pair.
"""

from vitviz.represent.cka import MinibatchCKA, cka, unbiased_hsic

__all__ = ["MinibatchCKA", "cka", "unbiased_hsic"]
