// Stand-in for cuda_fp16.h: the half type and its functions are defined in cuda_host.h.
#pragma once
#include "cuda_host.h"
