"""Built-in multi-crop augmentation pipelines (registered as plugins, see :mod:`.multicrop`)."""
