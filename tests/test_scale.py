"""Similarity-scale detection and the β-looks-wrong warnings of probe and normalise."""

from __future__ import annotations

import json

import numpy as np
import tolerance as tol
from conftest import read_h5

from qbnorm_cli.core import scale
from qbnorm_cli.core.scale import ScoreStats

COSINE = ScoreStats(0.62, 0.93, 0.76, 0.029)        # the shared e5 data
LOGITS = ScoreStats(62.0, 93.0, 76.0, 2.9)          # the same ×100 (CLIP logit scale)


def test_classify():
    assert scale.classify(COSINE) == "cosine"
    assert scale.classify(ScoreStats(-1.0, 1.0, 0.0, 0.5)) == "cosine"
    assert scale.classify(LOGITS) == "logits"
    assert scale.classify(ScoreStats(-12.0, 35.0, 20.0, 4.0)) == "logits"
    assert scale.classify(ScoreStats(-3000.0, -10.0, -900.0, 300.0)) == "other"
    assert scale.classify(ScoreStats(0.0, 2.5, 1.0, 0.3)) == "other"


def test_beta_warning_high_side_suggests_the_equivalent_beta():
    assert scale.beta_warning(20, COSINE) is None
    assert scale.beta_warning(100, COSINE) is None
    message = scale.beta_warning(20, LOGITS)
    assert message is not None and "β·std = 58" in message
    assert "CLIP-style logits" in message
    assert "β ≈ 0.207" in message  # 20 × 0.03 / 2.9: the β=20-for-cosine equivalent
    assert scale.equivalent_beta(20, LOGITS) == tol.approx64(20 * 0.03 / 2.9, 3)


def test_beta_warning_low_side_and_gallery_beta():
    message = scale.beta_warning(0.2, COSINE)
    assert message is not None and "far below" in message and "logits" in message
    assert scale.beta_warning(0.2, COSINE, check_low=False) is None
    assert scale.beta_warning(1.0, LOGITS) is None
    assert scale.beta_warning(20, None) is None
    assert scale.beta_warning(20, ScoreStats(1, 1, 1, 0.0)) is None


def test_beta_grid_follows_the_scale():
    base = (1, 10, 100)
    assert scale.beta_grid(base, COSINE) == [1.0, 10.0, 100.0]
    widened = scale.beta_grid(base, LOGITS)
    assert set(base) <= set(widened) and min(widened) == 0.0103  # 1 × 0.03/2.9, to 3 digits
    assert scale.beta_grid(base, None) == [1.0, 10.0, 100.0]


def test_sample_stats_reads_a_sample_of_rows(tmp_path):
    from qbnorm_cli.io.specs import open_array
    from qbnorm_cli.streaming.sources import MatrixScores, sample_stats

    sims = np.linspace(-1, 1, 600 * 7, dtype=np.float32).reshape(600, 7)
    np.save(tmp_path / "s.npy", sims)
    stats = sample_stats(MatrixScores(open_array(str(tmp_path / "s.npy"))), rows=50)
    assert -1 <= stats.min < -0.9 and 0.9 < stats.max <= 1 and scale.classify(stats) == "cosine"


def _logit_dumps(tmp_path, factor):
    rng = np.random.default_rng(3)
    bank = rng.uniform(0.2, 0.5, (40, 12)).astype(np.float32) * factor
    queries = rng.uniform(0.2, 0.5, (9, 12)).astype(np.float32) * factor
    np.save(tmp_path / "bank_sims.npy", bank)
    np.save(tmp_path / "sims.npy", queries)


def test_probe_and_normalise_warn_on_logits_with_cosine_beta(tmp_path, cli):
    _logit_dumps(tmp_path, 100.0)
    probe = tmp_path / "probe.h5"
    code, _, err = cli("probe", "--bank-sims", tmp_path / "bank_sims.npy", "-o", probe, "--beta", 20, "--beta", 0.3)
    assert code == 0
    assert err.count("qbnorm: warning: --beta 20 looks wrong") == 1 and "--beta 0.3 looks" not in err
    assert read_h5(probe)["attrs"]["score_scale"] == "logits"
    out = tmp_path / "is.h5"
    code, _, err = cli("normalise", "--probe", probe, "--sims", tmp_path / "sims.npy", "-o", out,
                       "--method", "is", "--beta", 20)
    assert code == 0 and "--beta 20 looks wrong" in err
    assert read_h5(out)["attrs"]["score_scale"] == "logits"
    code, _, err = cli("normalise", "--probe", probe, "--sims", tmp_path / "sims.npy", "-o", tmp_path / "b.h5",
                       "--method", "is", "--beta", 0.3, "--quiet")
    assert code == 0 and err == ""


def test_normalise_warns_when_queries_and_bank_scales_differ(tmp_path, cli):
    _logit_dumps(tmp_path, 1.0)
    probe = tmp_path / "probe.h5"
    cli.ok("probe", "--bank-sims", tmp_path / "bank_sims.npy", "-o", probe, "--beta", 20)
    assert read_h5(probe)["attrs"]["score_scale"] == "cosine"
    np.save(tmp_path / "logits.npy", 100 * np.load(tmp_path / "sims.npy"))
    code, _, err = cli("normalise", "--probe", probe, "--sims", tmp_path / "logits.npy", "-o", tmp_path / "x.h5")
    assert code == 0 and "score queries and bank the same way" in err


def test_quiet_is_silent_on_success_and_warnings_are_recorded(tmp_path, cli):
    """--quiet prints nothing, warnings included; they are in the --json document and the output."""
    _logit_dumps(tmp_path, 100.0)
    probe = tmp_path / "probe.h5"
    code, out, err = cli("probe", "--bank-sims", tmp_path / "bank_sims.npy", "-o", probe, "--beta", 20,
                         "--quiet", "--json")
    assert code == 0 and err == ""
    [warning] = json.loads(out)["warnings"]
    assert warning.startswith("--beta 20 looks wrong")
    assert json.loads(read_h5(probe)["attrs"]["warnings"]) == [warning.replace("--beta", "beta")]
    out_file = tmp_path / "is.h5"
    code, out, err = cli("normalise", "--probe", probe, "--sims", tmp_path / "sims.npy", "-o", out_file,
                         "--method", "is", "--beta", 20, "-q", "--json")
    assert code == 0 and err == "" and "--beta 20 looks wrong" in json.loads(out)["warnings"][0]
    assert "beta 20 looks wrong" in json.loads(read_h5(out_file)["attrs"]["warnings"])[0]
    np.save(tmp_path / "wide.npy", np.ones((3, 5000), dtype=np.float32))
    code, out, err = cli("convert", tmp_path / "wide.npy", "-o", tmp_path / "wide.h5", "-q", "--json")
    assert code == 0 and err == "" and "--kind similarity" in json.loads(out)["warnings"][0]
    assert "kind='similarity'" in json.loads(read_h5(tmp_path / "wide.h5")["attrs"]["warnings"])[0]
    code, out, err = cli("convert", tmp_path / "sims.npy", "-o", tmp_path / "quiet.h5", "--json")
    assert code == 0 and json.loads(out)["warnings"] == []
    assert json.loads(read_h5(tmp_path / "quiet.h5")["attrs"]["warnings"]) == []
