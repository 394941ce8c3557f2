"""Run the CUDA kernels our schedules generate on the CPU (see include/cuda_host.h)."""
