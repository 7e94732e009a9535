"""The data machinery that turns any manifest into batches: manifests, image opening,
preprocessing, transforms and the copy-detection edits they apply, datasets, samplers and the
data module. The recipes that make or read particular datasets are :mod:`retrieval.datasets`."""
