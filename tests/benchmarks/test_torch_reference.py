"""The PyTorch reference of the stage-2 step (benchmarks/torch_reference.py) and the throughput script's mechanics.

The reference only means something if it computes what the JAX step computes: the converter in reverse must
reproduce every network's outputs, and one stage-2 step from the same state on the same batch must give the same
losses, the same raw gradients of D, E_adv and R (the meta-auxiliary second-order term included) and the same
parameters after Adam.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import step_setup  # pylint: disable=wrong-import-position
from benchmarks import step_throughput  # pylint: disable=wrong-import-position
from benchmarks import torch_attgan  # pylint: disable=wrong-import-position
from benchmarks import torch_reference  # pylint: disable=wrong-import-position
from erasablemask_jax import convert  # pylint: disable=wrong-import-position
from erasablemask_jax import fr  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY = dict(image_size=16, batch=2, width=4, layers=3, fc_dim=8, fr=("tiny", "tiny@flip"))


@pytest.fixture(scope="module")
def tiny_setup():
  # lr_inner this large makes the Hessian term a sizeable part of E_adv's gradient, so the check can see it.
  return step_setup.Setup(step_setup.Settings(**TINY, lr_inner=2.0))


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def test_networks_equal_after_reverse_conversion(tiny_setup):
  setup = tiny_setup
  state = jax.device_get(setup.stage2_state())
  step = torch_reference.from_setup(setup)
  batch = setup.model_batch()
  x, att_b = batch["image"], batch["att_b"]
  models = setup.models

  @jax.jit
  def outputs(state, x, att_a, att_b):
    # G in inference mode, D, and the protected image with E_adv on batch statistics (as in training).
    (x_adv, x_edit), _ = models.protect(state.g.variables, state.e_adv.variables, x, att_b, train_e=True)
    logit, att = models.discriminate(state.d.variables, x)
    edit, _ = models.edit(state.g.variables, x, att_a)
    rec, _ = models.restore(state.r.variables, x_adv, att_a, train=True)
    return x_adv, x_edit, logit, att, edit, rec

  x_adv, x_edit, logit, att, edit, rec = outputs(state, x, batch["att_a"], att_b)
  with torch.no_grad():
    xt, code_a, code_b = _nchw(x), step.code(torch.from_numpy(batch["att_a"])), step.code(torch.from_numpy(att_b))
    t_adv, t_edit = step.protect(dict(step.e_adv.named_parameters()), xt, code_b, step.g.enc(xt))
    t_logit, t_att = step.d(xt)
    t_edit_a = step.g(xt, code_a)
    t_rec = step.r(_nchw(x_adv), code_a)
  for ours, theirs in ((x_adv, t_adv), (x_edit, t_edit), (edit, t_edit_a), (rec, t_rec)):
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), theirs.numpy(), atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logit), t_logit.numpy(), atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(att), t_att.numpy(), atol=2e-5, rtol=1e-4)


def test_bundled_mobilefacenet_round_trips_and_embeds_the_same():
  recogniser = fr.load_bundled("mobilefacenet")
  variables = jax.device_get(recogniser.variables)
  net = torch_attgan.build_fr("mobilefacenet", variables)
  back = convert.torch_to_flax_flat({k: v.numpy() for k, v in net.state_dict().items()})
  flat = convert.flatten_variables(variables)
  assert set(back) == set(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(back[key], np.asarray(value), err_msg=key)
  surrogate = torch_attgan.TorchSurrogate(net, recogniser.preprocessing, flip=True)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 128, 128, 3)).astype(np.float32)  # resized down, antialiased
  ours = jax.jit(recogniser.apply_fn)(recogniser.variables, jnp.asarray(x[:, :, ::-1]))
  with torch.no_grad():
    theirs = surrogate(_nchw(x)).numpy()
    folded = torch_attgan.TorchSurrogate(torch_attgan.fold_batchnorm(net), recogniser.preprocessing, flip=True)
    theirs_folded = folded(_nchw(x)).numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5)
  np.testing.assert_allclose(theirs_folded, theirs, atol=2e-5)  # "best" folds the BatchNorms, as the JAX step
  assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_reverse_conversion_names_missing_variables():
  net = torch_attgan.TinyFR(16)
  with pytest.raises(KeyError, match="Conv_1"):
    torch_attgan.flax_to_torch_state_dict(net, {"params": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 8)),
                                                                         "bias": np.zeros(8)}}})


@pytest.mark.parametrize("formulation", torch_reference.FORMULATIONS)
def test_stage2_step_same_losses_and_gradients(tiny_setup, formulation):
  # "naive": create_graph=True; "best": our forward-over-reverse algorithm through torch.func, channels_last, fused Adam.
  result = torch_reference.compare_step(tiny_setup, "meta_auxiliary", formulation)
  assert {"e/adv", "e/era", "e/perb", "d/total", "fr/1/cos"} <= set(result["metrics"])
  for name, (ours, theirs) in result["metrics"].items():
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5), name
  assert result["grad_rel_err"]["d"] < 1e-4
  assert result["grad_rel_err"]["r"] < 1e-4
  # The second-order term is visible (first order is far off) and matched (create_graph=True vs forward-over-reverse).
  assert result["grad_rel_err_first_order"] > 1e-2
  assert result["grad_rel_err"]["e_adv"] < 1e-3 * max(1.0, result["grad_rel_err_first_order"])
  lr = tiny_setup.config.optim.lr
  for net, err in result["update_rel_err"].items():
    # Adam's first update is ~lr * sign(grad): only entries whose gradient is at rounding level may differ.
    assert err < 0.05, net
    assert result["param_max_abs_err"][net] <= 2 * lr * 1.01, net


def test_stage2_step_with_folded_real_network_same_gradients():
  """The default benchmark setting: JAX with `fr.fold` and torch "best" with torch.fx's conv-BN fusion, on the bundled
  MobileFaceNet (51 BatchNorms), give the same step."""
  setup = step_setup.Setup(step_setup.Settings(
      image_size=16, batch=2, width=4, layers=3, fc_dim=8, lr_inner=2.0,
      fr=("bundled:mobilefacenet", "bundled:mobilefacenet@flip")))
  assert setup.settings.fold_bn and not jax.tree.leaves(setup.fr_vars[0].get("batch_stats", {}))
  result = torch_reference.compare_step(setup, "meta_auxiliary", "best")
  for name, (ours, theirs) in result["metrics"].items():
    # L_adv passes through the inner step at lr 2.0, which magnifies the two foldings' rounding: 2.3e-4 relative
    # measured on the pipeline's uint8 batch (the E_adv gradient below differs by up to 2.1e-2 for the same reason).
    assert ours == pytest.approx(theirs, rel=5e-4 if name == "e/adv" else 1e-4, abs=1e-5), name
  assert result["grad_rel_err"]["d"] < 1e-4 and result["grad_rel_err"]["r"] < 1e-4
  # Two different roundings of one float32 meta-gradient at a huge inner step (the real net's float32 meta-gradient is
  # itself 0.7-1.8% off float64 at lr 0.05-0.5: benchmarks/results/meta_grad_precision.json), far below the Hessian term.
  assert result["grad_rel_err_first_order"] > 0.3
  # 2.1e-2 measured once SPEC's scaled sigma1 (1.875 at 16x16) made L_perb's hinge active; still 15x below the Hessian.
  assert result["grad_rel_err"]["e_adv"] < 3e-2


def test_step_throughput_runs_sharded_with_torch_comparison(tmp_path):
  out = tmp_path / "steps.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "benchmarks.step_throughput", "--image-size", "16", "--layers", "3",
         "--width", "4", "--fc-dim", "8", "--batch", "4", "--fr", "tiny,tiny@flip", "--devices", "2",
         "--stages", "1,2:meta_auxiliary,3", "--warmup", "1", "--steps", "2",
         "--matmul", "256", "--compare-torch", "--torch-rounds", "1", "--torch-steps", "1", "--out", str(out)]
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["machine"]["num_devices"] == 2
  assert set(report["rows"]) == {"stage1", "stage2:meta_auxiliary", "stage3"}
  for name, row in report["rows"].items():
    assert row["median_s"] > 0 and row["flops"] > 0 and 0 < row["fraction_of_peak"], name
    assert len(row["times_s"]) == 2, name
  flops = {k: v["flops"] for k, v in report["rows"].items()}
  assert flops["stage2:meta_auxiliary"] > max(flops["stage1"], flops["stage3"])
  (row,) = report["torch"]
  assert row["kind"] == "meta_auxiliary" and row["torch_over_jax"] > 0 and row["torch_best_over_jax"] > 0
  assert len(row["torch_best_times_s"]) == len(row["torch_times_s"]) == len(row["torch_jax_times_s"]) == 1
  assert row["blocks"] == ["best", "naive"] and len(row["jax_times_s"]) == 2  # one pairwise block each, best first
  assert "PyTorch best" in proc.stdout and "PyTorch eager (naive)" in proc.stdout


def test_interleaved_timing_feeds_the_attack_ratios(tiny_setup):
  kinds = ["meta_auxiliary", "first_order", "ensemble"]
  result = step_throughput.measure_interleaved(tiny_setup, kinds, rounds=2, steps=1)
  assert {k: len(v) for k, v in result["times_s"].items()} == {k: 2 for k in kinds}
  rows = {f"stage2:{k}": {"median_s": 1.0, "flops": flops} for k, flops in zip(kinds, (3.0, 2.0, 1.0))}
  ratio = step_throughput._ratio(rows, "stage2:meta_auxiliary", "stage2:first_order", result)  # pylint: disable=protected-access
  medians = result["median_s"]
  assert ratio["timing"] == "interleaved"
  np.testing.assert_allclose(ratio["time_ratio"], medians["meta_auxiliary"] / medians["first_order"])
  np.testing.assert_allclose(ratio["flop_ratio"], 1.5)
  assert step_throughput._ratio(rows, "stage2:meta_auxiliary", "stage2:ensemble")["timing"] == "sequential"  # pylint: disable=protected-access


def test_meta_grad_precision_script_compares_float32_with_float64(tmp_path):
  out = tmp_path / "precision.json"
  cmd = [sys.executable, "-m", "benchmarks.meta_grad_precision", "--image-size", "16", "--width", "4",
         "--layers", "3", "--fc-dim", "8", "--fr", "tiny,tiny@flip", "--lr-inner", "2.0", "--out", str(out)]
  proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())["rows"]
  # float32 vs float64 is rounding-sized on the tiny nets, while the Hessian term is far above it.
  assert 0 < row["f32_vs_f64_rel"] < 1e-3 < row["hessian_term_rel"]
  np.testing.assert_allclose(row["l_adv_f32"], row["l_adv_f64"], rtol=1e-5)


def test_fold_bn_meta_grad_is_the_float32_step_up_to_rounding(tmp_path):
  """benchmarks/bf16_meta_grad.py --variant fold_bn: D's and R's gradients do not see the FR nets; E_adv's moves by
  float32 rounding only (the real net's float32 meta-gradient is 0.7-1.8% off float64 at these sizes)."""
  from benchmarks import bf16_meta_grad  # pylint: disable=g-import-not-at-top

  out = tmp_path / "fold_bn.json"
  assert bf16_meta_grad.main(["--image-size", "16", "--width", "4", "--layers", "3", "--batch", "2", "--fc-dim", "8",
                              "--variant", "fold_bn", "--out", str(out)]) == 0
  (row,) = json.loads(out.read_text())["rows"]
  assert row["variant"] == "fold_bn" and set(row["grad_rel_err"]) == {"d", "e_adv", "r"}
  assert row["grad_rel_err"]["d"] < 1e-6 and row["grad_rel_err"]["r"] < 1e-6
  assert 0.0 < row["grad_rel_err"]["e_adv"] < 2e-2
  for name, (unfolded, folded) in row["metrics"].items():
    # L_adv after the inner step magnifies the folding's rounding, as in the torch comparison above (3.1e-4 measured).
    assert folded == pytest.approx(unfolded, rel=5e-4 if name == "e/adv" else 1e-4, abs=1e-5), name
  with pytest.raises(ValueError, match="unknown variant"):
    bf16_meta_grad.measure(step_setup.Settings(**TINY), variant="fp8")
