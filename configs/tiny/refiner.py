# The decoder's ego-motion prior (occ_mfd/models/prior_refiner.py) on a trained tiny VAE: a small network that
# corrects the frozen VAE's logits with the current frame warped by the extrapolated ego motion (cv-warp, past poses
# only), so small static classes the tokenizer loses come back from the warp. Writes a "vae" snapshot with both
# networks; the teacher stage takes it as its objective.vae_snapshot.
#   python tools/train.py configs/tiny/refiner.py --cfg-options data.root=work_dirs/demo/occ \
#       objective.vae_snapshot=work_dirs/demo/vae/snapshot.pt
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ", split="train",
            past=4, future=6, pool=2, mask=None, stride=2, cache_mb=256)
objective = dict(
    type="occ_mfd.objectives.prior_refiner.PriorRefinerObjective",
    vae_snapshot="work_dirs/vae/snapshot.pt",
    refiner=dict(prior="cv-warp", hidden=32, class_dim=8),
    frames=2, latent_noise=0.5,
)
optim = dict(main=dict(lr=1e-3, weight_decay=0.01, grad_clip=5.0))
train = dict(max_steps=300, batch_size=1, num_workers=0, warmup_steps=20, min_lr_ratio=0.1,
             ema_decay=0.99, amp=None, log_interval=25, ckpt_interval=200, keep_ckpts=2, ckpt_minutes=1)
