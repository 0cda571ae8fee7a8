"""Sample quality: Fréchet distance and KID in the feature space of small classifiers trained on each dataset
(``metrics``), always beside the real-vs-real floor, and those feature nets (``feature_net``)."""
