# Full-scale Mean Flow Distillation, the paper's recipe: AdamW lr 1e-4 for student and aux, wd 1e-4,
# clip 1, constant lr, bf16, batch 1 per GPU, 9 aux : 1 student, h = 0.02, teacher CFG 2.
#   torchrun --nproc_per_node=8 tools/train.py configs/nuscenes/mfd.py \
#       --cfg-options objective.teacher_snapshot=work_dirs/occfm/snapshot.pt
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ", split="train",
            past=4, future=6, pool=1, mask=None, stride=1)
objective = dict(type="occ_mfd.objectives.mfd.OccMeanFlowDistillation", teacher_snapshot="work_dirs/occfm/snapshot.pt",
                 cfg_scale=None, max_substep=0.02, aux_steps=9, student_steps=1, s_neq_t_ratio=1.0)
optim = dict(_delete_=True,  # replace the base file's single "main" group
             aux=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0),
             student=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0))
train = dict(max_steps=50_000, batch_size=1, num_workers=4, warmup_steps=0, schedule="constant",
             ema_decay=0.999, amp="bf16", ckpt_interval=2000)
