# Full-scale OccFM teacher: 16 × 50 × 50 latents (×10), 4 past + 6 future, ~28 M-parameter forecaster;
# sampled with 10 Euler steps on the α = 3 shifted grid, CFG 2. OccFM recipe: lr 2e-5 × batch × GPUs,
# wd 0.01, 1000 warm-up steps, cosine to 0.2×, clip 5, EMA 0.9999, bf16, batch 4 per GPU.
#   torchrun --nproc_per_node=8 tools/train.py configs/nuscenes/occfm.py \
#       --cfg-options objective.vae_snapshot=work_dirs/vae/snapshot.pt
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ", split="train",
            past=4, future=6, pool=1, mask=None, stride=1)
objective = dict(
    type="occ_mfd.objectives.flow_matching.OccFlowTeacher",
    vae_snapshot="work_dirs/vae/snapshot.pt",
    net=dict(past=4, future=6, base_channels=80, channel_mult=(1, 2, 4), num_res_blocks=2, attn_levels=(1, 2),
             heads=5, traj_mode="past"),
    latent_scale=10.0, cond_drop_prob=0.2, steps=10, shift=3.0, cfg_scale=2.0,
)
optim = dict(main=dict(lr=2e-5 * 4 * 8, weight_decay=0.01, grad_clip=5.0))  # 2e-5 × batch 4 × 8 GPUs
train = dict(max_steps=200_000, batch_size=4, num_workers=4, warmup_steps=1000, min_lr_ratio=0.2,
             ema_decay=0.9999, amp="bf16", ckpt_interval=5000)
