# The released OccFM VAE architecture (Swin-V2, vae_swin_x16_h16: 18.54 M parameters), to train it on your own
# labels. To *use* the released weights instead, import them (tools/import_occfm.py → vae.pt / teacher.pt).
# Upstream recipe (occfm_vae.yaml): Adam lr 2e-5, batch 6/GPU, 100 epochs, 1000 warm-up steps, cosine to 0.2×,
# clip 5, loss 10·CE + 1·Lovász + 1·KL. Upstream's KL uses σ in place of log σ² (PORT.md §3); ours is the
# standard KL at a small weight (occ_mfd/models/vae_loss.py), so this trains the same network, not the same run.
#   torchrun --nproc_per_node=8 tools/train.py configs/occfm_official/vae.py --cfg-options data.root=data/occ3d
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ3d", split="train",
            past=4, future=6, pool=1, mask=None, stride=1)
objective = dict(
    type="occ_mfd.objectives.vae.VAEObjective",
    vae=dict(
        type="occ_mfd.models.occfm_official.vae.OccFmVAE",
        embedding=dict(num_cate=18, feat_dim=8, height_num=16, occ_range=[-40, -40, -1, 40, 40, 5.4],
                       voxel_size=[0.4, 0.4, 0.4], encoder_dim=128),
        encoder=dict(patch_embed_dim=128, img_size=200, patch_size=1, input_channel=128, depth=[2, 6],
                     mlp_ratio=4, qkv_bias=True, latent_dim=16, downsample=["conv", "conv"]),
        decoder=dict(input_channel=16, depth=[6, 2], patch_embed_dim=128, out_dim=128, mlp_ratio=4,
                     qkv_bias=True, upsample=["interp", "interp"]),
    ),
    loss=dict(type="occ_mfd.models.vae_loss.VAELoss", ce_weight=10.0, lovasz_weight=1.0),
    max_frames=6,   # upstream trains single frames, batch 6 per GPU
)
optim = dict(main=dict(lr=2e-5 * 6 * 8, weight_decay=0.0, grad_clip=5.0))   # lr scaled by batch × GPUs as upstream
train = dict(max_steps=100_000, batch_size=1, num_workers=4, warmup_steps=1000, min_lr_ratio=0.2,
             ema_decay=0.9999, amp="bf16", ckpt_interval=5000)
