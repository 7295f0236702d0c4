"""Every shipped config parses, names an importable objective, and inherits what its comment says."""
from pathlib import Path

import pytest
from mmengine.config import Config

from occ_mfd.builder import resolve_type

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.py") if p.parent.name != "_base_")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_parses_and_its_types_import(path):
    cfg = Config.fromfile(str(path))
    assert {"data", "objective", "optim", "train"} <= set(cfg), path
    resolve_type(cfg.objective["type"])            # a typo in a dotted type fails here, not after minutes of setup
    resolve_type(cfg.data["type"])


def test_the_teacher_and_tokenizer_options_of_the_demo_world():
    ego = Config.fromfile(str(REPO / "configs/tiny/occfm_ego.py")).objective.net
    res = Config.fromfile(str(REPO / "configs/tiny/occfm_res.py")).objective.net
    assert (ego.prior, ego.get("residual", False)) == ("cv-warp", False)
    assert (res.prior, res.residual, res.prediction, res.patch) == ("cv-warp", True, "data", 2)
    bal = Config.fromfile(str(REPO / "configs/tiny/vae_balanced.py")).objective
    assert bal.loss["class_balance"] is True and bal.vae["downsample"] == 2      # the fine VAE, balanced
    ref = Config.fromfile(str(REPO / "configs/tiny/refiner.py")).objective
    assert ref.refiner["prior"] == "cv-warp"                                    # past poses only
