# Mean Flow Distillation of the released OccFM "hist" teacher into a one-step student (arXiv 2606.11155,
# Table 1: teacher@10 37.52 / 28.49 → student@1 37.07 / 27.25 IoU / mIoU, mean of the 6 future frames; not
# measured here). The paper's recipe: AdamW lr 1e-4 for student and aux, wd 1e-4, clip 1, constant lr, bf16,
# batch 1 per GPU, 9 aux : 1 student updates, h = 0.02, teacher CFG 2.
#   python tools/import_occfm.py --ckpt .../epoch=000199.ckpt --config .../occfm.yaml --out work_dirs/occfm_official/hist
#   torchrun --nproc_per_node=8 tools/train.py configs/occfm_official/mfd_hist.py --cfg-options data.root=data/occ3d
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ3d", split="train",
            past=4, future=6, pool=1, mask=None, stride=1)
objective = dict(type="occ_mfd.objectives.mfd.OccMeanFlowDistillation",
                 teacher_snapshot="work_dirs/occfm_official/hist/teacher.pt",
                 cfg_scale=None, max_substep=0.02, aux_steps=9, student_steps=1, s_neq_t_ratio=1.0)
optim = dict(_delete_=True,  # replace the base file's single "main" group
             aux=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0),
             student=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0))
train = dict(max_steps=50_000, batch_size=1, num_workers=4, warmup_steps=0, schedule="constant",
             ema_decay=0.999, amp="bf16", ckpt_interval=2000)
