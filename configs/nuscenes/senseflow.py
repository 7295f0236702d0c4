# SenseFlow (one step) at full scale (DISTILLERS.md §3): DMD2 generator loss + ISG + IDA, no VFM discriminator.
#   torchrun --nproc_per_node=K tools/train.py configs/nuscenes/senseflow.py \
#       --cfg-options objective.teacher_snapshot=work_dirs/occfm/snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(_delete_=True, type="occ_mfd.objectives.senseflow.OccSenseFlow",
                 teacher_snapshot="work_dirs/occfm/snapshot.pt", cfg_scale=None, aux_steps=4, student_steps=1,
                 t_min=0.02, t_max=0.98, isg_weight=1.0, isg_delta=0.05, isg_huber_c=1e-3, ida_decay=0.97)
