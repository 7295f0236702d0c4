"""LiDAR sweeps → semantic occupancy in the Occ3D layout (one keyframe at a time, in its ego frame).

Pipeline (``vertical.py`` and ``accumulate.py`` once per scene, ``generate.py`` per keyframe):

0. nuScenes ego poses have no z, pitch or roll: on hills the scene's vertical poses are first recovered by
   registering each sweep's ground to the scene's ground map (``vertical.py``; ``prepare --vertical``),
   and the corrected poses are used below; level scenes keep their written poses.

1. Every LIDAR_TOP sweep (keyframes and the sweeps between them) is read; the ego vehicle's own returns
   are dropped per sweep: the points inside ``occ_mfd.ego.NUSCENES_EGO.removal_box`` (``points.EGO_BOX``;
   its bounds and their reasons are documented in :mod:`occ_mfd.ego`) in the ego frame, mapped by that
   sweep's sensor2ego — this also drops the zero-range returns at the sensor.
2. Points inside an annotated box (enlarged by 0.2 m; boxes for non-key sweeps are the devkit's
   interpolation) go to that **instance**, stored in the box's own frame; points within 0.15 m of a box
   bottom without a lidarseg label are taken as road. Everything else is **static** (global frame).
3. Labels: lidarseg → Occ3D ids where the sweep has lidarseg; box category inside boxes; unlabelled
   static points take the nearest labelled point's class within 1 m (cKDTree), else are dropped.
   **Without lidarseg** in the dataroot, static points are ``others`` (0) and only boxes give classes.
4. Per target keyframe: static points of the window (default: whole scene) + each instance's points at
   its box pose *of that keyframe* (no trails) → majority vote per voxel. Ground holes between LiDAR
   rings are closed (``generate.fill_ground_holes``).
5. Free space: rays from each sweep's sensor origin (the target keyframe's sweep and the sweeps up to
   the next keyframe, ``ray_window=0``) are traversed exactly (``raycast.py``); observed = traversed ∪
   hit = ``mask_lidar``; observed and unoccupied = free (17); unobserved voxels stay 17 with mask 0.
   Inside the keyframe's boxes only its own sweep's rays count as traversals: a later sweep sees a
   moving object elsewhere and would otherwise mark the object's unseen inside observed-free.
6. ``mask_camera`` = ``mask_lidar`` ∩ inside some camera frustum (``camera.py``), or ``mask_lidar``
   when the dataroot has no camera calibrations.

Reproduce the label quality numbers (synthetic world with exact truth)::

    python tools/make_synthetic.py --out /tmp/w --scenes 2 --keyframes 12 --sweeps-per-keyframe 2 --seed 0 --truth
    python tools/prepare_data.py --dataroot /tmp/w --version v1.0-synth --out /tmp/o
    python tools/prepare_data.py quality /tmp/o --truth /tmp/w/truth

and on hills (``--terrain hills``; before/after: ``benchmarks/vertical_study.py``). Labels are written in the
``lidar`` vertical convention unless ``--z-convention occ3d`` (``occ_mfd.data.convention.to_occ3d``).
"""
