"""The README's Python code blocks run as written.

Each `## ` section's ```python blocks run in order in one namespace that holds
only the section's placeholders (the data and models the text leaves to the
reader, defined below with tiny sizes), so every section imports what it uses.
All sections run in one fresh process (a MultiWorkerMirroredStrategy cannot be
created beside the test process's other strategies), in a temporary working
directory, so the files the blocks write land there. As in the other
tests, `fit` builds the optimizer before its first step
(tests/optimizer_first.py).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"

# Placeholders of each section: Python run in a namespace of its own, whose
# names listed here are handed to the section's blocks.
PLACEHOLDERS = {
    "keras_favor": (
        """
        import numpy as np
        rng = np.random.default_rng(0)
        token_ids = rng.integers(1, 20000, (8, 24))
        labels = rng.integers(0, 2, (8,))
        """,
        ["token_ids", "labels"],
    ),
    "Add FavorAttention to a Keras model": (
        """
        import keras
        import numpy as np
        inputs = keras.Input((None,), dtype="int32")
        tokens = np.random.default_rng(0).integers(1, 257, (4, 33))
        """,
        ["inputs", "tokens"],
    ),
    "FavorAttention": (
        """
        import keras
        import numpy as np
        x = np.random.default_rng(0).normal(size=(2, 12, 32)).astype("float32")
        mha = keras.layers.MultiHeadAttention(num_heads=8, key_dim=64)
        mha(x, x)
        inputs = keras.Input((12, 32))
        layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16)
        model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
        """,
        ["x", "mha", "model"],
    ),
    "Redraw features during fit": (
        """
        import keras
        import numpy as np
        import tensorflow as tf
        import keras_favor
        rng = np.random.default_rng(0)
        model = keras_favor.build_performer(
            vocabulary_size=50, max_length=16, num_layers=1, num_heads=2,
            hidden_dim=16, intermediate_dim=16, task="classification",
            num_classes=2, num_features=8, seed=0,
        )
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        dataset = tf.data.Dataset.from_tensor_slices(
            (rng.integers(1, 50, (8, 16)), rng.integers(0, 2, (8,)))
        ).batch(4)
        """,
        ["model", "dataset"],
    ),
    "Save as SavedModel and serve": (
        """
        import numpy as np
        import keras_favor
        model = keras_favor.build_performer(
            vocabulary_size=50, max_length=16, num_layers=1, num_heads=2,
            hidden_dim=16, intermediate_dim=16, task="language_model",
            num_features=8, seed=0,
        )
        token_ids = np.random.default_rng(0).integers(1, 50, (2, 10))
        """,
        ["model", "token_ids"],
    ),
    "Training with tf.distribute": (
        """
        import numpy as np
        import tensorflow as tf
        tokens = np.random.default_rng(0).integers(1, 257, (8, 17))
        dataset = tf.data.Dataset.from_tensor_slices(
            (tokens[:, :-1], tokens[:, 1:])
        ).batch(4)
        """,
        ["dataset"],
    ),
}


def python_blocks(text):
    """`(heading, code)` of each ```python block, under its `#`/`##` heading."""
    blocks, heading, fence, lines = [], "", None, []
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence is None:
            if stripped.startswith("```"):
                fence, lines = stripped[3:].strip() or "text", []
            elif line.startswith(("# ", "## ")):
                heading = line.lstrip("#").strip()
        elif stripped.startswith("```"):
            if fence == "python":
                blocks.append((heading, textwrap.dedent("\n".join(lines))))
            fence = None
        else:
            lines.append(line)
    return blocks


def sections():
    """The README's sections with Python blocks, in order, with their code."""
    code = {}
    for heading, block in python_blocks(README.read_text()):
        code.setdefault(heading, []).append(block)
    return code


def run_sections(names):
    """Runs the named sections; prints `{name: traceback or None}` as JSON."""
    import time
    import traceback

    from tests import optimizer_first

    optimizer_first.install()
    results = {}
    code = sections()
    for name in names:
        setup, exported = PLACEHOLDERS.get(name, ("", []))
        scope = {}
        start = time.process_time()
        try:
            exec(textwrap.dedent(setup), scope)
            namespace = {"__name__": "__readme__"}
            namespace.update({key: scope[key] for key in exported})
            for block in code[name]:
                exec(compile(block, f"README.md ({name})", "exec"), namespace)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
        print(
            f"{name}: {time.process_time() - start:.1f} s of CPU",
            file=sys.stderr,
        )
    print("README-RESULTS " + json.dumps(results))


def test_every_readme_section_runs(tmp_path):
    """One process for all sections (and so for one pytest worker)."""
    names = list(sections())
    assert set(PLACEHOLDERS) <= set(names) and len(names) >= 7
    # The repository root on PYTHONPATH imports `tests` (and `examples`).
    paths = [str(README.parent), os.environ.get("PYTHONPATH", "")]
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tests.integration.test_readme import run_sections; "
            "run_sections(sys.argv[1:])",
            *names,
        ],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths))),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [
        line
        for line in process.stdout.splitlines()
        if line.startswith("README-RESULTS ")
    ]
    assert process.returncode == 0 and lines, process.stderr[-4000:]
    results = json.loads(lines[-1][len("README-RESULTS ") :])
    failed = {name: error for name, error in results.items() if error}
    assert set(results) == set(names)
    assert not failed, "\n\n".join(
        f"README section {name!r}:\n{error}" for name, error in failed.items()
    )
