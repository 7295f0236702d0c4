# OccFM-like training defaults; stage configs inherit them with
#     _base_ = ["../_base_/train_defaults.py"]
# and override what differs (mmengine merges dicts key by key). Schema: configs/_base_/README.md.
#
# Learning rate: OccFM scales lr linearly with the global batch, lr = 2e-5 × batch_size × GPUs
# (2e-5 per sample). This file uses batch 1 on 1 GPU; a config with batch_size=B for K GPUs sets
# optim.main.lr = 2e-5 * B * K itself (written out as that product, so the rule stays visible).
optim = dict(
    main=dict(lr=2e-5, weight_decay=0.01, betas=(0.9, 0.999), grad_clip=5.0),  # no wd on norms/biases/embeddings
)
train = dict(
    max_steps=100_000,
    batch_size=1,          # per process; global batch = batch_size × world size
    num_workers=4,
    warmup_steps=1000,     # linear warm-up
    schedule="cosine",     # then cosine down to min_lr_ratio × lr ("constant" for MFD)
    min_lr_ratio=0.2,
    ema_decay=0.9999,      # with warm-up min(decay, (1+n)/(10+n)), see occ_mfd/engine/ema.py
    amp="bf16",            # bf16 autocast on CUDA only; CPU always runs fp32
    log_interval=50,
    ckpt_interval=5000,
    ckpt_minutes=20,       # also checkpoint after this much wall time (whichever comes first): a killed or
                           # preempted job loses at most this much; SIGTERM/Ctrl-C write one at once
    keep_ckpts=3,
    seed=0,
    max_nonfinite=20,      # stop after this many non-finite steps in a row
)
