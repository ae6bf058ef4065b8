"""benchmarks/rows_rnn_baseline.py: the prototypical rows-LSTM baseline beside MetaNet's
`omniglot_rows_rnn` (its logits by hand; a run on synthetic data writes its JSON and the
side-by-side ablation table the report renders)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments import reporting

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "rows_rnn_baseline.py"


def _module():
    spec = importlib.util.spec_from_file_location("rows_rnn_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its Flax module (a dataclass) looks itself up there
    spec.loader.exec_module(module)
    return module


def test_prototype_logits_are_minus_squared_distances_to_the_class_means():
    module = _module()

    class Identity:  # an encoder that returns the flattened input
        def apply(self, _variables, x):
            return x.reshape(x.shape[0], -1)

    support_x = jnp.asarray([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]).reshape(3, 1, 2, 1)
    support_y = jnp.asarray([0, 0, 1])
    query_x = jnp.asarray([[1.0, 1.0]]).reshape(1, 1, 2, 1)
    got = module.prototype_logits(Identity(), {}, support_x, support_y, query_x, 2)
    # class 0's mean (1, 0): distance^2 1; class 1's (0, 4): 1 + 9 = 10.
    np.testing.assert_allclose(got, [[-1.0, -10.0]])


def test_a_short_run_on_synthetic_data_writes_its_results_and_the_table(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text(
        "\n".join(
            [
                "--dataset=synthetic",
                "--synthetic_size=6",
                "--ways=3",
                "--shots=1",
                "--queries_per_class=2",
                "--eval_queries_per_class=2",
                "--architecture=rows_lstm",
                "--hidden_units=4",
                "--rotate",
                "--eval_episodes=6",
                "--test_episodes=8",
                "--eval_batch=4",
                "--learning_rate=0.002",
                "--workdir=workdirs/x",
            ]
        )  # fmt: skip
    )
    run = tmp_path / "metanet"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "steps": 10, "wall_time_s": 12.5, "best_validation_accuracy": 0.5, "evaluated_step": 10,
        "test_accuracy": 0.6, "test_ci95": 0.05, "test_episodes": 8,
        "config": {"eval_episodes": 6},
    }))  # fmt: skip
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "validation_accuracy": 0.5, "validation_ci95": 0.04}) + "\n"
    )
    out, table = tmp_path / "baseline.json", tmp_path / "table.json"
    _module().main([
        f"--run_flagfile={flagfile}", "--seconds=0.001", "--eval_every=3", f"--out={out}",
        f"--metanet_run={run}", f"--ablation={table}",
    ])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["evaluated_step"] == 3  # the first validation
    assert result["test_episodes"] == 8 and result["test_ways"] == 3
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["test_ci95"] > 0
    assert [p["step"] for p in result["learning_curve"]] == [3]
    value = json.loads(table.read_text())
    reporting.check_ablation(value, str(table))
    names = [r["name"] for r in value["rows"]]
    assert names == ["MetaNet, rows_lstm", "prototypical baseline"]
    assert value["rows"][0]["val_ci95"] == 0.04 and value["rows"][1]["steps"] == 3
