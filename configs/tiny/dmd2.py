# Tiny DMD2 (no GAN): one-step student of the tiny teacher, an MFD Table 1 baseline (DISTILLERS.md §2).
#   python tools/train.py configs/tiny/dmd2.py --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(
    _delete_=True,
    type="occ_mfd.objectives.dmd2.OccDMD2",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,              # the teacher's sampler CFG (2); the fake flow runs without guidance
    aux_steps=4, student_steps=1,  # FastGen student_update_freq=5 (tianweiy/DMD2: 5 fake : 1 generator)
    t_min=0.02, t_max=0.98,      # DMD2's timestep range
)
