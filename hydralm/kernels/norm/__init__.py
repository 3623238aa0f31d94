"""RMSNorm as Triton kernels (triton_rmsnorm.py); modules/rmsnorm.py holds the PyTorch form and picks per call
(HYDRALM_NORM in ``kernels/backend.py``)."""
