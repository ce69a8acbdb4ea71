"""The data pipeline: where files live (store), which images are usable (discovery), aspect buckets,
the latent and text-embedding caches, the plan of samples and missing entries (plan), encoding them
(encode), and the dataset the trainer reads."""
