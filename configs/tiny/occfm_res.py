# The ego-prior teacher (configs/tiny/occfm_ego.py) generating the *residual* to its prior with a data-predicting
# network (issue: a teacher that forecasts): the flow's data is future − cv-warp latents, and the net outputs the
# data estimate x̂1 (velocity v = (x̂1 − x_t) / (1 − t)), so an untrained net forecasts the warp itself and training
# only learns what the warp gets wrong (occ_mfd/models/forecaster.py). Measured on the demo world (README, Results):
# at 1,200 steps its one-step forecast beats cv-warp on IoU at 2 and 3 s (52.0 vs 51.2 mean of 1/2/3 s); more
# sampling steps and CFG make it worse at this budget.
#   python tools/train.py configs/tiny/occfm_res.py --max-steps 1200 \
#       --cfg-options data.root=work_dirs/demo/occ objective.vae_snapshot=work_dirs/demo/vae/snapshot.pt
_base_ = ["./occfm_ego.py"]

objective = dict(net=dict(residual=True, prediction="data"))
