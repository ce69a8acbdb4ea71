"""The data pipeline: where files live (store), which images are usable (discovery), aspect buckets,
the latent and text-embedding caches, encoding them (encode), and the dataset the trainer reads."""
