"""synthgen: synthetic data augmentation for scarce or imbalanced labeled image datasets (see README.md)."""
