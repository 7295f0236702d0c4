# VSD / Diff-Instruct baseline: the MFD code with s = t (instantaneous velocities instead of mean flows),
# t ~ U(0, 1) and fresh noise; vsd_time="max2" is this project's earlier variant (t = max of two uniforms).
_base_ = ["./mfd.py"]
objective = dict(s_neq_t_ratio=0.0, vsd_time="uniform")   # Diff-Instruct: t ~ U(0, 1), fresh noise
