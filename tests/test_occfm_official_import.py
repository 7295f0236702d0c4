"""tools/import_occfm.py and occ_mfd.models.occfm_official.importer: fake upstream checkpoints → snapshots.

Full size: a fake checkpoint with the manifest's keys and shapes (random values, ``module.`` prefixes, an EMA copy
with ``n_averaged`` and drifted integer buffers, optimiser / epoch / scaler / scheduler entries) imports into
snapshots whose weights are the file's EMA copy, bit for bit. Reduced size: the imported teacher evaluates and
takes an MFD step. Bad input (not a checkpoint, truncated, hist weights with a fut config, missing include)
gives a clear error naming the file and writes nothing.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from occ_mfd.models.occfm_official.importer import CheckpointMismatch, import_occfm, read_upstream_checkpoint
from occ_mfd.models.occfm_official.upstream_config import UpstreamConfigError, load_upstream_yaml
from occ_mfd.models.snapshot import load_snapshot

GOLDENS = Path(__file__).parent / "goldens"
MANIFEST = GOLDENS / "occfm_state_dict_keys.tsv"


@functools.cache
def import_tool():
    """tools/import_occfm.py as a module (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("import_occfm_tool", Path(__file__).parents[1] / "tools/import_occfm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DTYPES = {"float32": torch.float32, "int64": torch.int64}


def manifest(flow_len: int = 6) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of the released world model (hist: traj encoder 192 inputs; fut: 384)."""
    out = {}
    for line in MANIFEST.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")[:3]
        out[key] = (tuple(int(n) for n in shape.split("x")) if shape else (), DTYPES[dtype])
    if flow_len == 12:
        out["transition_model.traj_encoder.0.weight"] = ((128, 384), torch.float32)
    return out


def fake_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, (shape, dtype) in shapes.items():
        if dtype.is_floating_point:
            sd[k] = torch.randn(shape, generator=g, dtype=dtype)
        else:
            sd[k] = torch.randint(0, 81, shape, generator=g, dtype=dtype)
    return sd


def upstream_file(state: dict, ema: dict | None, path: Path) -> Path:
    """What upstream's train_utils writes: DDP keys, an AveragedModel state, and training state beside them."""
    ckpt = {"state_dict": {"module." + k: v for k, v in state.items()},
            "ema_model": None if ema is None else {"n_averaged": torch.tensor(1234),
                                                   **{"module." + k: v for k, v in ema.items()}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-5}]}], "epoch": 199,
            "scaler_state_dict": {"scale": 65536.0}, "lr_scheduler": {"last_epoch": 10}}
    torch.save(ckpt, path)
    return path


