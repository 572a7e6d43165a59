"""The step benchmark (perf/step_speed.py) on the tiny config: its figure of merit is the
ratio it says it is, computed from the quantities it reports."""

import json

import pytest

from perf import step_speed


def test_step_speed_reports_examples_per_gflop_s_of_the_measured_peak(tmp_path):
  out = tmp_path / "speed.json"
  report = step_speed.main(["--config", "configs/tiny.py", "--steps", "1", "--warmup_steps",
                            "0", "--peak_dim", "256", "--variant", "fp32:",
                            "--variant", "bf16:model.encoder.compute_dtype=bfloat16",
                            "--json_out", str(out)])
  assert json.loads(out.read_text())["variants"].keys() == {"fp32", "bf16"}
  for name, r in report["variants"].items():
    assert r["step_flops"] > 0 and r["examples_per_s"] > 0, name
    assert r["examples_per_s_per_gflop_s"] == pytest.approx(
        r["examples_per_s"] / r["fp32_peak_gflop_s"])
    assert r["share_of_fp32_peak"] == pytest.approx(
        r["examples_per_s"] * r["gflop_per_example"] / r["fp32_peak_gflop_s"])
  assert report["variants"]["bf16"]["overrides"] == ["model.encoder.compute_dtype=bfloat16"]


def test_step_speed_refuses_a_variant_without_a_name():
  with pytest.raises(SystemExit):
    step_speed.main(["--variant", "model.encoder.compute_dtype=bfloat16"])


def test_perf_configs_are_pointed_at_their_protocol_as_main_trains_them():
  """The perf scripts time the config ``main`` trains: the recipe's fields for the config's
  protocol applied, a ``KEY=VALUE`` override winning over them."""
  from perf import pipeline_vs_step   # pylint: disable=import-outside-toplevel
  config = pipeline_vs_step.load_config("configs/movielens.py:size=small,recipe=dot,protocol=loo",
                                        ["model.user.recent=4"])
  assert config.protocol_fields_for == "loo"
  assert config.data.example == "next" and config.model.user.causal
  assert config.model.user.recent == 4
  warm = pipeline_vs_step.load_config("configs/movielens.py:size=small,recipe=dot", [])
  assert warm.data.example == "cloze" and not warm.model.user.causal
