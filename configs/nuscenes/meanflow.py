# MeanFlow distillation into a flow map at full scale (DISTILLERS.md §6). The JVP runs in fp32 with the math attention
# kernel whatever the AMP setting (occ_mfd/models/flow_map.py).
#   torchrun --nproc_per_node=K tools/train.py configs/nuscenes/meanflow.py \
#       --cfg-options objective.teacher_snapshot=work_dirs/occfm/snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(_delete_=True, type="occ_mfd.objectives.meanflow.OccMeanFlow",
                 teacher_snapshot="work_dirs/occfm/snapshot.pt", cfg_scale=None, norm_p=1.0, norm_eps=0.01,
                 warmup_updates=0, time_sampler="fastgen_endpoint", jvp="auto", fd_eps=1e-4)
optim = dict(_delete_=True, student=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0))
