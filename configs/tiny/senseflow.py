# Tiny SenseFlow (one step): DMD2's generator loss + intra-segment guidance + implicit distribution alignment, an
# MFD Table 1 baseline (DISTILLERS.md §3; its VFM discriminator does not transfer, see occ_mfd/objectives/senseflow.py).
#   python tools/train.py configs/tiny/senseflow.py --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(
    _delete_=True,
    type="occ_mfd.objectives.senseflow.OccSenseFlow",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,              # the teacher's sampler CFG (2), in the DM loss and in ISG's teacher step
    aux_steps=4, student_steps=1,  # the shared 4:1 (SenseFlow's code: GD = 5 on FLUX, 10 on SD3.5-M)
    t_min=0.02, t_max=0.98,      # DMD2's timestep range for the DM loss
    isg_weight=1.0,              # the authors' trainer adds the ISG loss unweighted (DISTILLERS.md §3: 0.5 / 1.0)
    isg_delta=0.05,              # t_mid ~ U(δ, 1 − δ): the SD3.5 trainer's ±50/1000 margin
    isg_huber_c=1e-3,            # pseudo-Huber c of the ISG loss
    ida_decay=0.97,              # IDA: aux ← 0.97 aux + 0.03 student after each student update (ida_w)
)
