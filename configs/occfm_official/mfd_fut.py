# Mean Flow Distillation of the released OccFM "fut" (planning-conditioned) teacher; otherwise as mfd_hist.py.
#   python tools/import_occfm.py --ckpt .../epoch=000196.ckpt --config .../occfm_fut.yaml --out work_dirs/occfm_official/fut
#   torchrun --nproc_per_node=8 tools/train.py configs/occfm_official/mfd_fut.py --cfg-options data.root=data/occ3d
_base_ = ["mfd_hist.py"]

objective = dict(teacher_snapshot="work_dirs/occfm_official/fut/teacher.pt")
