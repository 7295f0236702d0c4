# The released OccFM world model's flow net (FLOW_MATCHING_DOWN_X4_DiT, 11.83 M parameters), "hist" variant:
# conditioned on 4 past latents (+2 zero frames) and 6 LiDAR-frame trajectory rows (the last one is the current
# frame's 0.5 s future displacement, as upstream). Over the released VAE (imported: tools/import_occfm.py).
# To *use* the released teacher, import it (→ teacher.pt) and skip this stage. Upstream recipe (occfm.yaml):
# Adam lr 2e-5, batch 4/GPU, 200 epochs, 1000 warm-up steps, cosine to 0.2×, clip 5, CFG drop 0.2 (latents
# only), logit-normal t, 10 Euler steps on the α = 3 grid, CFG 2, latents ×10, EMA 0.9999.
#   torchrun --nproc_per_node=8 tools/train.py configs/occfm_official/teacher_hist.py \
#       --cfg-options data.root=data/occ3d objective.vae_snapshot=work_dirs/occfm_official/hist/vae.pt
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ3d", split="train",
            past=4, future=6, pool=1, mask=None, stride=1)
objective = dict(
    type="occ_mfd.objectives.flow_matching.OccFlowTeacher",
    vae_snapshot="work_dirs/occfm_official/hist/vae.pt",
    net=dict(type="occ_mfd.models.occfm_official.adapter.OccFmForecaster",
             net=dict(in_channels=16, out_channels=16, model_channels=128, channel_multi=[2, 4],
                      input_size=[50, 50], trajectory_length=6, init_kernel_size=7, init_3d_conv_channels=64,
                      attn_dim=32, temporal_attn_head=8, spatial_attn_head=8)),
    latent_scale=10.0, cond_drop_prob=0.2, steps=10, shift=3.0, cfg_scale=2.0,
)
optim = dict(main=dict(lr=2e-5 * 4 * 8, weight_decay=0.0, grad_clip=5.0))   # 2e-5 × batch 4 × 8 GPUs
train = dict(max_steps=200_000, batch_size=4, num_workers=4, warmup_steps=1000, min_lr_ratio=0.2,
             ema_decay=0.9999, amp="bf16", ckpt_interval=5000)
