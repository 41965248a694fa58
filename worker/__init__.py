"""The batching worker: one process per device, owning the model."""
