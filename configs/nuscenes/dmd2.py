# DMD2 (no GAN) at full scale: one-step student of the OccFM teacher (DISTILLERS.md §2).
#   torchrun --nproc_per_node=K tools/train.py configs/nuscenes/dmd2.py \
#       --cfg-options objective.teacher_snapshot=work_dirs/occfm/snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(_delete_=True, type="occ_mfd.objectives.dmd2.OccDMD2",
                 teacher_snapshot="work_dirs/occfm/snapshot.pt", cfg_scale=None, aux_steps=4, student_steps=1,
                 t_min=0.02, t_max=0.98)
