# The decoder's ego-motion prior trained on a forecaster's own forecasts (occ_mfd/objectives/prior_refiner.py,
# forecaster_snapshot): after the teacher, a small network learns to correct the frozen VAE's decoding of the
# teacher's forecast with the current frame warped by the extrapolated ego motion (cv-warp, past poses only) —
# where to trust the forecast and where the warp's voxels are the better guess. It writes a "vae" snapshot
# (the teacher's VAE + the refiner) that `tools/eval.py --refiner` attaches to the teacher and to every student
# distilled from it (same VAE weights, checked).
#   python tools/train.py configs/tiny/refiner_forecast.py --cfg-options data.root=work_dirs/demo/occ \
#       objective.forecaster_snapshot=work_dirs/demo/teacher/snapshot.pt
_base_ = ["./refiner.py"]

objective = dict(
    vae_snapshot=None,
    forecaster_snapshot="work_dirs/teacher/snapshot.pt",
    forecast_steps=(1, 10),   # the step counts eval decodes (teacher@1 / student@1 and teacher@10)
    frames=3,
    latent_cache_mb=512,      # the history's latents: encoded once per frame
)