def full_yaml(tmp: Path, flow_len: int) -> Path:
    """An upstream-layout tools/cfgs tree (world model including its VAE and flow net configs)."""
    cfgs = tmp / "upstream" / "tools" / "cfgs"
    (cfgs / "compressor_configs").mkdir(parents=True)
    (cfgs / "transition_configs").mkdir(parents=True)
    (cfgs / "compressor_configs" / "vae_swin_x16_h16.yaml").write_text("""MODEL:
  NAME: VaeSwinX16
  EMBEDDING: {NAME: VoxelHeightSemEmbed, NUM_CATE: 18, FEAT_DIM: 8, HEIGHT_NUM: 16,
              OCC_RANGE: [-40, -40, -1, 40, 40, 5.4], VOXEL_SIZE: [0.4, 0.4, 0.4], ENCODER_DIM: 128}
  ENCODER: {NAME: SwinSingleFrameDownV2, PATCH_EMBED_DIM: 128, IMG_SIZE: 200, PATCH_SIZE: 1, INPUT_CHANNEL: 128,
            DEPTH: [2, 6], MLP_RATIO: 4, QKV_BIAS: True, OUT_DIM: 256, USE_CHECKPOINTS: False, LATENT_DIM: 16,
            DOWNSAMPLE: ['conv', 'conv']}
  QUANTIZATION: {NAME: VaeQuant}
  DECODER: {NAME: SwinSingleFrameUpV2, INPUT_CHANNEL: 16, DEPTH: [6, 2], PATCH_EMBED_DIM: 128, OUT_DIM: 128,
            MLP_RATIO: 4, QKV_BIAS: True, USE_CHECKPOINTS: False, UPSAMPLE: ['interp', 'interp']}
""")
    (cfgs / "transition_configs" / "cfm.yaml").write_text(f"""MODEL:
  NAME: CFMOcc
  TRANSITION_MODEL: {{NAME: FLOW_MATCHING_DOWN_X4_DiT, IN_CHANNELS: 16, OUT_CHANNELS: 16, MODEL_CHANNELS: 128,
    CHANNEL_MULTI: [2, 4], INPUT_SIZE: [50, 50], TRAJECTORY_LENGTH: {flow_len}, INIT_KERNEL_SIZE: 7,
    INIT_3D_CONV_CHANNELS: 64, ATTN_DIM: 32, TEMPORAL_ATTN_HEAD: 8, SPATIAL_ATTN_HEAD: 8}}
""")
    run = tmp / "upstream" / "logs" / "occfm" / "run"    # a YAML saved beside a run, inside the checkout
    run.mkdir(parents=True)
    yml = run / "occfm.yaml"
    yml.write_text("""NAME: OccFM
COMPRESSOR_CONFIG:
    _BASE_CONFIG_: tools/cfgs/compressor_configs/vae_swin_x16_h16.yaml
    PRETRAIN_WEIGHT: logs/occfm_vae/100ep_3docc_sem_voxel/ckpt/epoch=000100.ckpt
TRANSITION_MODEL_CONFIG:
    _BASE_CONFIG_: tools/cfgs/transition_configs/cfm.yaml
LOSS: {UNCOND_P: 0.2, RESCALE_FACTOR: 10, SAMPLE_STEP: 10, ALPHA_STEP: 3, UNCOND_SCALE: 2}
""")
    return yml


