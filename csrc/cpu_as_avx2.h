// Builds the CPU kernels as they run on an AVX2 CPU, on a machine with AVX-512: compiled in with
// `-include cpu_as_avx2.h` by the benchmarks' AVX2 mode (benchmarks/cpu_isa_cap.py), never by the library.
// Every ISA clone becomes the x86-64-v3 one, and the feature checks answer as an AVX2 + FMA CPU
// (x86-64-v3 yes, x86-64-v4 no), so the hand-written AVX2 paths run where an AVX2 CPU would take them.
#pragma once

#define target_clones(...) target("arch=x86-64-v3")
#define __builtin_cpu_supports(feature) (__builtin_strcmp((feature), "x86-64-v4") != 0)
