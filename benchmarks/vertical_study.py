"""Hills and vertical conventions: label quality without / with the recovered vertical pose, and conventions.

    python benchmarks/vertical_study.py --work /tmp/vstudy [--scenes 1 --keyframes 12 --sweeps 2 --seed 0] \
        [--real ../shared/nuscenes_real] [--figure docs/vertical_conventions.png] [--out /tmp/vstudy/study.json]

1. Makes a flat and a hilly synthetic world with exact truth (the same seed: the same towns and agents; the
   hilly one is draped on slopes up to 8 % and writes 2-D ego poses, like nuScenes).
2. Prepares each with ``--vertical off`` (the accumulation before recovering the vertical pose) and ``auto``
   (and ``on``, which forces the correction even where the scene is level), scores each against the truth
   (IoU, mIoU, and the share of ground-class columns whose ground spans ≤ 2 layers), and compares the
   recovered vertical poses with the true ones (the vertical error they make at the ego and 40 m away).
3. With ``--real``: labels generated from the real LiDAR fragments (scene-0061's keyframe with its 69 boxes;
   scene-0103's sweep with its keyframe's boxes), written under ``WORK/real/`` — never into the repository,
   the data is CC BY-NC-SA — and the convention estimate of them and of the real Occ3D frame.
4. With ``--figure``: side views (x–z through the ego) of a hilly frame without and with the recovered pose,
   and of a road and a car in the ``lidar`` and the ``occ3d`` convention.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from occ_mfd.data.convention import estimate_folder, to_occ3d
from occ_mfd.data.index import load_index
from occ_mfd.data.nuscenes import (BoxRecord, KeyframeRecord, NuScenesSource, SceneRecord, SweepRecord, pose_matrix,
                                   read_pcd_bin)
from occ_mfd.data.occ3d import labels_path, read_labels, write_labels
from occ_mfd.data.occupancy.accumulate import accumulate_scene
from occ_mfd.data.occupancy.generate import FrameConfig, keyframe_occupancy
from occ_mfd.data.occupancy.quality import compare_to_truth, ground_thickness
from occ_mfd.data.occupancy.vertical import VerticalConfig, estimate_vertical
from occ_mfd.data.prepare import PrepareConfig, run_prepare
from occ_mfd.data.synthetic.world import make_world
from occ_mfd.grid import FREE_ID, OCC3D_GRID, PALETTE

V = "v1.0-synth"
MM = "mmdetection3d/demo/data/nuscenes/"
MM_CATEGORY = {"car": "vehicle.car", "truck": "vehicle.truck", "trailer": "vehicle.trailer",
               "bus": "vehicle.bus.rigid", "construction_vehicle": "vehicle.construction",
               "bicycle": "vehicle.bicycle", "motorcycle": "vehicle.motorcycle",
               "pedestrian": "human.pedestrian.adult", "traffic_cone": "movable_object.trafficcone",
               "barrier": "movable_object.barrier"}


# ------------------------------------------------------------------------------------ synthetic worlds

def pose_errors(root: Path) -> dict:
    """Recovered vs true vertical pose per keyframe, relative to the scene's first keyframe (the gauge):
    the largest vertical displacement the error makes at the ego and at 40 m from it (m)."""
    src = NuScenesSource(root, V)
    truth = json.loads((root / "truth" / "index.json").read_text())
    at_ego, at_40, at_40_written = [], [], []
    ring = np.array([[40, 0, 0, 1], [-40, 0, 0, 1], [0, 40, 0, 1], [0, -40, 0, 1], [0, 0, 0, 1.0]])
    for sc in truth["scenes"]:
        scene = src.scene(sc["name"])
        fit = estimate_vertical(scene, VerticalConfig(mode="on"))
        corr = dict(zip(fit.tokens, fit.corrections))
        T = [np.array(f.get("ego2global_true", f["ego2global"])) for f in sc["frames"]]
        R = [kf.ego2global @ corr[kf.lidar.token] for kf in scene.keyframes]
        W = [kf.ego2global for kf in scene.keyframes]
        for k in range(len(T)):
            rel_t = np.linalg.inv(T[0]) @ T[k]
            for poses, out in ((R, None), (W, at_40_written)):
                d = np.linalg.inv(np.linalg.inv(poses[0]) @ poses[k]) @ rel_t
                dz = np.abs((ring @ d.T)[:, 2])
                if out is None:
                    at_ego.append(dz[-1])
                    at_40.append(dz.max())
                else:
                    out.append(dz.max())
    return {"recovered_at_ego_m": float(max(at_ego)), "recovered_at_40m_m": float(max(at_40)),
            "written_at_40m_m": float(max(at_40_written))}


def measure(work: Path, scenes: int, keyframes: int, sweeps: int, seed: int) -> dict:
    res = {}
    for terrain in ("flat", "hills"):
        world = work / f"world_{terrain}"
        if not (world / "truth" / "index.json").is_file():
            t0 = time.perf_counter()
            s = make_world(world, version=V, scenes=scenes, keyframes=keyframes, sweeps_per_keyframe=sweeps,
                           seed=seed, truth=True, progress=False, terrain=terrain)
            print(f"{terrain}: {s.line()} ({time.perf_counter() - t0:.0f} s)", flush=True)
        src = NuScenesSource(world, V)
        boxes = {kf.token: kf.boxes for n in src.scene_names() for kf in src.scene(n).keyframes}
        res[terrain] = {"poses": pose_errors(world)}
        for mode in ("off", "auto", "on"):
            out = work / f"labels_{terrain}_{mode}"
            t0 = time.perf_counter()
            r = run_prepare(world, V, out, PrepareConfig(vertical=mode), workers=1, progress=False, src=src)
            sec = time.perf_counter() - t0
            q = compare_to_truth(out, world / "truth", boxes)
            res[terrain][mode] = {"iou": q.iou, "miou": q.miou, "ground_thin_pct": q.thin_pct,
                                  "truth_ground_thin_pct": q.truth_thin_pct,
                                  "ground_layers": q.ground_layers.tolist(), "trail_pct": q.trail_pct,
                                  "vertical": r["vertical"], "prepare_s": sec}
            print(f"{terrain:5s} --vertical {mode:4s}: IoU {100 * q.iou:.1f}  mIoU {100 * q.miou:.1f}  "
                  f"ground ≤ 2 layers {q.thin_pct:.1f} % (truth {q.truth_thin_pct:.1f} %)  trails "
                  f"{q.trail_pct:.2f} %  ({sec:.0f} s) {r['vertical']}", flush=True)
        print(f"{terrain:5s} vertical pose error vs truth: {res[terrain]['poses']}", flush=True)
    return res


# ------------------------------------------------------------------------------------ real fragments

def real_keyframe_0061(real: Path):
    """scene-0061's first keyframe with its annotated boxes → (token, OccFrame) (lidar convention)."""
    from nuscenes.utils.data_classes import Box
    from pyquaternion import Quaternion
    with open(real / MM / "n015-2018-07-24-11-22-45+0800.pkl", "rb") as f:
        d = pickle.load(f)
    info, names = d["data_list"][0], {v: k for k, v in d["metainfo"]["categories"].items()}
    l2e = np.asarray(info["lidar_points"]["lidar2ego"], dtype=np.float64)
    e2g = np.asarray(info["ego2global"], dtype=np.float64)
    l2g = e2g @ l2e
    rot = Quaternion(matrix=l2g[:3, :3], atol=1e-6)
    boxes = []
    for i, ins in enumerate(info["instances"]):
        if ins["bbox_label_3d"] < 0:
            continue
        x, y, z, length, w, h, yaw = ins["bbox_3d"]
        b = Box([x, y, z], [w, length, h], Quaternion(axis=[0, 0, 1], angle=yaw))
        b.rotate(rot)
        b.translate(l2g[:3, 3])
        boxes.append(BoxRecord(f"box{i}", MM_CATEGORY[names[ins["bbox_label_3d"]]], b.center, b.wlh,
                               b.rotation_matrix, int(ins["num_lidar_pts"])))
    path = real / MM / "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
    sw = SweepRecord("kf", int(info["timestamp"] * 1e6), path, l2e, e2g, True)
    kf = KeyframeRecord(info["token"], sw.timestamp, sw, [], boxes)
    cloud = accumulate_scene(SceneRecord("scene-0061", "t", "train", [kf]), None)
    return info["token"], keyframe_occupancy(cloud, kf, 0, FrameConfig(grid=OCC3D_GRID))


