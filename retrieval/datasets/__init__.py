"""Dataset recipes: the code that makes or reads particular datasets and writes their manifest
CSVs: the generated demo (``demo``), the emoji styles (``emoji``), copy detection's edited
queries (``copydetect``), the official layouts of the benchmarks (``converters``: CUB, Cars,
SOP, In-Shop, GLDv2, DISC2021, Revisited Oxford/Paris, SfM-120k, folders) and revisitop's
ground truth and distractor list (``gnd``). Each recipe is a ``conf/data/*.yaml``'s
``manifest._target_``. The machinery that reads any manifest (datasets, transforms, samplers,
the data module) is :mod:`retrieval.data`, below this package."""
