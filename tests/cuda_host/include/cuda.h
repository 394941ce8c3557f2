// Stand-in for the CUDA driver header that TVM's CUDA C includes: on the CPU nothing from it is
// used; the device-side names come from cuda_host.h (force-included before the kernel source).
#pragma once
#include "cuda_host.h"
