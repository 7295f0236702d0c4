# VSD / Diff-Instruct baseline at full scale: MFD with s = t.
_base_ = ["./mfd.py"]
objective = dict(s_neq_t_ratio=0.0, vsd_time="uniform")   # Diff-Instruct: t ~ U(0, 1), fresh noise