def real_sweep_0103(real: Path):
    """scene-0103's non-key sweep (with its keyframe's boxes, 50 ms earlier) → (token, OccFrame)."""
    with open(real / "fastbev21/data/nuscenes/nuscenes_infos_val.pkl", "rb") as f:
        infos = pickle.load(f)["infos"]
    s = infos[1]["sweeps"][8]
    kfi = infos[0]
    l2g = pose_matrix(kfi["ego2global_rotation"], kfi["ego2global_translation"]) @ \
        pose_matrix(kfi["lidar2ego_rotation"], kfi["lidar2ego_translation"])
    boxes = []
    for i, (bx, name) in enumerate(zip(kfi["gt_boxes"], kfi["gt_names"])):
        if name not in MM_CATEGORY:
            continue
        x, y, z, w, length, h, yaw = bx
        b2l = np.eye(4)
        b2l[:3, :3] = [[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]
        b2l[:3, 3] = [x, y, z]
        b2g = l2g @ b2l
        boxes.append(BoxRecord(f"box{i}", MM_CATEGORY[name], b2g[:3, 3], np.array([w, length, h]), b2g[:3, :3]))
    path = real / "mmdetection3d/_commit_4ed472307/demo/nuscenes_n008-2018-08-01-15-16-36-0400__LIDAR_TOP__" \
                  "1533151603597909.pcd.bin"
    sw = SweepRecord(s["sample_data_token"], int(s["timestamp"]), path,
                     pose_matrix(s["sensor2ego_rotation"], s["sensor2ego_translation"]),
                     pose_matrix(s["ego2global_rotation"], s["ego2global_translation"]), True)
    assert len(read_pcd_bin(path)) > 30000
    kf = KeyframeRecord(s["sample_data_token"], sw.timestamp, sw, [], boxes)
    cloud = accumulate_scene(SceneRecord("scene-0103", "t", "val", [kf]), None)
    return s["sample_data_token"], keyframe_occupancy(cloud, kf, 0, FrameConfig(grid=OCC3D_GRID))


def real_conventions(work: Path, real: Path) -> dict:
    out = {}
    occ3d_dir = real / "CVPR2023-3D-Occupancy-Prediction"
    est, _ = estimate_folder(occ3d_dir)
    print(f"real Occ3D frame (scene-1077, {occ3d_dir}):\n{est.summary()}", flush=True)
    out["occ3d_frame"] = est.to_dict()
    for name, make in (("scene-0061", real_keyframe_0061), ("scene-0103", real_sweep_0103)):
        token, frame = make(real)
        folder = work / "real" / name
        write_labels(labels_path(folder, name, token), frame, OCC3D_GRID)
        est, _ = estimate_folder(folder)
        print(f"labels generated from the real LiDAR, {name} ({folder}):\n{est.summary()}", flush=True)
        out[name] = est.to_dict()
        est_o, _ = estimate_folder_of(to_occ3d(frame, OCC3D_GRID), work / "real" / f"{name}-as-occ3d", name, token)
        print(f"  … converted with to_occ3d: {est_o.convention} (ground mode {est_o.ground_mode}, "
              f"{100 * est_o.floor_share:.0f} % object bottoms at 0)", flush=True)
        out[f"{name}_to_occ3d"] = est_o.to_dict()
    return out


def estimate_folder_of(frame, folder: Path, name: str, token: str):
    write_labels(labels_path(folder, name, token), frame, OCC3D_GRID)
    return estimate_folder(folder)


# ------------------------------------------------------------------------------------ figure

def _side(ax, sem: np.ndarray, j: int, title: str, grid=OCC3D_GRID, x_range=(-40, 40), exaggerate: float = 1.0):
    img = np.ones(sem.shape[::2][::-1] + (3,))
    sl = sem[:, j, :].T                                                     # (Z, X)
    occ = sl != FREE_ID
    img[occ] = PALETTE[sl[occ]] / 255.0
    ext = (grid.lo[0], grid.hi[0], grid.lo[2], grid.hi[2])
    ax.imshow(img, origin="lower", extent=ext, interpolation="nearest", aspect=exaggerate)
    ax.axhline(0.0, color="k", lw=0.6, ls="--")
    ax.set_xlim(*x_range)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (m, ego forward)", fontsize=8)
    ax.set_ylabel("z (m)" if exaggerate == 1 else f"z (m, ×{exaggerate:g})", fontsize=8)
    ax.tick_params(labelsize=7)


def figure(work: Path, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    off, auto = work / "labels_hills_off", work / "labels_hills_auto"
    idx = load_index(off)
    frames = [(s.name, f.token) for s in idx.scenes for f in s.frames]
    j = OCC3D_GRID.shape[1] // 2
    # the hilly frame whose road smears most without the recovered pose
    worst = max(frames, key=lambda st: -ground_thickness(read_labels(labels_path(off, *st)).semantics)[1]
                / max(1, ground_thickness(read_labels(labels_path(off, *st)).semantics)[0]))
    a = read_labels(labels_path(off, *worst)).semantics
    b = read_labels(labels_path(auto, *worst)).semantics
    # a flat frame and the y-slice through the car nearest to the ego
    flat = work / "labels_flat_auto"
    fi = load_index(flat)
    best = None
    for s in fi.scenes:
        for f in s.frames:
            fr = read_labels(labels_path(flat, s.name, f.token))
            car = np.argwhere(fr.semantics == 4)
            if len(car):
                d = np.hypot(car[:, 0] - 100, car[:, 1] - 100)
                k = int(np.argmin(d))
                if best is None or d[k] < best[0]:
                    best = (d[k], fr, int(car[k, 1]), int(car[k, 0]))
    _, fr, jc, ic = best
    sem_l, sem_o = fr.semantics, to_occ3d(fr, OCC3D_GRID).semantics
    xc = OCC3D_GRID.lo[0] + (ic + 0.5) * OCC3D_GRID.voxel_size
    fig, ax = plt.subplots(2, 2, figsize=(11, 6.5))
    _side(ax[0, 0], a, j, "hills, written 2-D poses (--vertical off): the road smears", exaggerate=3)
    _side(ax[0, 1], b, j, "hills, vertical pose recovered (--vertical auto)", exaggerate=3)
    _side(ax[1, 0], sem_l, jc, "z-convention lidar: road at the ego ground (z-index 2)", x_range=(xc - 15, xc + 15))
    _side(ax[1, 1], sem_o, jc, "z-convention occ3d: road at z-index 0, car filled down", x_range=(xc - 15, xc + 15))
    used = sorted(set(np.unique(np.concatenate([a.ravel(), b.ravel(), sem_l[:, jc].ravel(), sem_o[:, jc].ravel()])))
                  - {FREE_ID})
    from occ_mfd.grid import OCC3D_CLASSES
    fig.legend(handles=[Patch(color=PALETTE[c] / 255.0, label=OCC3D_CLASSES[c]) for c in used], loc="lower center",
               ncol=min(len(used), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder (worlds, labels; reused when present)")
    p.add_argument("--scenes", type=int, default=1)
    p.add_argument("--keyframes", type=int, default=12)
    p.add_argument("--sweeps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", help="../shared/nuscenes_real: also estimate the conventions of the real fragments")
    p.add_argument("--figure", help="PNG of the side views")
    p.add_argument("--out", help="JSON of every number")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"synthetic": measure(work, a.scenes, a.keyframes, a.sweeps, a.seed)}
    if a.real:
        res["real"] = real_conventions(work, Path(a.real))
    if a.figure:
        figure(work, Path(a.figure))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
