// Stand-in for the CUDA toolkit header in the CPU execution of the CUDA kernels.
#pragma once
#include "../cuda_emu_half.h"
