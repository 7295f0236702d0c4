# VSD / Diff-Instruct baseline: the MFD code with s = t (instantaneous velocities instead of mean flows).
_base_ = ["./mfd.py"]
objective = dict(s_neq_t_ratio=0.0)
