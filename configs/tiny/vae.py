# Tiny occupancy VAE: trains on the synthetic world on 2 CPU cores in minutes.
# Grid: the prepared 200×200×16 Occ3D grid pooled 2× at load time → 100×100×8 (0.8 m); latent 8 × 25 × 25.
#   python tools/train.py configs/tiny/vae.py --cfg-options data.root=work_dirs/demo/occ
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ", split="train",
            past=4, future=6, pool=2, mask=None, stride=2,
            cache_mb=256)  # the demo's pooled data is ~25 MB: every frame is read from disk once
objective = dict(
    type="occ_mfd.objectives.vae.VAEObjective",
    vae=dict(type="occ_mfd.models.vae.OccVAE", num_classes=18, grid_z=8, class_dim=8, height_dim=4,
             channels=(32, 64, 64), num_res_blocks=1, latent_channels=8, downsample=4, sparse="auto"),
    max_frames=2,  # frames of each 10-frame window used per step (keeps a CPU step short)
)
optim = dict(main=dict(lr=2e-3, weight_decay=0.01, grad_clip=5.0))
train = dict(max_steps=300, batch_size=1, num_workers=0, warmup_steps=30, min_lr_ratio=0.05,
             ema_decay=0.99, amp=None, log_interval=25, ckpt_interval=200, keep_ckpts=2,
             ckpt_minutes=1)  # a slow CPU loses at most a minute when stopped
