"""d2v-eval: linear-probe accuracy of a d2v checkpoint or model file on labelled data (the `eval` extra).

`probe` holds the torch-free library (labelled data readers, the model-file embedder, the probe, the report, the
PCA plot); `cli` the command, `evaluate()` and the checkpoint embedder (torch, the `train` extra). Importing the
package checks for the extra first, so a missing scikit-learn or matplotlib is one line before any work.
"""

from importlib.util import find_spec

EXTRA_HINT = "pip install 'd2v[eval]'"

for _module in ("sklearn", "matplotlib"):
    if find_spec(_module) is None:
        raise ModuleNotFoundError(f"d2v.eval needs the eval extra ({_module} is missing): {EXTRA_HINT}", name=_module)
