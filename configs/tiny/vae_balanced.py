# The fine tiny VAE (configs/tiny/vae_fine.py) with a class-balanced cross-entropy (issue: a teacher that
# forecasts — a tokenizer that keeps small classes): each voxel's CE is weighted by ENet's 1 / ln(1.02 + f_k), f_k
# its class's share of the batch's voxels (occ_mfd/models/vae_loss.py), so free space and road no longer drown
# the cones, barriers and bicycles whose loss the plain CE barely sees.
#   python tools/train.py configs/tiny/vae_balanced.py --cfg-options data.root=work_dirs/demo/occ
_base_ = ["./vae_fine.py"]

objective = dict(loss=dict(type="occ_mfd.models.vae_loss.VAELoss", class_balance=True))
