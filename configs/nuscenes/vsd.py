# VSD / Diff-Instruct baseline at full scale: MFD with s = t.
_base_ = ["./mfd.py"]
objective = dict(r_not_equal_t_ratio=0.0)
