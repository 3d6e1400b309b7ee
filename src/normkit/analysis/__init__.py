"""Analysis of normalization (book ch. 9): scale invariance, conditioning, stochasticity and
representation, as tools that run on any torch model."""