@pytest.fixture(scope="module")
def full_hist(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    shapes = manifest(6)
    raw = fake_state(shapes, 0)
    ema = {k: (v + 0.01 if v.is_floating_point() else v.clone()) for k, v in raw.items()}
    drift = "encoder.net_blocks.0.blocks.0.attn.relative_position_index"
    ema[drift][:3, :] -= 1          # what AveragedModel's truncation does to integer buffers
    ckpt = upstream_file(raw, ema, tmp / "epoch=000199.ckpt")
    return tmp, full_yaml(tmp, 6), ckpt, raw, ema, drift


def test_include_resolution_walks_up_from_the_yaml(full_hist):
    tmp, yml, *_ = full_hist
    cfg = load_upstream_yaml(yml)
    assert cfg["COMPRESSOR_CONFIG"]["MODEL"]["ENCODER"]["DEPTH"] == [2, 6]
    assert cfg["COMPRESSOR_CONFIG"]["PRETRAIN_WEIGHT"].endswith("epoch=000100.ckpt")   # the includer's key kept
    assert cfg["TRANSITION_MODEL_CONFIG"]["MODEL"]["TRANSITION_MODEL"]["TRAJECTORY_LENGTH"] == 6


def test_missing_include_names_the_yaml_and_the_include(tmp_path):
    yml = tmp_path / "occfm.yaml"
    yml.write_text("COMPRESSOR_CONFIG:\n  _BASE_CONFIG_: tools/cfgs/compressor_configs/nope.yaml\n")
    with pytest.raises(UpstreamConfigError, match=r"occfm.yaml: _BASE_CONFIG_ 'tools/cfgs/compressor_configs/nope"):
        load_upstream_yaml(yml)


def test_full_size_import_loads_the_ema_copy_bit_for_bit(full_hist, tmp_path):
    main = import_tool().main
    tmp, yml, ckpt, raw, ema, drift = full_hist
    out = tmp_path / "imported"
    assert main(["--ckpt", str(ckpt), "--config", str(yml), "--out", str(out)]) == 0
    report = json.loads((out / "import.json").read_text())
    assert report["variant"] == "hist" and report["weights"] == "ema" and report["epoch"] == 199
    assert report["int_buffer_diffs_ema_vs_raw"] == {drift: 3 * 25}
    teacher = load_snapshot(out / "teacher.pt")
    assert teacher.kind == "teacher" and teacher.sampler.to_dict() == {"steps": 10, "shift": 3.0, "cfg_scale": 2.0}
    assert teacher.latent_scale == 10.0
    assert teacher.data == {"pool": 1, "past": 4, "future": 6, "z_convention": "occ3d"}
    vae_w, net_w = teacher.weights["vae"], teacher.weights["net"]
    assert len(vae_w) == 403
    for k, v in ema.items():           # every tensor is the file's EMA copy, bit for bit (drifted buffer included)
        if k.startswith("transition_model."):
            ours = net_w[next(n for n in net_w if n.endswith(k.removeprefix("transition_model.")))]
        else:
            ours = vae_w[k]
        assert torch.equal(ours, v), k
    assert torch.equal(load_snapshot(out / "vae.pt").weights["vae"][drift], ema[drift])
    # --weights raw takes state_dict instead
    imp = import_occfm(ckpt, yml, weights="raw")
    assert torch.equal(imp.vae.state_dict()[drift], raw[drift]) and imp.weights.used == "raw"


def test_hist_checkpoint_with_a_fut_config_names_the_key(full_hist, tmp_path):
    main = import_tool().main
    tmp, _, ckpt, *_ = full_hist
    fut_yaml = full_yaml(tmp_path, 12)
    out = tmp_path / "out"
    with pytest.raises(CheckpointMismatch, match=r"traj_encoder.0.weight.*hist variant but the config describes fut"):
        import_occfm(ckpt, fut_yaml)
    assert main(["--ckpt", str(ckpt), "--config", str(fut_yaml), "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("what", ["not_a_checkpoint", "truncated", "foreign_dict", "missing_key"])
def test_bad_files_are_named_and_nothing_is_written(full_hist, tmp_path, what, capsys):
    main = import_tool().main
    tmp, yml, ckpt, raw, *_ = full_hist
    bad = tmp_path / "bad.ckpt"
    if what == "not_a_checkpoint":
        bad.write_text("hello")
        match = "cannot be read as a torch checkpoint"
    elif what == "truncated":
        bad.write_bytes(ckpt.read_bytes()[: 1 << 20])
        match = "cannot be read as a torch checkpoint"
    elif what == "foreign_dict":
        torch.save({"model": {"w": torch.zeros(1)}}, bad)
        match = "not an OccFM checkpoint"
    else:
        state = dict(raw)
        del state["decoder.conv_out.weight"]
        upstream_file(state, None, bad)
        match = "lacks key 'decoder.conv_out.weight'"
    with pytest.raises(CheckpointMismatch, match=match) as e:
        import_occfm(bad, yml)
    assert str(bad) in str(e.value)
    out = tmp_path / "out"
    assert main(["--ckpt", str(bad), "--config", str(yml), "--out", str(out)]) == 2
    assert str(bad) in capsys.readouterr().err and not out.exists()


def test_a_file_without_ema_falls_back_to_raw_and_says_so(tmp_path):
    shapes = {k: v for k, v in manifest(6).items() if not k.startswith("transition_model.")}
    raw = fake_state(shapes, 1)
    path = upstream_file(raw, None, tmp_path / "vae.ckpt")
    w = read_upstream_checkpoint(path, "ema")
    assert w.used == "raw" and "no ema_model copy" in w.note and not w.flow and len(w.vae) == 403
    assert torch.equal(w.vae["embedding.class_embeds.weight"], raw["embedding.class_embeds.weight"])


# ------------------------------------------------------------------ reduced size: verify, evaluate, distil
WORLD = GOLDENS / "occfm_world_reduced.yaml"


def reduced_world_checkpoint(path: Path, perturb: str | None = None) -> Path:
    """A fake upstream world-model file of occfm_world_reduced.yaml with key-derived weights (the goldens' weights:
    its flow net is the one of occfm_flow_hist_golden.npz); ``perturb``: a flow-net key to shift by 0.1."""
    from occ_mfd.models.occfm_official.adapter import OccFmForecaster
    from occ_mfd.models.occfm_official.key_init import fill_from_keys
    from occ_mfd.models.occfm_official.vae import OccFmVAE

    cfg = load_upstream_yaml(WORLD)
    vae, net = fill_from_keys(OccFmVAE.from_upstream_config(cfg)), OccFmForecaster.from_upstream_config(cfg)
    fill_from_keys(net.net)                  # keys without the adapter's "net." prefix, as upstream names them
    state = {**vae.state_dict(), **{"transition_model." + k: v for k, v in net.net.state_dict().items()}}
    if perturb:
        state["transition_model." + perturb] = state["transition_model." + perturb] + 0.1
    return upstream_file(state, state, path)


@pytest.fixture(scope="module")
def imported_world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("world")
    out = tmp / "imported"
    rc = import_tool().main(["--ckpt", str(reduced_world_checkpoint(tmp / "wm.ckpt")), "--config", str(WORLD),
                             "--out", str(out), "--verify", str(GOLDENS / "occfm_flow_hist_golden.npz")])
    assert rc == 0
    return tmp, out


def test_verify_against_the_upstream_goldens_passes_and_a_wrong_weight_fails(imported_world, tmp_path, capsys):
    tmp, out = imported_world
    assert (out / "teacher.pt").is_file() and (out / "vae.pt").is_file()
    bad = reduced_world_checkpoint(tmp_path / "bad.ckpt", perturb="final_conv.1.weight")
    dest = tmp_path / "out"
    capsys.readouterr()
    assert import_tool().main(["--ckpt", str(bad), "--config", str(WORLD), "--out", str(dest),
                               "--verify", str(GOLDENS / "occfm_flow_hist_golden.npz")]) == 1
    text = capsys.readouterr()
    assert "v       max |Δ|" in text.out and "FAILED" in text.out and "nothing written" in text.err
    assert not dest.exists()


def test_vae_only_import_verifies_against_the_vae_golden(tmp_path, capsys):
    from occ_mfd.models.occfm_official.key_init import fill_from_keys
    from occ_mfd.models.occfm_official.vae import OccFmVAE

    yml = GOLDENS / "occfm_vae_reduced.yaml"
    vae = fill_from_keys(OccFmVAE.from_upstream_config(load_upstream_yaml(yml)))
    ckpt = upstream_file(vae.state_dict(), None, tmp_path / "vae.ckpt")
    assert import_tool().main(["--ckpt", str(ckpt), "--config", str(yml), "--out", str(tmp_path / "o"),
                               "--verify", str(GOLDENS / "occfm_vae_golden.npz")]) == 0
    printed = capsys.readouterr().out
    errs = {line.split()[2]: float(line.split("=")[1].split()[0]) for line in printed.splitlines() if "max |Δ|" in line}
    assert set(errs) == {"mu", "logvar", "logits"} and max(errs.values()) < 1e-5
    assert (tmp_path / "o/vae.pt").is_file() and not (tmp_path / "o/teacher.pt").exists()


def _lidar_dataset(root: Path, grid, n_frames: int = 11) -> Path:
    """One val scene on ``grid`` with moving poses and a LIDAR_TOP calibration (the imported net needs it)."""
    from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, save_index
    from occ_mfd.data.occ3d import OccFrame, labels_path, write_labels

    calib = [[0, 1, 0, 0.94], [-1, 0, 0, 0.0], [0, 0, 1, 1.84], [0, 0, 0, 1]]
    frames = []
    for k in range(n_frames):
        rng = np.random.default_rng(k)
        sem = np.where(rng.random(grid.shape) < 0.7, 17, rng.integers(0, 17, grid.shape)).astype(np.uint8)
        write_labels(labels_path(root, "s0", f"t{k}"), OccFrame(sem, np.ones_like(sem), np.ones_like(sem)), grid)
        pose = np.eye(4)
        pose[0, 3] = 1.5 * k
        frames.append(FrameEntry(f"t{k}", 1_000_000 + 500_000 * k, pose, {"lidar2ego": calib}))
    save_index(root, DatasetIndex(grid, [SceneEntry("s0", "val", frames)], {"type": "test"}))
    return root


def test_imported_teacher_evaluates_and_distils(imported_world):
    import subprocess
    import sys

    from occ_mfd.data.records import collate_sequences
    from occ_mfd.data.sequences import OccSequenceDataset
    from occ_mfd.grid import GridSpec
    from occ_mfd.objectives.mfd import OccMeanFlowDistillation

    tmp, out = imported_world
    grid = GridSpec((-8.0, -8.0, -1.0), (8.0, 8.0, 5.4), 0.4)
    data = _lidar_dataset(tmp / "data", grid)
    res = tmp / "r.json"
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools/eval.py"), "--threads", "1",
                        "--data", str(data), "--model", f"{out / 'teacher.pt'}:steps=2", "--out", str(res)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(res.read_text())["rows"][0]
    assert row["name"] == "teacher" and (row["steps"], row["nfe"]) == (2, 2)
    assert all(0.0 <= v <= 100.0 for v in row["iou"].values())
    # MFD starts from the imported teacher: the one-step student is the teacher's Euler jump at initialisation,
    # and one aux and one student update run on the OccFM trajectory condition.
    obj = OccMeanFlowDistillation(teacher_snapshot=str(out / "teacher.pt"), max_substep=0.5)
    batch = collate_sequences([OccSequenceDataset(data, "val", mask=None)[0]])
    x1, cond = obj.prepare(batch)
    assert cond.lidar_traj.shape == (1, 10, 2) and abs(float(cond.lidar_traj[0, 0, 1]) - 1.5) < 1e-5
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(obj.generate(x0, cond), x0 + obj.teacher(x0, torch.zeros(1), cond), atol=1e-5)
    for phase in ("aux", "student"):
        loss = obj(batch, phase).loss
        assert torch.isfinite(loss)
        loss.backward()
    grads = [p.grad for p in obj.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # bench rebuilds the teacher's training stage from the config the import stored in the snapshot
    bench = tmp / "bench.json"
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools/bench.py"), "--teacher",
                        str(out / "teacher.pt"), "--data", str(data), "--steps", "1", "--runs", "1", "--warmup", "0",
                        "--threads", "1", "--train-runs", "1", "--train-warmup", "0", "--out", str(bench)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    b = json.loads(bench.read_text())
    assert b["training_steps_ms"]["teacher_fm"]["nfe"] == 1


# ------------------------------------------------------------------------------ configs/occfm_official
@pytest.mark.parametrize("name,params", [("vae", 18_537_456), ("teacher_hist", 11_830_416),
                                          ("teacher_fut", 11_854_992)])
def test_official_configs_build_the_release_sizes(name, params):
    from mmengine.config import Config

    from occ_mfd.builder import build

    cfg = Config.fromfile(str(Path(__file__).parents[1] / f"configs/occfm_official/{name}.py"))
    spec = cfg.objective.vae if name == "vae" else cfg.objective.net
    with torch.device("meta"):
        module = build(spec.to_dict())
    assert sum(p.numel() for p in module.parameters()) == params


@pytest.mark.parametrize("name,teacher", [("mfd_hist", "hist/teacher.pt"), ("mfd_fut", "fut/teacher.pt")])
def test_official_mfd_configs_point_at_the_imported_teacher(name, teacher):
    from mmengine.config import Config

    cfg = Config.fromfile(str(Path(__file__).parents[1] / f"configs/occfm_official/{name}.py"))
    assert cfg.objective.teacher_snapshot == f"work_dirs/occfm_official/{teacher}"
    assert (cfg.data.past, cfg.data.future, cfg.data.pool) == (4, 6, 1)
    assert cfg.objective.max_substep == 0.02 and cfg.optim.student.lr == 1e-4
