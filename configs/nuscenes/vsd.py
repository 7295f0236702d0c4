# VSD / Diff-Instruct baseline at full scale: MFD with s = t.
_base_ = ["./mfd.py"]
objective = dict(s_neq_t_ratio=0.0)
