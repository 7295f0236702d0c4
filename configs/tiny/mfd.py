# Tiny Mean Flow Distillation: one-step student of the tiny teacher (arXiv 2606.11155).
#   python tools/train.py configs/tiny/mfd.py --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ", split="train",
            past=4, future=6, pool=2, mask=None, stride=1,
            cache_mb=256)  # the demo's pooled data is ~25 MB: every frame is read from disk once
objective = dict(
    type="occ_mfd.objectives.mfd.OccMeanFlowDistillation",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,           # the teacher's sampler CFG (2)
    max_substep=0.02,         # the paper's h: Euler sub-step bound over [s, t] (Table 2: 0.005–0.02 best)
    aux_steps=9, student_steps=1,   # authors' code 9:1 (paper text: 10:1)
    s_neq_t_ratio=1.0,        # 1: mean flows over s < t (MFD); 0: s = t (VSD), see vsd.py
    noise="fresh",            # x_s from fresh noise, as the authors' code ("coupled": the generator's own, ablation)
    latent_cache_mb=512,      # the frozen VAE encodes each training frame once (models/latent_cache.py)
)
# Paper: AdamW lr 1e-4 for both, wd 1e-4, clip 1, constant lr. Tiny runs are short, so lr is higher.
optim = dict(_delete_=True,  # replace the base file's single "main" group
             aux=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0),
             student=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0))
train = dict(max_steps=160, batch_size=2, num_workers=0, warmup_steps=0, schedule="constant",
             ema_decay=0.99, amp=None, log_interval=20, ckpt_interval=200, keep_ckpts=2,
             ckpt_minutes=1)  # a slow CPU loses at most a minute when stopped
